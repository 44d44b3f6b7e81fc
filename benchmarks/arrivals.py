"""Open-loop arrivals over HTTP: requests arrive on a fixed, seeded schedule whatever the server
does, with mixed answer lengths; what users see is TTFT and end-to-end latency at the client.

    python benchmarks/arrivals.py                      # small preset, 2 requests/s for 60 s

Two copies of the whole app run side by side (ingress, preprocessors, tokenizer, model; one model
replica each): the engine configured as v1 behaved (every admitted prompt whole in one step, no
prefix cache) and with v2's defaults. Beside them, Ray Serve's streaming tutorial's `@serve.batch`
chatbot (`benchmarks/baseline_http.py:BatchChatbot`, static batches with a 100 ms wait, the same
batch size) is the baseline. They take turns on the same schedule. Each request: one fresh image
(a random PNG as a data URI), a question, `max_tokens` uniform in 16-128, greedy, streamed.
TTFT = the first text at the client (our first content chunk; the tutorial's first non-empty
chunk); end-to-end = the end of the response. Every side uses a batch size of 32 (`--batch`) and
`--model-cpus` CPUs for its model replica. Prints a table and writes JSON.
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

from benchmarks.prefill import V1_SETTINGS
from benchmarks.report import pct, save
from llava_serve.config import AppConfig
from llava_serve.loadgen import random_png

SIDES = {
    "v1 settings": V1_SETTINGS,
    "v2": {},
}
TUTORIAL = "@serve.batch"
QUESTIONS = ["What is in this image?", "Describe the picture in detail.", "What colours dominate?"]


def schedule(rate: float, duration_s: float, seed: int) -> list[tuple[float, dict]]:
    """(arrival time, body): Poisson arrivals at `rate`, the same for every side."""
    rng = random.Random(seed)
    out, t = [], 0.0
    while (t := t + rng.expovariate(rate)) < duration_s:
        body = {
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "image_url", "image_url": {"url": random_png(rng)}},
                        {"type": "text", "text": rng.choice(QUESTIONS)},
                    ],
                }
            ],
            "max_tokens": rng.randint(16, 128),
            "temperature": 0,
            "stream": True,
        }
        out.append((t, body))
    return out


async def one(client: httpx.AsyncClient, url: str, body: dict) -> dict:
    start = time.perf_counter()
    first, tokens, ok = None, 0, False
    async with client.stream("POST", url, json=body) as r:
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                ok = r.status_code == 200
                break
            event = json.loads(line[6:])
            for choice in event.get("choices", []):
                if choice["delta"].get("content"):
                    first = first or time.perf_counter()
                    tokens += 1
    end = time.perf_counter()
    return {"ok": ok and first is not None, "ttft": (first or end) - start, "e2e": end - start}


async def one_tutorial(client: httpx.AsyncClient, url: str, body: dict) -> dict:
    """The same request to the tutorial's chatbot, which takes the image, the question and
    `max_tokens` as JSON and streams plain text."""
    content = body["messages"][0]["content"]
    req = {"image": content[0]["image_url"]["url"], "question": content[1]["text"]}
    start = time.perf_counter()
    first = None
    async with client.stream("POST", url, json=req | {"max_tokens": body["max_tokens"]}) as r:
        async for chunk in r.aiter_text():
            if chunk:
                first = first or time.perf_counter()
    end = time.perf_counter()
    return {
        "ok": r.status_code == 200 and first is not None,
        "ttft": (first or end) - start,
        "e2e": end - start,
    }


async def run(url: str, plan: list[tuple[float, dict]], call=one) -> dict:
    async with httpx.AsyncClient(timeout=300, limits=httpx.Limits(max_connections=None)) as client:
        start = time.perf_counter()

        async def at(t: float, body: dict) -> dict:
            await asyncio.sleep(max(0.0, t - (time.perf_counter() - start)))
            return await call(client, url, body)

        results = await asyncio.gather(*[at(t, b) for t, b in plan])
        wall = time.perf_counter() - start
    done = [r for r in results if r["ok"]]
    ttft = [r["ttft"] * 1000 for r in done]
    e2e = [r["e2e"] * 1000 for r in done]
    return {
        "requests": len(plan),
        "complete": len(done),
        "offered_s": round(plan[-1][0], 1),
        "wall_s": round(wall, 1),
        "completion_tokens": sum(b["max_tokens"] for _, b in plan),
        "ttft_p50_ms": round(pct(ttft, 0.5)),
        "ttft_p99_ms": round(pct(ttft, 0.99)),
        "e2e_p50_ms": round(pct(e2e, 0.5)),
        "e2e_p99_ms": round(pct(e2e, 0.99)),
    }


async def bench(args) -> dict:
    import ray
    from ray import serve

    from benchmarks.baseline_http import BatchChatbot
    from deployments.app import build

    ray.init(num_cpus=8, include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": args.port})
    tutorial = BatchChatbot.options(
        ray_actor_options={"num_cpus": args.model_cpus}, max_ongoing_requests=1024
    ).bind(AppConfig.model_validate({"model": {"name": "tiny", "tiny_preset": args.preset}}), args.batch)
    serve.run(tutorial, name="arrivals-batch", route_prefix="/batch")
    for i, engine in enumerate(SIDES.values()):
        config = AppConfig.model_validate(
            {
                "model": {"name": "tiny", "tiny_preset": args.preset},
                "engine": {"max_batch_size": args.batch, **engine},
                "llava_model": {"num_cpus": args.model_cpus},
            }
        )
        serve.run(build(config), name=f"arrivals-{i}", route_prefix=f"/side{i}")
    sides = {
        side: (f"http://127.0.0.1:{args.port}/side{i}/v1/chat/completions", one)
        for i, side in enumerate(SIDES)
    }
    sides[TUTORIAL] = (f"http://127.0.0.1:{args.port}/batch/", one_tutorial)
    warm = schedule(4.0, 2.0, seed=999)
    results: dict = {"preset": args.preset, "rate": args.rate, "sides": {s: [] for s in sides}}
    for url, call in sides.values():
        await run(url, warm, call)
    for r in range(args.rounds):
        plan = schedule(args.rate, args.duration, seed=args.seed + r)
        for side, (url, call) in sides.items():  # the same schedule on each side, in turn
            level = await run(url, plan, call)
            results["sides"][side].append(level)
            print(f"  {side}: {level}", flush=True)
    serve.shutdown()
    ray.shutdown()
    return results


def table(results: dict) -> str:
    rows = [
        "| side | round | complete / requests | tokens/s offered | wall s | TTFT p50 / p99 ms "
        "| e2e p50 / p99 ms |",
        "|---|---|---|---|---|---|---|",
    ]
    for side, levels in results["sides"].items():
        for r, lv in enumerate(levels, 1):
            rows.append(
                f"| {side} | {r} | {lv['complete']} / {lv['requests']} | "
                f"{lv['completion_tokens'] / lv['offered_s']:.1f} | {lv['wall_s']} | "
                f"{lv['ttft_p50_ms']} / {lv['ttft_p99_ms']} | {lv['e2e_p50_ms']} / {lv['e2e_p99_ms']} |"
            )
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", default="small", choices=["tiny", "small"])
    parser.add_argument("--rate", type=float, default=2.0, help="requests per second")
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of arrivals per run")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--batch", type=int, default=32, help="batch size, every side")
    parser.add_argument("--model-cpus", type=float, default=1.0, help="llava_model.num_cpus (torch threads)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--port", type=int, default=8321)
    parser.add_argument("--out", default="benchmarks/results/arrivals.json")
    args = parser.parse_args()
    results = asyncio.run(bench(args))
    print(table(results))
    save(results, args)


if __name__ == "__main__":
    main()
