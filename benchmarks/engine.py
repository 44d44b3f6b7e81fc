"""Engine vs the thread-per-request streamer baseline, side by side in one run, through Ray Serve.

    python benchmarks/engine.py                      # small preset, concurrency 1 4 16 32
    python benchmarks/engine.py --preset tiny --concurrency 1 4 --max-tokens 16   # a quick look

Both systems are deployed side by side as the same kind of Serve deployment (one replica, the
same CPUs), take turns at each concurrency level, and are driven through
`handle.options(stream=True).generate.remote(...)` with the same pre-tokenized prompts and
preprocessed images (each request a fresh image), greedy decoding, the same `max_tokens`.
Reported per concurrency: aggregate output tokens/s, TTFT p50/p99, time per output token
(TPOT) p50/p99, and the model replica's event-loop lag p99 (a 10 ms ticker in the replica).
Prints a table and writes JSON. Ratios are what to read: the machines are noisy.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
from PIL import Image

from benchmarks.report import pct, save
from llava_serve import checkpoint, images
from llava_serve.config import AppConfig
from llava_serve.engine.sampling import SamplingParams
from llava_serve.prompts import PromptBuilder, to_template_messages
from llava_serve.protocol import ChatMessage

QUESTIONS = [
    "What is in this image?",
    "Describe the picture in detail.",
    "Is there an animal here?",
    "What colours dominate?",
]


def make_inputs(config: AppConfig, n: int, max_tokens: int, seed: int = 0):
    """`n` distinct (prompt, image) pairs, preprocessed exactly as the serving path does."""
    adapter = checkpoint.load_adapter(config.model)
    builder = PromptBuilder(adapter, checkpoint.context_length(config.model))
    rng = np.random.RandomState(seed)
    out = []
    for i in range(n):
        pic = Image.fromarray(
            rng.randint(0, 256, (rng.randint(60, 300), rng.randint(60, 300), 3), dtype=np.uint8)
        )
        prepared = images.prepare(_png(pic), adapter, config.images)
        msg = ChatMessage(
            role="user",
            content=[
                {"type": "image_url", "image_url": {"url": "x"}},
                {"type": "text", "text": QUESTIONS[i % 4]},
            ],
        )
        out.append((builder.build(to_template_messages([msg]), max_tokens, [prepared.num_tokens]), prepared))
    return out


def _png(image: Image.Image) -> bytes:
    import io

    buf = io.BytesIO()
    image.save(buf, "PNG")
    return buf.getvalue()


async def one_request(handle, prompt, images: list, params) -> dict:
    """One streamed request through a handle: TTFT (first token at the caller), time per output
    token after it, tokens and the answer's text."""
    t0 = time.perf_counter()
    first = last = None
    tokens = 0
    text = ""
    async for out in handle.options(stream=True).generate.remote(prompt, params, *images):
        now = time.perf_counter()
        if out.completion_tokens > tokens:
            first = first or now
            last = now
        tokens = out.completion_tokens
        text += out.text
    return {"ttft": first - t0, "tpot": (last - first) / max(1, tokens - 1), "tokens": tokens, "text": text}


async def run_level(handle, inputs, concurrency: int, n_requests: int, params) -> dict:
    await handle.loop_lag.remote(reset=True)
    sem = asyncio.Semaphore(concurrency)

    async def bounded(i):
        async with sem:
            prompt, image = inputs[i]
            return await one_request(handle, prompt, [image], params)

    t0 = time.perf_counter()
    results = await asyncio.gather(*[bounded(i) for i in range(n_requests)])
    wall = time.perf_counter() - t0
    lag = await handle.loop_lag.remote(reset=True)
    ttft = [r["ttft"] * 1000 for r in results]
    tpot = [r["tpot"] * 1000 for r in results]
    return {
        "concurrency": concurrency,
        "requests": n_requests,
        "tokens": sum(r["tokens"] for r in results),
        "wall_s": round(wall, 2),
        "tok_s": round(sum(r["tokens"] for r in results) / wall, 1),
        "ttft_p50_ms": round(pct(ttft, 0.5), 1),
        "ttft_p99_ms": round(pct(ttft, 0.99), 1),
        "tpot_p50_ms": round(pct(tpot, 0.5), 1),
        "tpot_p99_ms": round(pct(tpot, 0.99), 1),
        "loop_lag_p99_ms": lag["p99"],
        "loop_lag_max_ms": lag["max"],
    }


async def image_cache_ttft(handle, inputs, params, repeats: int = 5) -> dict:
    """TTFT of a first sight of an image (miss) vs the same image again (hit), one at a time."""
    misses, hits = [], []
    for prompt, image in inputs[:repeats]:
        misses.append((await one_request(handle, prompt, [image], params))["ttft"] * 1000)
        hits.append((await one_request(handle, prompt, [image], params))["ttft"] * 1000)
    return {
        "miss_ttft_ms": round(statistics.median(misses), 1),
        "hit_ttft_ms": round(statistics.median(hits), 1),
    }


def deploy(kind: str, config: AppConfig):
    from ray import serve

    if kind == "engine":
        from deployments.model import LlavaModel as cls
    elif kind == "batch":
        from benchmarks.baseline_batch import BatchedModel as cls
    else:
        from benchmarks.baseline_streamer import StreamerModel as cls
    app = cls.options(**config.llava_model.to_serve_options()).bind(config)
    return serve.run(app, name=f"bench-{kind}", route_prefix=None)


async def bench(args) -> dict:
    import ray
    from ray import serve

    config = AppConfig.model_validate(
        {
            "model": {"name": "tiny", "tiny_preset": args.preset},
            "engine": {"max_batch_size": max(args.concurrency), "max_queue": 1024}
            | ({} if args.stream_interval_s is None else {"stream_interval_s": args.stream_interval_s}),
            "llava_model": {"num_cpus": args.model_cpus, "max_ongoing_requests": 1024},
        }
    )
    checkpoint.resolve_path(config.model)  # build the checkpoint before timing anything
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0.0)
    ray.init(num_cpus=len(args.systems) * args.model_cpus + 1, include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": 8299})
    results: dict = {"preset": args.preset, "max_tokens": args.max_tokens, "systems": {}}
    sizes = [max(args.min_requests, c * args.requests_per_slot) for c in args.concurrency]
    # Every request carries an image neither system has seen, so the engine's vision cache
    # never helps it here; the cache gets its own measurement below.
    inputs = make_inputs(config, sum(sizes) + 2, args.max_tokens, seed=1)
    handles = {kind: deploy(kind, config) for kind in args.systems}
    for kind, handle in handles.items():
        await asyncio.gather(*[one_request(handle, p, [im], params) for p, im in inputs[-2:]])  # warm-up
        results["systems"][kind] = {"levels": []}
    start = 0
    for c, n in zip(args.concurrency, sizes, strict=True):
        # Both systems stay deployed and take turns level by level, so drift in the machine's
        # speed lands on both rather than on whichever ran second.
        for kind, handle in handles.items():
            level = await run_level(handle, inputs[start : start + n], c, n, params)
            results["systems"][kind]["levels"].append(level)
            print(f"  {kind:8s} c={c:<3d} {level}", flush=True)
        start += n
    if "engine" in handles:
        fresh = make_inputs(config, 5, args.max_tokens, seed=7)
        results["systems"]["engine"]["image_cache"] = await image_cache_ttft(handles["engine"], fresh, params)
    for kind in handles:
        serve.delete(f"bench-{kind}")
    serve.shutdown()
    ray.shutdown()
    return results


def table(results: dict) -> str:
    base = {lv["concurrency"]: lv for lv in results["systems"]["baseline"]["levels"]}
    rows = [
        "| concurrency | system | tok/s | ratio | TTFT p50 / p99 ms | TPOT p50 / p99 ms | loop lag p99 ms |",
        "|---|---|---|---|---|---|---|",
    ]
    for kind in results["systems"]:
        for lv in results["systems"][kind]["levels"]:
            ratio = lv["tok_s"] / base[lv["concurrency"]]["tok_s"]
            rows.append(
                f"| {lv['concurrency']} | {kind} | {lv['tok_s']} | {ratio:.2f}x | "
                f"{lv['ttft_p50_ms']} / {lv['ttft_p99_ms']} | {lv['tpot_p50_ms']} / {lv['tpot_p99_ms']} | "
                f"{lv['loop_lag_p99_ms']} |"
            )
    cache = results["systems"].get("engine", {}).get("image_cache")
    if cache:
        miss, hit = cache["miss_ttft_ms"], cache["hit_ttft_ms"]
        rows.append(f"\nimage cache (engine, c=1): TTFT miss {miss} ms, hit {hit} ms")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", default="small", choices=["tiny", "small"])
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16, 32])
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument(
        "--requests-per-slot", type=int, default=2, help="requests per level = this x concurrency"
    )
    parser.add_argument("--min-requests", type=int, default=10)
    parser.add_argument(
        "--model-cpus", type=int, default=2, help="num_cpus of the model replica (both systems)"
    )
    parser.add_argument(
        "--systems",
        nargs="+",
        default=["baseline", "batch", "engine"],
        choices=["baseline", "batch", "engine"],
        help="baseline: the documented thread + TextIteratorStreamer pattern; batch: the documented "
        "@serve.batch streaming pattern; engine: llava-serve's model deployment",
    )
    parser.add_argument(
        "--stream-interval-s", type=float, default=None, help="the engine's engine.stream_interval_s"
    )
    parser.add_argument("--out", default="benchmarks/results/engine.json")
    args = parser.parse_args()
    results = asyncio.run(bench(args))
    print(table(results))
    save(results, args)


if __name__ == "__main__":
    main()
