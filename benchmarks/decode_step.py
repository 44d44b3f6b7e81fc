"""One decode step of the runner at 1, 4, 16 and 32 rows: engine v2's runner (from git) next to
this tree's, and the 16-row step's arithmetic rate as a share of what a large fp32 GEMM reaches
on the same cores in the same run (the faster of MKL's and oneDNN's).

    python benchmarks/decode_step.py                       # small preset, v2 from commit ee8ede0
    python benchmarks/decode_step.py --rows 1 16 --steps 40 --rounds 5
    python benchmarks/decode_step.py --dtype bfloat16 --v2-commit c6d2199   # model.dtype: bfloat16

Each side runs in its own fresh process (v2's from `git archive` of `--v2-commit`), the sides
taking turns for `--rounds` rounds with the order rotated, so drift in the machine's speed lands
on both. A process loads the preset's weights, writes `--prompt-len`-token prompts into `rows`
slots and times `--steps` greedy decode steps (the runner, the greedy pick its engine makes: its
`argmax_finite` op where the tree has one, else torch's argmax, and the step's one copy of tokens to
the host); the figure is the median step. A step's arithmetic, from the model's
config: 2 x (the decoder's linear weights + the output head) x rows, plus attention's 4 x layers
x heads x head_dim x positions per row. Its bytes: every weight once and each row's keys and
values; "reads alone" is them at the rate these threads sum 512 MB (on 2 MB pages, as the engine
keeps its weights and slots), the time a step that did nothing but read would take, and "share at
reads alone" the share of the GEMM such a step would reach: the most any kernel's step can reach
on these cores, since every step reads its bytes at least once. Prints a table, writes JSON with
the commit it ran on.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# A worker imports the tree it measures (v2's extracted from git, or this one).
sys.path.insert(0, os.environ.get("DECODE_STEP_TREE", str(ROOT)))
sys.path.insert(1, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from benchmarks.report import rotated, save, table  # noqa: E402


def worker(args) -> dict:
    """This process's measurement (its tree is whichever is first on sys.path)."""
    import torch

    torch.set_num_threads(args.threads)
    rows = args.rows[0]
    if args.gemm:
        # Both libraries torch has for it: MKL's (`a @ b`) dispatches by CPU vendor and runs AVX2
        # code on AMD's AVX-512 cores, where oneDNN on a prepacked weight runs ~2.2x faster; the
        # reference is the faster of the two, so the share is of what these cores reach.
        n = 2048
        dtype = getattr(torch, args.dtype)
        a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
        packed = torch.ops.mkldnn._reorder_linear_weight(b.t().contiguous(), n)
        kernels = {
            "mkl": lambda: a @ b,
            "onednn": lambda: torch.ops.mkldnn._linear_pointwise(a, packed, None, "none", [], ""),
        }
        rates = {}
        for name, kernel in kernels.items():
            for _ in range(3):
                kernel()
            times = []
            for _ in range(10):
                start = time.perf_counter()
                kernel()
                times.append(time.perf_counter() - start)
            rates[name] = 2 * n**3 / statistics.median(times) / 1e9
        return {"gemm": rates, "read_gb_s": read_rate(torch)}

    from concurrent.futures import ThreadPoolExecutor

    from llava_serve.config import ModelConfig
    from llava_serve.models import checkpoint
    from tests.support.probes import WholeRunner

    thread = ThreadPoolExecutor(1)  # the engine's model thread: weights loaded and run on it

    def run() -> dict:
        model = checkpoint.load_model(ModelConfig(name="tiny", tiny_preset=args.preset, dtype=args.dtype))
        runner = WholeRunner(model, 0, slots=rows, max_len=args.prompt_len + args.steps + 8)
        g = torch.Generator().manual_seed(rows)
        ids = torch.randint(10, runner.vocab_size - 10, (rows, args.prompt_len), generator=g).tolist()
        logits = runner.prefill_whole(list(range(rows)), [(p, []) for p in ids])
        runner.commit(logits.argmax(-1).tolist())
        ops = getattr(runner, "ops", None)
        if ops is not None and hasattr(ops, "argmax_finite"):  # the engine's greedy pick (`Sampler`)

            def pick(logits):
                return ops.argmax_finite(logits)[0]
        else:

            def pick(logits):
                return logits.argmax(-1)

        times = []
        for _ in range(args.steps):
            start = time.perf_counter()
            tokens = pick(runner.decode())
            runner.set_last_tokens(tokens.tolist())
            times.append(time.perf_counter() - start)
        text = model.config.get_text_config()
        heads, layers, hidden = text.num_attention_heads, text.num_hidden_layers, text.hidden_size
        head_dim = getattr(text, "head_dim", None) or hidden // heads
        kv_heads = getattr(text, "num_key_value_heads", None) or heads
        # From the config, not the modules: packed layers are not `nn.Linear`s.
        per_layer = hidden * head_dim * (2 * heads + 2 * kv_heads) + 3 * hidden * text.intermediate_size
        weights = layers * per_layer + text.vocab_size * hidden
        positions = args.prompt_len + args.steps / 2
        flops = rows * (2 * weights + 4 * layers * heads * head_dim * positions)
        # What the step must read: every weight once, and each row's keys and values.
        kv = rows * positions * layers * 2 * kv_heads * head_dim
        nbytes = getattr(torch, args.dtype).itemsize * (weights + kv)
        step = statistics.median(times[2:])
        return {"ms": step * 1000, "gflops": flops / step / 1e9, "megabytes": nbytes / 1e6}

    return thread.submit(run).result()


def read_rate(torch) -> float:
    """GB/s at which these threads sum 512 MB: the memory's read rate, on 2 MB pages
    (`llava_serve.engine.memory`, this tree's: the GEMM worker always runs it), as the engine's
    weights and slots are."""
    from llava_serve.engine import memory

    buffer = memory.empty((128 << 20,), torch.float32)
    buffer.fill_(1.0)
    times = []
    for _ in range(8):
        start = time.perf_counter()
        buffer.sum()
        times.append(time.perf_counter() - start)
    return buffer.numel() * 4 / statistics.median(times[2:]) / 1e9


def measure(tree: Path, args, rows: int | None = None, gemm: bool = False, dtype: str | None = None) -> dict:
    cmd = [sys.executable, __file__, "--worker", "--preset", args.preset, "--threads", str(args.threads)]
    cmd += ["--dtype", dtype or args.dtype]
    cmd += ["--prompt-len", str(args.prompt_len), "--steps", str(args.steps)]
    cmd += ["--gemm"] if gemm else ["--rows", str(rows)]
    env = {**os.environ, "DECODE_STEP_TREE": str(tree)}
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="small")
    p.add_argument("--rows", type=int, nargs="+", default=[1, 4, 16, 32])
    p.add_argument("--prompt-len", type=int, default=256)
    p.add_argument("--steps", type=int, default=24)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument(
        "--dtype",
        default="float32",
        choices=["float32", "bfloat16"],
        help="the model's (model.dtype); the GEMM reference runs in it and in float32",
    )
    p.add_argument("--v2-commit", default="ee8ede0")
    p.add_argument("--out", default="benchmarks/results/decode_step.json")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--gemm", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print(json.dumps(worker(args)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        v2 = Path(tmp)
        archive = subprocess.run(
            [
                "git",
                "-C",
                str(ROOT),
                "archive",
                args.v2_commit,
                "llava_serve",
                "tests/support",
                "tests/__init__.py",
            ],
            check=True,
            capture_output=True,
        ).stdout
        archive_path = v2 / "v2.tar"
        archive_path.write_bytes(archive)
        with tarfile.open(archive_path) as tar:
            tar.extractall(v2, filter="data")
        sides = {"v2": v2, "v3": ROOT}
        got: dict[str, dict[int, list[dict]]] = {name: {r: [] for r in args.rows} for name in sides}
        gemm: list[dict] = []  # in the model's dtype
        fp32_gemm: list[dict] = []
        for r in range(args.rounds):
            for rows in args.rows:
                for name in rotated(list(sides), r):
                    got[name][rows].append(measure(sides[name], args, rows))
            gemm.append(measure(ROOT, args, gemm=True))
            if args.dtype != "float32":
                fp32_gemm.append(measure(ROOT, args, gemm=True, dtype="float32"))
    rates = {name: statistics.median(g["gemm"][name] for g in gemm) for name in gemm[0]["gemm"]}
    peak = max(rates.values())
    fp32_gemm = fp32_gemm or gemm
    fp32_peak = max(statistics.median(g["gemm"][name] for g in fp32_gemm) for name in fp32_gemm[0]["gemm"])
    read = statistics.median(g["read_gb_s"] for g in gemm)
    results = {
        "gemm_gflops": peak,
        "gemm_gflops_by_library": rates,
        "fp32_gemm_gflops": fp32_peak,
        "read_gb_s": read,
    }
    results["rows"] = []
    lines = []
    for rows in args.rows:
        v2_ms = statistics.median(m["ms"] for m in got["v2"][rows])
        v3_ms = statistics.median(m["ms"] for m in got["v3"][rows])
        v3_gflops = statistics.median(m["gflops"] for m in got["v3"][rows])
        v2_gflops = statistics.median(m["gflops"] for m in got["v2"][rows])
        # The step's reads at the memory's rate, against the step: how near the reads alone it is.
        floor_ms = got["v3"][rows][0]["megabytes"] / read
        # The share of the GEMM a step would reach if it took only that long (its arithmetic free):
        # no kernel's share of the GEMM can pass it on these cores.
        ceiling = v3_gflops * v3_ms / floor_ms / peak
        results["rows"].append(
            {
                "rows": rows,
                "v2_ms": v2_ms,
                "v3_ms": v3_ms,
                "v2_gflops": v2_gflops,
                "v3_gflops": v3_gflops,
                "reads_ms": floor_ms,
                "share_at_reads_alone": ceiling,
            }
        )
        lines.append(
            [
                rows,
                f"{v2_ms:.1f}",
                f"{v3_ms:.1f}",
                f"{v3_ms / v2_ms:.2f}x",
                f"{v3_gflops:.1f}",
                f"{v3_gflops / peak:.0%}",
                f"{floor_ms:.1f}",
                f"{floor_ms / v3_ms:.0%}",
                f"{ceiling:.0%}",
            ]
        )
        if args.dtype != "float32":
            lines[-1].append(f"{v3_gflops / fp32_peak:.0%}")
    by_library = ", ".join(f"{name} {rate:.1f}" for name, rate in rates.items())
    print(f"{args.dtype} GEMM 2048^3 on {args.threads} threads: {peak:.1f} GFLOP/s (faster of {by_library})")
    print(f"memory read rate (a 512 MB sum): {read:.1f} GB/s")
    headers = ["rows", "v2 ms", "v3 ms", "v3/v2", "v3 GFLOP/s", f"share of {args.dtype} GEMM"]
    headers += ["reads alone ms", "reads alone / v3", "share at reads alone"]
    if args.dtype != "float32":
        print(f"float32 GEMM 2048^3: {fp32_peak:.1f} GFLOP/s")
        headers.append("share of fp32 GEMM")
    print(table(headers, lines))
    save(results, args)


if __name__ == "__main__":
    main()
