"""Over HTTP, the way a user's client sees a server: one driver for every side, in one run.

    python benchmarks/serve.py sweep                  # llava-serve vs the tutorial's chatbots, c=1, c=16
    python benchmarks/serve.py arrivals               # open loop: engine v1 settings, v2, @serve.batch
    python benchmarks/serve.py burst --requests 300   # against a running server (default :8000)
    python benchmarks/serve.py load                   # closed loop with cancellations, then 3x overload
    python benchmarks/serve.py sweep --url vllm=http://127.0.0.1:8100 --launch llava-serve \\
        --prompt text --served-model NAME            # next to another OpenAI-compatible server
    python benchmarks/serve.py sweep --launch llava-serve \\
        --variant "budget 30:engine.max_stream_messages_per_s=30"   # two settings side by side

Sides are `--launch`ed together in one local Ray Serve instance (`llava-serve`, `llava-serve/v1`:
the engine with v1's settings, and the Serve streaming tutorial's chatbots from
`benchmarks/baselines.py`: `thread`, `batch`) or reached by `--url NAME=BASE_URL` (anything that
serves `/v1/chat/completions`). They take turns on the same requests, the order rotated each round,
each turn starting once the machine is quiet (`settle`), and every side is measured the same way
at the client: TTFT is the arrival of the first non-empty
text; the chunk gap is the time between chunks with text; TPOT is (last text - first text) /
(tokens - 1); tok/s is a level's tokens over its wall time. Tokens come from the stream's `usage`
where the side reports it; the tutorial's streams send no count, so theirs are `max_tokens` each
(what their `generate` runs for; an engine that stops at end-of-sequence sooner is the one this
disfavours). Prints a table, writes JSON with the commit it ran on.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Launched sides run in Ray Serve's high-throughput mode, as `make serve` and `llava-serve serve`
# run the app: a streamed message costs a hop ~7x less CPU there (benchmarks/micro/serve_hop.py).
# Read when Ray starts; `RAY_SERVE_THROUGHPUT_OPTIMIZED=0` measures Serve's default mode.
os.environ.setdefault("RAY_SERVE_THROUGHPUT_OPTIMIZED", "1")

import httpx
import yaml

from benchmarks.report import QUESTIONS, V1_SETTINGS, WORDS, pct, rotated, save, table
from tests.support.load import closed_loop, open_loop, random_png, started_together


@dataclass
class Side:
    name: str
    url: str  # what a request is posted to
    protocol: str  # "openai" (SSE chat completions) or "text" (the tutorial's plain-text stream)


# -- requests ---------------------------------------------------------------------------------


def requests(args, n: int, seed: int | str, max_tokens: int | None = None) -> list[dict]:
    """`n` requests: a fresh random image and a question, or (`--prompt text`) a text prompt of
    `--words` random words; greedy, `max_tokens` (or uniform in `--max-tokens-range`) each."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        if args.prompt == "image":
            req = {"image": random_png(rng), "question": QUESTIONS[i % len(QUESTIONS)]}
        else:
            req = {"image": None, "question": " ".join(rng.choice(WORDS) for _ in range(args.words)) + "."}
        req["max_tokens"] = max_tokens or rng.randint(*args.max_tokens_range)
        out.append(req)
    return out


def openai_body(req: dict, model: str | None) -> dict:
    content = [{"type": "text", "text": req["question"]}]
    if req["image"]:
        content.insert(0, {"type": "image_url", "image_url": {"url": req["image"]}})
    body = {
        "messages": [{"role": "user", "content": content}],
        "max_tokens": req["max_tokens"],
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    return body | ({"model": model} if model else {})


async def stream(client: httpx.AsyncClient, side: Side, req: dict, model: str | None) -> dict:
    """One streamed request: when it started, when each chunk with text came, its tokens."""
    start, chunks, tokens, ok = time.perf_counter(), [], req["max_tokens"], False
    if side.protocol == "openai":
        async with client.stream("POST", side.url, json=openai_body(req, model)) as r:
            if r.status_code != 200:
                raise RuntimeError(f"{side.name}: {r.status_code} {(await r.aread())[:300]!r}")
            async for line in r.aiter_lines():
                if line == "data: [DONE]":
                    ok = r.status_code == 200
                elif line.startswith("data: "):
                    event = json.loads(line[6:])
                    if event.get("usage"):
                        tokens = event["usage"]["completion_tokens"]
                    if any(c.get("delta", {}).get("content") for c in event.get("choices", [])):
                        chunks.append(time.perf_counter())
    else:
        async with client.stream("POST", side.url, json=req) as r:
            if r.status_code != 200:
                raise RuntimeError(f"{side.name}: {r.status_code} {(await r.aread())[:300]!r}")
            async for text in r.aiter_text():
                if text:
                    chunks.append(time.perf_counter())
            ok = r.status_code == 200
    return {"start": start, "chunks": chunks, "tokens": tokens, "ok": ok and bool(chunks)}


def summary(results: list[dict], wall: float) -> dict:
    done = [r for r in results if r["ok"]]
    ttft = [(r["chunks"][0] - r["start"]) * 1000 for r in done]
    tpot = [(r["chunks"][-1] - r["chunks"][0]) * 1000 / max(1, r["tokens"] - 1) for r in done]
    gaps = [(b - a) * 1000 for r in done for a, b in zip(r["chunks"], r["chunks"][1:], strict=False)]
    e2e = [(r["chunks"][-1] - r["start"]) * 1000 for r in done]
    tokens = sum(r["tokens"] for r in done)
    return {
        "requests": len(results),
        "complete": len(done),
        "tokens": tokens,
        "wall_s": round(wall, 2),
        "tok_s": round(tokens / wall, 1),
        "ttft_p50_ms": round(pct(ttft, 0.5)),
        "ttft_p99_ms": round(pct(ttft, 0.99)),
        "tpot_p50_ms": round(pct(tpot, 0.5), 1),
        "tpot_p99_ms": round(pct(tpot, 0.99), 1),
        "chunk_gap_p50_ms": round(pct(gaps, 0.5), 1),
        "e2e_p50_ms": round(pct(e2e, 0.5)),
        "e2e_p99_ms": round(pct(e2e, 0.99)),
    }


def _cpu_times() -> tuple[int, int] | None:
    """Machine-wide (busy, total) jiffies from /proc/stat; None where there is none."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
    except OSError:
        return None
    idle = fields[3] + fields[4]  # idle, iowait
    return sum(fields) - idle, sum(fields)


async def settle(limit_s: float = 10.0, below_cores: float = 0.25, window_s: float = 0.25) -> None:
    """Wait until the machine is quiet before a side's turn. A side just measured may keep cores
    busy after its last response (vLLM's engine keeps one core busy for ~1 s after each request),
    and the next side's first requests would pay for it: a one-stream request after vLLM's turn
    took ~1 s to its first token, against ~0.13 s after our own turn."""
    start = time.monotonic()
    while time.monotonic() - start < limit_s:
        before = _cpu_times()
        await asyncio.sleep(window_s)
        after = _cpu_times()
        if before is None or after is None:
            return
        busy, total = after[0] - before[0], after[1] - before[1]
        if total and busy / total * (os.cpu_count() or 1) < below_cores:
            return
    print(f"  (the machine was still busy after {limit_s:.0f} s; measuring anyway)", flush=True)


def client() -> httpx.AsyncClient:
    return httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=None))


async def closed(side: Side, reqs: list[dict], concurrency: int, model: str | None) -> dict:
    """`reqs`, `concurrency` at a time."""
    sem = asyncio.Semaphore(concurrency)
    async with client() as http:

        async def bounded(req):
            async with sem:
                return await stream(http, side, req, model)

        t0 = time.perf_counter()
        results = await asyncio.gather(*[bounded(r) for r in reqs])
    return summary(results, time.perf_counter() - t0) | {"concurrency": concurrency}


async def scheduled(side: Side, plan: list[tuple[float, dict]], model: str | None) -> dict:
    """Each request at its arrival time, whatever the server does."""
    async with client() as http:
        t0 = time.perf_counter()

        async def at(t: float, req: dict) -> dict:
            await asyncio.sleep(max(0.0, t - (time.perf_counter() - t0)))
            return await stream(http, side, req, model)

        results = await asyncio.gather(*[at(t, r) for t, r in plan])
    return summary(results, time.perf_counter() - t0) | {"offered_s": round(plan[-1][0], 1)}


# -- modes ------------------------------------------------------------------------------------


async def sweep(args, sides: list[Side]) -> dict:
    results: dict = {"sides": {s.name: [] for s in sides}}
    levels = [tuple(int(x) for x in spec.split(":")) for spec in args.levels]
    for side in sides:  # warm-up: two requests each
        await closed(side, requests(args, 2, seed=f"{args.seed}/warm-up", max_tokens=8), 2, args.served_model)
    for r in range(args.rounds):
        for i, (concurrency, n) in enumerate(levels):
            reqs = requests(args, n, f"{args.seed}/{r}/{i}", args.max_tokens)
            for side in rotated(sides, r):
                await settle()
                level = await closed(side, reqs, concurrency, args.served_model) | {"round": r + 1}
                results["sides"][side.name].append(level)
                print(f"  round {r + 1} {side.name}: {level}", flush=True)
    others = [s.name for s in sides[1:]]
    rows = []
    for i in range(len(results["sides"][sides[0].name])):
        for side in sides:
            x = results["sides"][side.name][i]
            ratios = [f"{x['tok_s'] / results['sides'][o][i]['tok_s']:.2f}x" for o in others]
            rows.append(
                [
                    x["round"],
                    f"{x['concurrency']} ({x['requests']})",
                    side.name,
                    x["tok_s"],
                    *ratios,
                    f"{x['ttft_p50_ms']} / {x['ttft_p99_ms']}",
                    f"{x['tpot_p50_ms']} / {x['tpot_p99_ms']}",
                    x["chunk_gap_p50_ms"],
                ]
            )
    headers = ["round", "concurrency (requests)", "side", "tok/s", *(f"vs {o}" for o in others)]
    results["table"] = table([*headers, "TTFT p50 / p99 ms", "TPOT p50 / p99 ms", "chunk gap p50 ms"], rows)
    return results


def schedule(args, rate: float, duration_s: float, seed: int | str) -> list[tuple[float, dict]]:
    """(arrival time, request): Poisson arrivals at `rate`, the same for every side."""
    rng, out, t = random.Random(seed), [], 0.0
    while (t := t + rng.expovariate(rate)) < duration_s:
        out.append((t, requests(args, 1, rng.randrange(2**31))[0]))
    return out


async def arrivals(args, sides: list[Side]) -> dict:
    results: dict = {"rate": args.rate, "sides": {s.name: [] for s in sides}}
    for side in sides:
        await scheduled(side, schedule(args, 4.0, 2.0, seed=999), args.served_model)
    rows = []
    for r in range(args.rounds):
        plan = schedule(args, args.rate, args.duration, seed=f"{args.seed}/{r}")
        offered = sum(req["max_tokens"] for _, req in plan) / plan[-1][0]
        for side in rotated(sides, r):
            await settle()
            level = await scheduled(side, plan, args.served_model)
            results["sides"][side.name].append(level)
            print(f"  round {r + 1} {side.name}: {level}", flush=True)
            rows.append(
                [
                    side.name,
                    r + 1,
                    f"{level['complete']} / {level['requests']}",
                    f"{offered:.1f}",
                    level["wall_s"],
                    f"{level['ttft_p50_ms']} / {level['ttft_p99_ms']}",
                    f"{level['e2e_p50_ms']} / {level['e2e_p99_ms']}",
                ]
            )
    headers = ["side", "round", "complete / requests", "tokens/s offered", "wall s", "TTFT p50 / p99 ms"]
    results["table"] = table([*headers, "e2e p50 / p99 ms"], rows)
    return results


async def burst(args, sides: list[Side]) -> dict:
    """`--requests` streams started at once on each side: each must end complete or as a fast 503."""
    results: dict = {"sides": {}}
    rows = []
    for side in sides:
        outcomes = await started_together(side.url, args.requests, args.max_tokens)
        times = {kind: [t for k, t, _ in outcomes if k == kind] for kind in ("complete", "refused", "other")}
        for _, _, got in (o for o in outcomes if o[0] == "other"):
            print(f"  {side.name} other: {got}")
        results["sides"][side.name] = {kind: {"count": len(ts), "seconds": ts} for kind, ts in times.items()}
        r, c = times["refused"], times["complete"]
        rows.append(
            [
                side.name,
                args.requests,
                len(c),
                len(r),
                len(times["other"]),
                f"{pct(r, 0.5):.2f} / {pct(r, 0.99):.2f} / {max(r, default=float('nan')):.2f}",
                f"{pct(c, 0.5):.2f} / {max(c, default=float('nan')):.2f}",
            ]
        )
    headers = ["side", "requests", "complete", "refused", "other", "refusal p50 / p99 / slowest s"]
    results["table"] = table([*headers, "complete p50 / slowest s"], rows)
    return results


async def load(args, sides: list[Side]) -> dict:
    """A closed loop with a tenth of the streams dropped mid-way, then an open loop at 3x the
    capacity it measured: every request must be accounted for (`lost` 0)."""
    results: dict = {"sides": {}}
    rows = []
    for side in sides:
        base = side.url.removesuffix("/v1/chat/completions")
        await closed_loop(base, 50, args.concurrency, cancel_fraction=0.1, seed=99)  # warm-up
        run = await closed_loop(base, args.requests, args.concurrency, cancel_fraction=0.1)
        capacity = run.summary()["complete"] / run.wall_s
        over = await open_loop(base, 3 * capacity, args.overload_s)
        results["sides"][side.name] = {
            "load": run.summary(),
            "capacity_req_s": capacity,
            "overload": over.summary(),
        }
        for label, s in (
            (f"c={args.concurrency}, 10% cancelled", run.summary()),
            (f"{3 * capacity:.1f} req/s (3x)", over.summary()),
        ):
            refusals = f"{s['refused_p50_ms']} / {s['refused_p99_ms']}" if s["refused"] else "-"
            counts = [s[k] for k in ("requests", "complete", "cancelled", "refused", "error", "lost")]
            rows.append(
                [
                    side.name,
                    label,
                    *counts,
                    s["tokens_per_s"],
                    f"{s['latency_p50_ms']} / {s['latency_p99_ms']}",
                    refusals,
                ]
            )
    headers = ["side", "run", "requests", "complete", "cancelled", "refused", "error", "lost", "tok/s"]
    results["table"] = table([*headers, "p50 / p99 ms", "503 p50 / p99 ms"], rows)
    return results


MODES = {"sweep": sweep, "arrivals": arrivals, "burst": burst, "load": load}
DEFAULT_LAUNCH = {
    "sweep": ["llava-serve", "batch", "thread"],
    "arrivals": ["llava-serve/v1", "llava-serve", "batch"],
    "burst": [],
    "load": ["llava-serve"],
}


# -- sides ------------------------------------------------------------------------------------


def app_config(args, name: str):
    from deployments.cli import set_path
    from llava_serve.config import AppConfig

    tree = {
        "model": {"name": "tiny", "tiny_preset": args.preset},
        "engine": {"max_batch_size": args.batch, **(V1_SETTINGS if name.endswith("/v1") else {})},
        "llava_model": {"num_cpus": args.model_cpus},
    }
    # --set is laid over every launched llava-serve side, as `llava-serve serve --set`; a variant's
    # own settings over that.
    for item in [*args.set, *variants(args).get(name, [])]:
        dotted, _, raw = item.partition("=")
        set_path(tree, dotted, yaml.safe_load(raw))
    return AppConfig.model_validate(tree)


def variants(args) -> dict[str, list[str]]:
    """`--variant "NAME:KEY=VALUE,KEY=VALUE"`: another launched llava-serve side with its settings."""
    named = (item.partition(":") for item in args.variant)
    return {name: [kv for kv in settings.split(",") if kv] for name, _, settings in named}


def launch(args, names: list[str]) -> list[Side]:
    """Every named side in one local Serve instance, each model replica on `--model-cpus` CPUs."""
    if not names:
        return []
    import ray
    from ray import serve

    from benchmarks.baselines import BatchChatbot, ThreadChatbot
    from deployments.app import build
    from llava_serve.models import checkpoint

    ray.init(num_cpus=len(names) * args.model_cpus + 2, include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": args.port})
    base, sides = f"http://127.0.0.1:{args.port}", []
    for i, name in enumerate(names):
        config = app_config(args, name)
        checkpoint.resolve_path(config.model)  # built before anything is timed
        options = {"ray_actor_options": {"num_cpus": args.model_cpus}, "max_ongoing_requests": 1024}
        if name.startswith("llava-serve") or name in variants(args):
            serve.run(build(config), name=f"side{i}", route_prefix=f"/side{i}")
            sides.append(Side(name, f"{base}/side{i}/v1/chat/completions", "openai"))
            continue
        chatbot = {"thread": ThreadChatbot, "batch": BatchChatbot}[name]
        extra = (args.batch,) if name == "batch" else ()
        serve.run(chatbot.options(**options).bind(config, *extra), name=f"side{i}", route_prefix=f"/side{i}")
        sides.append(Side({"batch": "@serve.batch", "thread": "thread"}[name], f"{base}/side{i}/", "text"))
    return sides


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("mode", choices=sorted(MODES))
    parser.add_argument("--launch", nargs="*", choices=["llava-serve", "llava-serve/v1", "thread", "batch"])
    parser.add_argument("--url", action="append", default=[], help="NAME=BASE_URL of a running server")
    parser.add_argument(
        "--variant",
        action="append",
        default=[],
        help="NAME:KEY=VALUE,...: a launched llava-serve side with these settings (over --set)",
    )
    parser.add_argument("--served-model", help="the `model` to send (another server may require one)")
    parser.add_argument(
        "--set", action="append", default=[], help="KEY=VALUE over launched llava-serve sides"
    )
    parser.add_argument("--preset", default="small", help="the tiny checkpoint preset launched sides serve")
    parser.add_argument("--prompt", choices=["image", "text"], default="image")
    parser.add_argument("--words", type=int, default=128, help="words of a text prompt (~2 tokens each)")
    parser.add_argument("--levels", nargs="+", default=["1:10", "16:32"], help="sweep: concurrency:requests")
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--max-tokens-range", type=int, nargs=2, default=[16, 128], help="arrivals")
    parser.add_argument("--rate", type=float, default=2.0, help="arrivals: requests per second")
    parser.add_argument("--duration", type=float, default=60.0, help="arrivals: seconds of arrivals a round")
    parser.add_argument("--requests", type=int, default=None, help="burst (300) and load (500)")
    parser.add_argument("--concurrency", type=int, default=32, help="load")
    parser.add_argument("--overload-s", type=float, default=20.0, help="load")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--batch", type=int, default=16, help="max batch size of every launched side")
    parser.add_argument("--model-cpus", type=int, default=2, help="num_cpus of every launched model replica")
    # A server that outlives a run (a `--url` side) keeps its prefix cache: prompts it has seen
    # would prefill from cache there and not on the launched sides. Each run draws its own seed
    # (kept in the JSON) unless one is given to repeat a run's requests.
    parser.add_argument("--seed", type=int, default=None, help="default: drawn afresh each run")
    parser.add_argument("--port", type=int, default=8331)
    parser.add_argument("--out", default=None, help="default: benchmarks/results/serve-MODE.json")
    args = parser.parse_args()
    args.out = args.out or f"benchmarks/results/serve-{args.mode}.json"
    args.seed = random.SystemRandom().randrange(1 << 30) if args.seed is None else args.seed
    print(f"request seed {args.seed}", flush=True)
    args.requests = args.requests or {"burst": 300, "load": 500}.get(args.mode, 0)
    if args.mode == "load":
        # The concurrency of the load run fits; past it, requests are refused at the door.
        args.set = ["admission.max_inflight_requests=40", "image_preprocessor.num_replicas=2", *args.set]
    names = DEFAULT_LAUNCH[args.mode] if args.launch is None else args.launch
    names = [*names, *variants(args)]
    if args.mode == "burst" and not names and not args.url:
        args.url = ["llava-serve=http://127.0.0.1:8000"]
    sides = launch(args, names) + [
        Side(name, f"{url.rstrip('/')}/v1/chat/completions", "openai")
        for name, _, url in (item.partition("=") for item in args.url)
    ]
    results = asyncio.run(MODES[args.mode](args, sides))
    print(results["table"])
    save(results, args)


if __name__ == "__main__":
    main()
