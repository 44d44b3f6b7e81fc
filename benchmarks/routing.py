"""Two model replicas as one cache: prefix-affinity routing against Serve's default, side by side.

    python benchmarks/routing.py

A simulated cluster on this machine (`ray.cluster_utils.Cluster`): a head node for the proxy,
ingress and preprocessors, and two "accelerator" nodes (custom resource `accelerator`, standing
in for `num_gpus`), one model replica of the small-336 preset on each (576 tokens per image). The
app is deployed as `serve deploy` deploys it (import path, args, and the replica count in its
`deployments:` list), so a scale-down is a change of that count alone.

The workload, seeded, open loop: 24 conversations, each about its own image, three turns each. A
conversation starts every `--arrival-s`; each next turn is asked `--think-s` after the previous
answer, so turns of different conversations interleave. Every request streams; TTFT is the first
streamed text at the client. A follow-up counts as a prefix hit when its answer reports
(`usage.prompt_tokens_details.cached_tokens`) at least half its prompt reused. Load balance is
the requests each replica's engine started (its prefix-cache lookups).

Three runs, one after the other in this process: `prefix_affinity`, `default` (Serve's power of
two choices), and `prefix_affinity` again with a scale-down from 2 replicas to 1 once half the
conversations have begun, counting failed or truncated streams. Prints a table, writes JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from benchmarks.report import save
from tests.support.cluster import deploy_declared, running_replicas
from tests.support.media import data_uri, random_image

QUESTIONS = ["What is in this picture?", "And what colour is it, mostly?", "Anything else worth saying?"]


def app_args(policy: str) -> dict:
    on_head = {"resources": {"cpu_node": 0.01}, "num_cpus": 0.1}
    return {
        "model": {"name": "tiny", "tiny_preset": "small-336"},
        "auth": {"require_ray_token": False},
        "ingress": on_head | {"playground": False},
        "prompt_tokenizer": on_head,
        "image_preprocessor": on_head,
        "llava_model": {"num_cpus": 1, "resources": {"accelerator": 1}, "graceful_shutdown_timeout_s": 120},
        "routing": {"policy": policy},
    }


async def serving(replicas: int, timeout_s: float = 600) -> None:
    from ray import serve

    deadline = time.monotonic() + timeout_s
    while True:
        app = serve.status().applications.get("llava")
        if app is not None and app.status == "RUNNING" and running_replicas("llava") == replicas:
            return
        assert time.monotonic() < deadline, f"the app is not serving with {replicas} model replicas"
        await asyncio.sleep(1)


async def engine_starts() -> dict[int, int]:
    """Requests each model replica's engine started so far, by pid."""
    from ray import serve

    handle = serve.get_deployment_handle("LlavaModel", "llava")
    seen: dict[int, int] = {}
    for _ in range(60):
        stats = await handle.stats.remote()
        seen[stats["pid"]] = stats["prefix_cache_hits"] + stats["prefix_cache_misses"]
        if len(seen) == running_replicas("llava"):
            break
    return seen


async def ask(client: httpx.AsyncClient, url: str, messages: list, max_tokens: int) -> dict:
    body = {
        "messages": messages,
        "max_tokens": max_tokens,
        "min_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    start = time.monotonic()
    ttft, text, usage, finish = None, [], None, None
    try:
        async with client.stream("POST", f"{url}/v1/chat/completions", json=body) as r:
            if r.status_code != 200:
                return {"ok": False, "error": f"HTTP {r.status_code}"}
            async for line in r.aiter_lines():
                if not line.startswith("data: {"):
                    continue
                chunk = json.loads(line[6:])
                for choice in chunk["choices"]:
                    if choice["delta"].get("content"):
                        ttft = ttft or time.monotonic() - start
                        text.append(choice["delta"]["content"])
                    finish = choice["finish_reason"] or finish
                usage = chunk.get("usage") or usage
    except httpx.HTTPError as e:
        return {"ok": False, "error": repr(e)}
    whole = usage is not None and usage["completion_tokens"] == max_tokens and finish == "length"
    return {
        "ok": whole,
        "error": None if whole else "truncated",
        "ttft_s": ttft,
        "text": "".join(text),
        "prompt_tokens": usage and usage["prompt_tokens"],
        "cached_tokens": usage and usage["prompt_tokens_details"]["cached_tokens"],
    }


async def workload(url: str, args, on_half=None) -> tuple[list[dict], dict]:
    rng = random.Random(args.seed)
    results: list[dict] = []
    begun = 0
    start = time.monotonic()
    inflight = 0
    timeline: dict = {}  # when the scale-down was asked for and done, and what was streaming then

    async def watch_scale_down() -> None:
        while "asked_at_s" not in timeline:
            await asyncio.sleep(0.2)
        while running_replicas("llava") > 1:
            await asyncio.sleep(0.2)
        timeline.update(one_replica_at_s=round(time.monotonic() - start, 1), streaming_at_one=inflight)

    async def conversation(i: int, client: httpx.AsyncClient) -> None:
        nonlocal begun, inflight
        await asyncio.sleep(i * args.arrival_s + rng.random() * 0.2)
        begun += 1
        if on_half is not None and begun == args.conversations // 2:
            timeline.update(asked_at_s=round(time.monotonic() - start, 1), streaming_then=inflight)
            asyncio.get_running_loop().run_in_executor(None, on_half)
        picture = data_uri(random_image(1000 + i, (336, 336)))
        messages: list[dict] = []
        for turn, question in enumerate(QUESTIONS):
            if turn == 0:
                content = [
                    {"type": "image_url", "image_url": {"url": picture}},
                    {"type": "text", "text": question},
                ]
            else:
                content = question
            messages.append({"role": "user", "content": content})
            inflight += 1
            out = await ask(client, url, messages, args.max_tokens)
            inflight -= 1
            results.append({"conversation": i, "turn": turn, **out})
            if not out["ok"]:
                return
            messages.append({"role": "assistant", "content": out["text"]})
            await asyncio.sleep(args.think_s)

    watcher = asyncio.ensure_future(watch_scale_down()) if on_half is not None else None
    async with httpx.AsyncClient(timeout=300) as client:
        await asyncio.gather(*(conversation(i, client) for i in range(args.conversations)))
    timeline["ended_at_s"] = round(time.monotonic() - start, 1)
    if watcher is not None:
        watcher.cancel()
    return results, timeline


def summary(results: list[dict], starts: dict[int, int] | None) -> dict:
    follow = [r for r in results if r["turn"] > 0 and r["ok"]]
    firsts = [r for r in results if r["turn"] == 0 and r["ok"]]
    hits = [r for r in follow if r["cached_tokens"] >= r["prompt_tokens"] / 2]
    counts = sorted((starts or {}).values())
    return {
        "requests": len(results),
        "failed_or_truncated": sum(not r["ok"] for r in results),
        "follow_up_hit_rate": len(hits) / len(follow) if follow else 0.0,
        "follow_up_ttft_p50_s": statistics.median(r["ttft_s"] for r in follow) if follow else None,
        "first_turn_ttft_p50_s": statistics.median(r["ttft_s"] for r in firsts) if firsts else None,
        "requests_per_replica": counts,
        "balance": counts[-1] / max(counts[0], 1) if len(counts) > 1 else None,
    }


async def run(args) -> dict:
    import ray
    from ray import serve
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "resources": {"cpu_node": 1}})
    for _ in range(2):
        cluster.add_node(num_cpus=1, resources={"accelerator": 1})
    ray.init(address=cluster.address, log_to_driver=False)
    serve.start(proxy_location="HeadOnly", http_options={"host": "127.0.0.1", "port": args.port})
    url = f"http://127.0.0.1:{args.port}"
    out: dict = {}
    try:
        for name, policy, scale_down in [
            ("prefix_affinity", "prefix_affinity", False),
            ("default", "default", False),
            ("prefix_affinity, 2 -> 1 mid-run", "prefix_affinity", True),
        ]:
            deploy_declared("llava", app_args(policy), 2, "/")
            await serving(2)
            before = await engine_starts()
            half = (lambda p=policy: deploy_declared("llava", app_args(p), 1, "/")) if scale_down else None
            print(f"running {name} ...", flush=True)
            results, timeline = await workload(url, args, half)
            after = None if scale_down else await engine_starts()
            starts = after and {pid: n - before.get(pid, 0) for pid, n in after.items()}
            out[name] = {"summary": summary(results, starts) | timeline, "requests": results}
    finally:
        serve.shutdown()
        ray.shutdown()
        cluster.shutdown()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--conversations", type=int, default=24)
    parser.add_argument("--arrival-s", type=float, default=1.5)
    parser.add_argument("--think-s", type=float, default=2.0)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--port", type=int, default=8322)
    parser.add_argument("--out", default="benchmarks/results/routing.json")
    args = parser.parse_args()
    results = asyncio.run(run(args))
    print(
        "\n| run | follow-up hit rate | follow-up TTFT p50 | first-turn TTFT p50 "
        "| requests per replica | failed |"
    )
    print("|---|---|---|---|---|---|")
    for name, r in results.items():
        s = r["summary"]
        fmt = lambda v: "-" if v is None else f"{v:.2f} s"  # noqa: E731
        print(
            f"| {name} | {s['follow_up_hit_rate']:.0%} | {fmt(s['follow_up_ttft_p50_s'])} | "
            f"{fmt(s['first_turn_ttft_p50_s'])} | {s['requests_per_replica'] or '-'} "
            f"| {s['failed_or_truncated']} |"
        )
    down = results["prefix_affinity, 2 -> 1 mid-run"]["summary"]
    print(
        f"\nscale-down asked at {down.get('asked_at_s')} s with {down.get('streaming_then')} streams "
        f"running, one replica left at {down.get('one_replica_at_s')} s "
        f"({down.get('streaming_at_one')} streams running), run ended at {down['ended_at_s']} s"
    )
    a, d = results["prefix_affinity"]["summary"], results["default"]["summary"]
    if a["follow_up_ttft_p50_s"] and d["follow_up_ttft_p50_s"]:
        ratio = a["follow_up_ttft_p50_s"] / d["follow_up_ttft_p50_s"]
        print(f"\nfollow-up TTFT p50, affinity / default: {ratio:.2f}x")
    save(results, args)


if __name__ == "__main__":
    main()
