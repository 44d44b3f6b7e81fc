"""llava-serve against Ray Serve's streaming tutorial, all over HTTP, side by side in one run.

    python benchmarks/over_http.py                 # small preset: c=1 (10 requests), c=16 (32 requests)
    python benchmarks/over_http.py --levels 16:32 --rounds 3

Three apps run in one Serve instance and take turns level by level, round by round (the order
rotated each round), on the same requests:
- `llava-serve`: the whole app (ingress, image preprocessor, tokenizer, model), driven through
  `/v1/chat/completions` with the image as a data URI, streamed as SSE;
- `@serve.batch`: the tutorial's batched chatbot (`benchmarks/baseline_http.py:BatchChatbot`);
- `thread`: the tutorial's basic chatbot, a thread + `TextIteratorStreamer` per request
  (`ThreadChatbot`).
Each request: a fresh random image, one of four questions, greedy, `--max-tokens` new tokens.
Every side is measured the same way at the client: TTFT is the arrival of the first non-empty
text; time per output token (TPOT) is (last text - first text) / (tokens - 1); tok/s is the
level's tokens over its wall time. Tokens: llava-serve's come from the stream's `usage`; the
tutorial's streams send no count, so theirs are `max_tokens` each (what their `generate` runs
for; if our engine stops at end-of-sequence sooner, this favours the baselines). The model
replica of every side gets `--model-cpus` CPUs (torch threads). Prints a table, writes JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import httpx

from benchmarks.engine import QUESTIONS
from benchmarks.report import pct, save
from llava_serve import checkpoint
from llava_serve.config import AppConfig
from llava_serve.loadgen import random_png


def requests(n: int, max_tokens: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    questions = [QUESTIONS[i % len(QUESTIONS)] for i in range(n)]
    return [{"image": random_png(rng), "question": q, "max_tokens": max_tokens} for q in questions]


def openai_body(req: dict) -> dict:
    content = [
        {"type": "image_url", "image_url": {"url": req["image"]}},
        {"type": "text", "text": req["question"]},
    ]
    return {
        "messages": [{"role": "user", "content": content}],
        "max_tokens": req["max_tokens"],
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }


async def ours(client: httpx.AsyncClient, url: str, req: dict) -> dict:
    start = time.perf_counter()
    first = last = None
    tokens = 0
    async with client.stream("POST", url, json=openai_body(req)) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if event.get("usage"):
                tokens = event["usage"]["completion_tokens"]
            if any(c["delta"].get("content") for c in event.get("choices", [])):
                last = time.perf_counter()
                first = first or last
    return {"start": start, "first": first, "last": last, "tokens": tokens}


async def tutorial(client: httpx.AsyncClient, url: str, req: dict) -> dict:
    start = time.perf_counter()
    first = last = None
    async with client.stream("POST", url, json=req) as r:
        r.raise_for_status()
        async for chunk in r.aiter_text():
            if chunk:
                last = time.perf_counter()
                first = first or last
    return {"start": start, "first": first, "last": last, "tokens": req["max_tokens"]}


async def level(client, call, url: str, reqs: list[dict], concurrency: int) -> dict:
    sem = asyncio.Semaphore(concurrency)

    async def bounded(req):
        async with sem:
            return await call(client, url, req)

    t0 = time.perf_counter()
    results = await asyncio.gather(*[bounded(r) for r in reqs])
    wall = time.perf_counter() - t0
    ttft = [(r["first"] - r["start"]) * 1000 for r in results]
    tpot = [(r["last"] - r["first"]) * 1000 / max(1, r["tokens"] - 1) for r in results]
    tokens = sum(r["tokens"] for r in results)
    return {
        "concurrency": concurrency,
        "requests": len(reqs),
        "tokens": tokens,
        "wall_s": round(wall, 2),
        "tok_s": round(tokens / wall, 1),
        "ttft_p50_ms": round(pct(ttft, 0.5)),
        "ttft_p99_ms": round(pct(ttft, 0.99)),
        "tpot_p50_ms": round(pct(tpot, 0.5), 1),
        "tpot_p99_ms": round(pct(tpot, 0.99), 1),
    }


async def bench(args) -> dict:
    import ray
    from ray import serve

    from benchmarks.baseline_http import BatchChatbot, ThreadChatbot
    from deployments.app import build

    config = AppConfig.model_validate(
        {
            "model": {"name": "tiny", "tiny_preset": args.preset},
            "engine": {"max_batch_size": 16},
            "llava_model": {"num_cpus": args.model_cpus},
        }
    )
    checkpoint.resolve_path(config.model)  # build the checkpoint before timing anything
    ray.init(num_cpus=3 * args.model_cpus + 2, include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": args.port})
    model_options = {"ray_actor_options": {"num_cpus": args.model_cpus}, "max_ongoing_requests": 1024}
    serve.run(build(config), name="ours", route_prefix="/ours")
    serve.run(BatchChatbot.options(**model_options).bind(config), name="batch", route_prefix="/batch")
    serve.run(ThreadChatbot.options(**model_options).bind(config), name="thread", route_prefix="/thread")
    base = f"http://127.0.0.1:{args.port}"
    sides = {
        "llava-serve": (ours, f"{base}/ours/v1/chat/completions"),
        "@serve.batch": (tutorial, f"{base}/batch/"),
        "thread": (tutorial, f"{base}/thread/"),
    }
    results: dict = {"preset": args.preset, "max_tokens": args.max_tokens, "sides": {s: [] for s in sides}}
    levels = [tuple(int(x) for x in spec.split(":")) for spec in args.levels]
    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=None)) as client:
        for call, url in sides.values():  # warm-up: two requests each
            await asyncio.gather(*[call(client, url, r) for r in requests(2, 8, seed=999)])
        seed = 0
        for r in range(args.rounds):
            for concurrency, n in levels:
                seed += 1
                reqs = requests(n, args.max_tokens, seed)
                order = list(sides)[r % 3 :] + list(sides)[: r % 3]
                for side in order:
                    call, url = sides[side]
                    lv = await level(client, call, url, reqs, concurrency) | {"round": r + 1}
                    results["sides"][side].append(lv)
                    print(f"  round {r + 1} {side:13s} {lv}", flush=True)
    serve.shutdown()
    ray.shutdown()
    return results


def table(results: dict) -> str:
    rows = [
        "| round | concurrency (requests) | side | tok/s | vs @serve.batch | vs thread | TTFT p50 / p99 ms "
        "| TPOT p50 / p99 ms |",
        "|---|---|---|---|---|---|---|---|",
    ]
    runs = results["sides"]
    for i in range(len(runs["llava-serve"])):
        for side in runs:
            x = runs[side][i]
            batch, thread = runs["@serve.batch"][i]["tok_s"], runs["thread"][i]["tok_s"]
            rows.append(
                f"| {x['round']} | {x['concurrency']} ({x['requests']}) | {side} | {x['tok_s']} | "
                f"{x['tok_s'] / batch:.2f}x | {x['tok_s'] / thread:.2f}x | "
                f"{x['ttft_p50_ms']} / {x['ttft_p99_ms']} | {x['tpot_p50_ms']} / {x['tpot_p99_ms']} |"
            )
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", default="small", choices=["tiny", "small"])
    parser.add_argument(
        "--levels", nargs="+", default=["1:10", "16:32"], help="concurrency:requests, in turn"
    )
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--model-cpus", type=int, default=2, help="num_cpus of every side's model replica")
    parser.add_argument("--port", type=int, default=8331)
    parser.add_argument("--out", default="benchmarks/results/over_http.json")
    args = parser.parse_args()
    results = asyncio.run(bench(args))
    print(table(results))
    save(results, args)


if __name__ == "__main__":
    main()
