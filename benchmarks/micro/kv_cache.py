"""The runner with slot KV (v2) against the left-padded DynamicCache runner it replaced (v1),
side by side in one run, on the same weights and prompts.

    python benchmarks/micro/kv_cache.py                 # small preset, 16 rows, 64 decode steps
    python benchmarks/micro/kv_cache.py --v1-commit 86f0b57

v1 is the runner as of `--v1-commit`, loaded from git into this process (benchmark-only: it is not
in the serving path any more). Both get the same text prompts (no images, so only the KV cache
differs): 16 rows of 100-600 tokens prefilled together, then decode steps in which, every
`--churn` steps, the oldest row leaves and a fresh one joins (as in a live server). Reported per
side: median decode step, median join (prefill + merge), and the bytes the KV cache holds.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch

from benchmarks.micro.engine_v1 import kv_bytes
from benchmarks.report import save
from llava_serve.config import ModelConfig
from llava_serve.models import checkpoint, tiny
from tests.support.probes import WholeRunner

ROOT = Path(__file__).resolve().parents[2]


def v1_runner_class(commit: str):
    source = subprocess.run(
        ["git", "-C", str(ROOT), "show", f"{commit}:llava_serve/runner.py"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    # Its one import of a moved module: `PreparedImage` lives in `llava_serve.types` now.
    source = source.replace(
        "from llava_serve.images import PreparedImage", "from llava_serve.types import PreparedImage"
    )
    path = Path("/tmp") / f"llava_runner_v1_{commit}.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("llava_runner_v1", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module.ModelRunner


def run(runner, prompts, steps: int, churn: int) -> dict:
    """Prefill all, then decode `steps` steps; every `churn` steps the oldest row leaves and the
    next prompt joins."""
    joins, decodes = [], []
    seq = 0

    def join(batch):
        nonlocal seq
        start = time.perf_counter()
        ids = list(range(seq, seq + len(batch)))
        seq += len(batch)
        prefill = getattr(runner, "prefill_whole", None) or runner.prefill  # v2 (WholeRunner) or v1
        logits = prefill(ids, [(p, []) for p in batch])
        runner.commit(logits.argmax(-1).tolist())
        joins.append(time.perf_counter() - start)

    join(prompts[:16])
    waiting = list(prompts[16:])
    peak = kv_bytes(runner)
    for step in range(steps):
        start = time.perf_counter()
        logits = runner.decode()
        runner.set_last_tokens(logits.argmax(-1).tolist())
        decodes.append(time.perf_counter() - start)
        peak = max(peak, kv_bytes(runner))
        if churn and step % churn == churn - 1 and waiting:
            if hasattr(runner, "rows"):  # v2 and later: rows are slots
                runner.keep(runner.rows[1:])
            else:
                oldest = min(runner.batch.seq_ids)
                runner.keep(set(runner.batch.seq_ids) - {oldest})
            join([waiting.pop(0)])
    runner.keep(set())
    return {
        "decode_ms": statistics.median(decodes) * 1e3,
        "join_ms": statistics.median(joins[1:] or joins) * 1e3,
        "kv_bytes": peak,
    }


def main(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    model = checkpoint.load_model(ModelConfig(name=str(tiny.ensure(args.preset))))
    gen = torch.Generator().manual_seed(0)
    vocab = model.config.get_text_config().vocab_size
    prompts = [
        torch.randint(10, vocab, (int(n),), generator=gen).tolist()
        for n in torch.randint(100, 600, (48,), generator=gen)
    ]
    sides = {
        "v1 DynamicCache": v1_runner_class(args.v1_commit)(model, 0),
        "v2 slot KV": WholeRunner(model, 0, 16),
    }
    results: dict[str, list[dict]] = {name: [] for name in sides}
    with torch.inference_mode():
        for _ in range(args.rounds):
            for name, runner in sides.items():
                results[name].append(run(runner, prompts, args.steps, args.churn))
    print(
        f"\n{args.preset} preset, 16 rows of 100-600 prompt tokens, {args.steps} decode steps, "
        f"a row replaced every {args.churn}"
    )
    print(f"{'side':<18}{'decode step ms':>16}{'join ms':>10}{'KV MiB (peak)':>15}")
    out = {}
    base = statistics.median(r["decode_ms"] for r in results["v1 DynamicCache"])
    for name, rounds in results.items():
        decode = statistics.median(r["decode_ms"] for r in rounds)
        join = statistics.median(r["join_ms"] for r in rounds)
        mib = max(r["kv_bytes"] for r in rounds) / 2**20
        out[name] = {
            "rounds": rounds,
            "decode_ms": decode,
            "join_ms": join,
            "kv_mib": mib,
            "decode_vs_v1": decode / base,
        }
        print(f"{name:<18}{decode:>16.1f}{join:>10.1f}{mib:>15.1f}   ({decode / base:.2f}x v1's step)")
    return out


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", default="small", choices=sorted(tiny.PRESETS))
    parser.add_argument("--v1-commit", default="86f0b57")
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--churn", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="benchmarks/results/kv_cache.json")
    args = parser.parse_args()
    save(main(args), args)
