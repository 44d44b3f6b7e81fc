"""Engine v1 against engine v2, whole engines, side by side in one run: tok/s, TTFT, time per
output token, and the bytes the KV cache and the process hold.

    python benchmarks/micro/engine_v1.py                        # small preset, 48 image requests at c=16
    python benchmarks/micro/engine_v1.py --rounds 3 --v1-commit 86f0b57

v1 is the engine as of `--v1-commit` (the left-padded `DynamicCache` engine before the
`llava_serve/engine/` package), exported from git into a temporary tree; v2 is this tree. Each
side runs in a fresh process of its own (so peak RSS is that engine's alone), the sides take
turns round by round with the order swapped each round, and both get the same requests: the
prompts and preprocessed images (`write_inputs`), each with its own image, greedy,
driven through `Engine.generate` at `--concurrency` with no stream interval on either side (the
engines, not Serve's messaging, are compared). KV bytes: v1's peak over its steps (it grows with
batch x longest row and is copied on joins), v2's slots (allocated once at start, as sized by
`engine.kv_cache_bytes`, or the whole context per slot when unset). `--kv-cache-bytes` and
`--max-step-tokens` set v2's knobs (its defaults otherwise).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import pickle
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from benchmarks.report import commit, pct, save  # noqa: E402  (imports nothing of llava_serve)


def export_tree(commit: str) -> Path:
    """The commit's `llava_serve/` package in a directory of its own."""
    out = Path(tempfile.gettempdir()) / f"llava-serve-{commit}"
    if not (out / "llava_serve").is_dir():
        out.mkdir(parents=True, exist_ok=True)
        archive = subprocess.run(
            ["git", "-C", str(ROOT), "archive", commit, "llava_serve"], capture_output=True, check=True
        ).stdout
        subprocess.run(["tar", "-x", "-C", str(out)], input=archive, check=True)
    return out


# -- worker: one engine, in its own process ------------------------------------------------


def worker(tree: str, inputs_path: str, concurrency: int, max_tokens: int, v2: dict) -> dict:
    sys.path.insert(0, tree)
    import torch

    from llava_serve.config import EngineConfig, ModelConfig
    from llava_serve.engine import Engine

    try:
        from llava_serve.types import PreparedImage
    except ImportError:  # before the package split
        from llava_serve.images import PreparedImage

    try:
        from llava_serve.engine.sampling import SamplingParams
    except ImportError:  # v1: a module, not a package
        from llava_serve.sampling import SamplingParams

    torch.set_num_threads(2)
    fields = {f.name for f in dataclasses.fields(PreparedImage)}
    settings = {"max_batch_size": concurrency, "max_queue": 1024, "stream_interval_s": 0.0}
    if "max_stream_messages_per_s" in EngineConfig.model_fields:
        settings["max_stream_messages_per_s"] = 0
    if "max_step_tokens" in EngineConfig.model_fields:  # v2
        settings |= v2
    engine = Engine.load(ModelConfig(name="tiny", tiny_preset="small"), EngineConfig(**settings))
    rss_loaded = _rss()
    requests = []
    for ids, image in pickle.loads(Path(inputs_path).read_bytes()):
        if "size" not in fields:  # v1 took one [3, H, W] tile per image
            image["pixel_values"] = image["pixel_values"][0]
        requests.append((ids, PreparedImage(**{k: v for k, v in image.items() if k in fields})))

    kv_peak = 0
    step = engine._step

    def measured_step(*args):
        nonlocal kv_peak
        try:
            return step(*args)
        finally:
            kv_peak = max(kv_peak, kv_bytes(engine.runner))

    engine._step = measured_step
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0)

    async def one(ids, image) -> dict:
        t0 = time.perf_counter()
        first = last = None
        tokens = 0
        async for out in engine.generate(ids, [image], params):
            now = time.perf_counter()
            if out.completion_tokens > tokens:
                first, last = first or now, now
            tokens = out.completion_tokens
        return {"ttft": first - t0, "tpot": (last - first) / max(1, tokens - 1), "tokens": tokens}

    async def run() -> dict:
        await asyncio.gather(*(one(ids, im) for ids, im in requests[-2:]))  # warm-up
        sem = asyncio.Semaphore(concurrency)

        async def bounded(ids, image):
            async with sem:
                return await one(ids, image)

        t0 = time.perf_counter()
        results = await asyncio.gather(*(bounded(ids, im) for ids, im in requests[:-2]))
        wall = time.perf_counter() - t0
        await engine.shutdown()
        return {
            "tok_s": sum(r["tokens"] for r in results) / wall,
            "ttft_p50_ms": pct([r["ttft"] * 1e3 for r in results], 0.5),
            "ttft_p99_ms": pct([r["ttft"] * 1e3 for r in results], 0.99),
            "tpot_p50_ms": pct([r["tpot"] * 1e3 for r in results], 0.5),
        }

    out = asyncio.run(run())
    out |= {
        "kv_peak_bytes": kv_peak,
        "rss_loaded_bytes": rss_loaded,
        "rss_peak_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }
    return out


def _rss() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1]) * resource.getpagesize()


def kv_bytes(runner) -> int:
    """Bytes the runner's KV cache holds now: v2's slots, or v1's batch `DynamicCache`."""
    if hasattr(runner, "kv"):  # v2: the slots
        return runner.kv.nbytes
    if runner.batch is None:  # v1: whatever the batch's DynamicCache holds now
        return 0
    layers = runner.batch.cache.layers
    return sum(t.numel() * t.element_size() for layer in layers for t in (layer.keys, layer.values))


# -- parent: inputs, rounds, table ----------------------------------------------------------


def write_inputs(n: int, max_tokens: int, path: Path) -> None:
    """`n` requests (a random picture and a question each) as the serving path prepares them,
    written as plain values so that either tree can read them."""
    import numpy as np

    from benchmarks.engine import image_prompt
    from benchmarks.report import QUESTIONS
    from llava_serve.config import ModelConfig
    from llava_serve.inputs.prompts import PromptBuilder
    from llava_serve.models import checkpoint

    model = ModelConfig(name="tiny", tiny_preset="small")
    adapter = checkpoint.load_adapter(model)
    builder = PromptBuilder(adapter, checkpoint.context_length(model))
    rng, plain = np.random.RandomState(3), []
    for i in range(n):
        ids, [image] = image_prompt(builder, adapter, rng, QUESTIONS[i % 2], max_tokens)
        plain.append((ids, {f.name: getattr(image, f.name) for f in dataclasses.fields(image)}))
    path.write_bytes(pickle.dumps(plain))


def side(name: str, tree: Path, inputs: Path, args) -> dict:
    cmd = [sys.executable, __file__, "--worker", str(tree), "--inputs", str(inputs)]
    cmd += ["--concurrency", str(args.concurrency), "--max-tokens", str(args.max_tokens)]
    if args.kv_cache_bytes:
        cmd += ["--kv-cache-bytes", str(args.kv_cache_bytes)]
    if args.max_step_tokens:
        cmd += ["--max-step-tokens", str(args.max_step_tokens)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{name} failed:\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    print(f"  {name}: {result}", flush=True)
    return result


def bench(args) -> dict:
    trees = {"v1": export_tree(args.v1_commit), "v2": ROOT}
    with tempfile.TemporaryDirectory() as tmp:
        inputs = Path(tmp) / "inputs.pkl"
        write_inputs(args.requests + 2, args.max_tokens, inputs)
        rounds: dict[str, list[dict]] = {"v1": [], "v2": []}
        for r in range(args.rounds):
            order = ["v1", "v2"] if r % 2 == 0 else ["v2", "v1"]
            for name in order:
                rounds[name].append(side(name, trees[name], inputs, args))
    summary = {}
    for name, runs in rounds.items():
        summary[name] = {k: statistics.median(run[k] for run in runs) for k in runs[0]}
    return {"v1_commit": args.v1_commit, "v2_commit": commit(), "rounds": rounds, "median": summary}


def table(results: dict, args) -> str:
    v1, v2 = results["median"]["v1"], results["median"]["v2"]
    mib = 2**20
    rows = [
        f"{args.requests} image requests, concurrency {args.concurrency}, {args.max_tokens} tokens, "
        f"small preset; medians of {args.rounds} rounds; v2's kv_cache_bytes "
        f"{args.kv_cache_bytes or 'unset'}, max_step_tokens {args.max_step_tokens or 'default'}",
        "| engine | tok/s | TTFT p50 / p99 ms | TPOT p50 ms | KV MiB | RSS MiB loaded / peak |",
        "|---|---|---|---|---|---|",
    ]
    for name, m in (("v1 (" + results["v1_commit"] + ")", v1), ("v2", v2)):
        rows.append(
            f"| {name} | {m['tok_s']:.1f} | {m['ttft_p50_ms']:.0f} / {m['ttft_p99_ms']:.0f} | "
            f"{m['tpot_p50_ms']:.1f} | {m['kv_peak_bytes'] / mib:.0f} | "
            f"{m['rss_loaded_bytes'] / mib:.0f} / {m['rss_peak_bytes'] / mib:.0f} |"
        )
    rows.append(f"\nv2 / v1 tok/s: {v2['tok_s'] / v1['tok_s']:.2f}x")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--v1-commit", default="86f0b57")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--requests", type=int, default=48)
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument(
        "--kv-cache-bytes", type=int, default=None, help="v2's engine.kv_cache_bytes (default: unset)"
    )
    parser.add_argument(
        "--max-step-tokens", type=int, default=None, help="v2's engine.max_step_tokens (default: its default)"
    )
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--inputs", help=argparse.SUPPRESS)
    parser.add_argument("--out", default="benchmarks/results/engines.json")
    args = parser.parse_args()
    if args.worker:
        v2 = {"kv_cache_bytes": args.kv_cache_bytes, "max_step_tokens": args.max_step_tokens}
        v2 = {k: v for k, v in v2.items() if v}
        result = worker(args.worker, args.inputs, args.concurrency, args.max_tokens, v2)
        print(json.dumps(result))
        return
    results = bench(args)
    print(table(results, args))
    save(results, args)


if __name__ == "__main__":
    main()
