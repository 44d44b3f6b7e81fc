"""Load and overload over HTTP: nothing lost, bounded memory, fast refusals past capacity.

    python benchmarks/load.py                          # tiny model, 500 requests at concurrency 32
    python benchmarks/load.py --requests 100 --overload-s 10   # a quicker look

Starts its own Ray Serve instance with the app (admission bounded so overload is refused at
the ingress before any preprocessing, not queued for ever), then:
  1. warm-up, then 500 mixed requests (text-only / one / two images, 4-64 tokens, streamed
     or not) at concurrency 32 with 10% dropped mid-stream; every request must end complete,
     cancelled, refused or with a clean error: `lost` must be 0. Model-replica RSS is read
     after the warm-up and at the end.
  2. an open-loop run offering 3x the capacity measured in (1) for `--overload-s` seconds:
     accepted requests' latency vs (1), and how fast the excess gets its 503.
Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from benchmarks.report import save
from llava_serve.config import AppConfig
from llava_serve.loadgen import closed_loop, open_loop


async def main_async(args) -> dict:
    import ray
    from ray import serve

    from deployments.app import build

    config = AppConfig.model_validate(
        {
            "model": {"name": "tiny", "tiny_preset": args.preset},
            "engine": {"max_batch_size": 32},
            # The concurrency of the load run fits; beyond it, requests are refused at the door.
            "admission": {"max_inflight_requests": 40},
            "image_preprocessor": {"num_replicas": 2},
        }
    )
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": args.port})
    serve.run(build(config), name="llava", route_prefix="/")
    url = f"http://127.0.0.1:{args.port}"
    model = serve.get_deployment_handle("LlavaModel", "llava")

    await closed_loop(url, 50, args.concurrency, cancel_fraction=0.1, seed=99)  # warm-up
    rss_before = (await model.stats.remote())["rss_bytes"]
    load = await closed_loop(url, args.requests, args.concurrency, cancel_fraction=0.1)
    rss_after = (await model.stats.remote())["rss_bytes"]
    summary = load.summary()
    capacity = summary["complete"] / load.wall_s
    overload = await open_loop(url, 3 * capacity, args.overload_s)
    serve.shutdown()
    ray.shutdown()
    return {
        "load": summary,
        "rss_before_mb": round(rss_before / 2**20, 1),
        "rss_after_mb": round(rss_after / 2**20, 1),
        "rss_growth_pct": round(100 * (rss_after - rss_before) / rss_before, 2),
        "capacity_req_s": round(capacity, 2),
        "overload": {"offered_req_s": round(3 * capacity, 2), **overload.summary()},
    }


def table(r: dict) -> str:
    load, over = r["load"], r["overload"]
    return "\n".join(
        [
            "| run | requests | complete | cancelled | refused | error | lost | tok/s "
            "| p50 / p99 ms | 503 p50 / p99 ms |",
            "|---|---|---|---|---|---|---|---|---|---|",
            f"| load c=32, 10% cancelled | {load['requests']} | {load['complete']} | {load['cancelled']} | "
            f"{load['refused']} | {load['error']} | {load['lost']} | {load['tokens_per_s']} | "
            f"{load['latency_p50_ms']} / {load['latency_p99_ms']} | - |",
            f"| overload {over['offered_req_s']} req/s (3x) | {over['requests']} | {over['complete']} | "
            f"{over['cancelled']} | {over['refused']} | {over['error']} | {over['lost']} | "
            f"{over['tokens_per_s']} | {over['latency_p50_ms']} / {over['latency_p99_ms']} | "
            f"{over['refused_p50_ms']} / {over['refused_p99_ms']} |",
            f"\nmodel replica RSS after warm-up {r['rss_before_mb']} MiB, after the load run "
            f"{r['rss_after_mb']} MiB ({r['rss_growth_pct']:+}%); capacity {r['capacity_req_s']} req/s",
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", default="tiny", choices=["tiny", "small"])
    parser.add_argument("--requests", type=int, default=500)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--overload-s", type=float, default=20.0)
    parser.add_argument("--port", type=int, default=8311)
    parser.add_argument("--out", default="benchmarks/results/load.json")
    args = parser.parse_args()
    results = asyncio.run(main_async(args))
    print(table(results))
    save(results, args)


if __name__ == "__main__":
    main()
