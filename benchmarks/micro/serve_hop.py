"""What one streamed message costs a hop through Ray Serve, in Serve's default mode and in its
documented high-throughput mode (`RAY_SERVE_THROUGHPUT_OPTIMIZED=1`, what `make serve` and
`llava-serve serve` run), side by side in one run.

    python benchmarks/micro/serve_hop.py                  # 16 streams x 1000 messages each
    python benchmarks/micro/serve_hop.py --streams 1 --messages 4000

Each mode runs in a fresh Ray instance (Serve reads the setting when its processes start): a
producer deployment's async generator yields `StepOutput`s (the model replica's message) as fast
as it can to a consumer deployment that reads `--streams` of them at once through
`handle.options(stream=True)` (the ingress's call). Reported: messages per second, and the CPU
microseconds each side spends per message (from /proc, the replica processes only). No model
runs, so this is the transport alone: what a stream's message costs beside the forward passes.
Prints a table, writes JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from benchmarks.report import save, table

MODES = {"default": {}, "throughput-optimized": {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1"}}


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def child(streams: int, messages: int) -> dict:
    """One mode's measurement, in this process's own Ray instance (run with --child)."""
    import ray
    from ray import serve

    from llava_serve.types import StepOutput

    @serve.deployment(max_ongoing_requests=1024)
    class Producer:
        def pid(self) -> int:
            return os.getpid()

        async def stream(self, n: int):
            out = StepOutput((123,), " word", None, 256, 5)
            for i in range(n):
                yield out
                if i % 4 == 0:
                    await asyncio.sleep(0)  # a replica's loop has other requests to serve

    @serve.deployment(max_ongoing_requests=1024)
    class Consumer:
        def __init__(self, producer) -> None:
            self.producer = producer

        def pid(self) -> int:
            return os.getpid()

        async def read(self, streams: int, n: int) -> tuple[int, float]:
            async def one() -> int:
                return sum([1 async for _ in self.producer.stream.options(stream=True).remote(n)])

            t0 = time.perf_counter()
            counts = await asyncio.gather(*[one() for _ in range(streams)])
            return sum(counts), time.perf_counter() - t0

    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    consumer = serve.run(Consumer.bind(Producer.bind()), name="hop", route_prefix=None)
    producer = serve.get_deployment_handle("Producer", "hop")

    async def measure() -> dict:
        pids = {"consumer": await consumer.pid.remote(), "producer": await producer.pid.remote()}
        await consumer.read.remote(streams, 50)  # warm: connections, code paths
        before = {k: cpu_seconds(p) for k, p in pids.items()}
        count, wall = await consumer.read.remote(streams, messages)
        used = {k: cpu_seconds(p) - before[k] for k, p in pids.items()}
        return {
            "messages": count,
            "msg_per_s": round(count / wall),
            **{f"{k}_us_per_msg": round(1e6 * s / count, 1) for k, s in used.items()},
        }

    try:  # in the high-throughput mode a driver's handles work only inside an event loop
        return asyncio.run(measure())
    finally:
        ray.shutdown()  # Serve with it: its handles' loop is gone, so no serve.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--streams", type=int, default=16)
    parser.add_argument("--messages", type=int, default=1000, help="per stream")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--out", default="benchmarks/results/serve-hop.json")
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.streams, args.messages)))
        return
    rows, results = [], {}
    counts = ["--streams", str(args.streams), "--messages", str(args.messages)]
    for mode, env in MODES.items():
        run = subprocess.run(
            [sys.executable, __file__, "--child", mode, *counts],
            env={**os.environ, **env},
            capture_output=True,
            text=True,
            check=True,
        )
        results[mode] = r = json.loads(run.stdout.strip().splitlines()[-1])
        sides = [r["producer_us_per_msg"], r["consumer_us_per_msg"]]
        rows.append([mode, r["msg_per_s"], *sides, round(sum(sides), 1)])
    headers = ["Serve mode", "msg/s", "producer us/msg", "consumer us/msg", "both us/msg"]
    print(table(headers, rows))
    save({"modes": results, "streams": args.streams}, args)


if __name__ == "__main__":
    main()
