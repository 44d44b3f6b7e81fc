"""The app on a multi-node Ray cluster simulated on this machine: placement and autoscaling.

    python benchmarks/multinode.py

Starts `ray.cluster_utils.Cluster` with a head and one more CPU node (custom resource
`cpu_node`) and two "GPU" nodes (custom resource `accelerator`, standing in for `num_gpus` on a
machine without one). The config pins one model replica to each accelerator node (the request
router keeps each conversation on the replica holding its KV: `benchmarks/routing.py` measures
that) and the preprocessors
to CPU nodes by resources, exactly as `configs/llava-1.5-7b.yaml` does with `num_gpus`, and lets
the image preprocessor autoscale. A loopback image host answers each fetch after 0.3 s (a slow
CDN), so preprocessing is where requests pile up. Reports where every replica runs, and the
preprocessor replica count sampled each second through a load phase and a quiet phase.
Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from benchmarks.report import save
from llava_serve.config import AppConfig
from tests.support.load import closed_loop, random_png

IMAGE_HOST = "127.0.0.2"


def slow_image_host(delay_s: float) -> tuple[ThreadingHTTPServer, str]:
    import base64
    import random

    body = base64.b64decode(random_png(random.Random(0)).split(",", 1)[1])

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            time.sleep(delay_s)
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer((IMAGE_HOST, 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://{IMAGE_HOST}:{server.server_address[1]}"


def config(tiny_dir: str) -> AppConfig:
    on_cpu_nodes = {"resources": {"cpu_node": 0.01}}
    return AppConfig.model_validate(
        {
            "model": {"name": tiny_dir},
            "images": {"allow_hosts": [f"{IMAGE_HOST}/32"]},
            "ingress": on_cpu_nodes | {"num_cpus": 0.1},
            "prompt_tokenizer": on_cpu_nodes | {"num_cpus": 0.1},
            "image_preprocessor": on_cpu_nodes
            | {
                "num_cpus": 0.1,
                "autoscaling_config": {
                    "min_replicas": 1,
                    "max_replicas": 4,
                    "target_ongoing_requests": 2,
                    "upscale_delay_s": 2,
                    "downscale_delay_s": 8,
                    "metrics_interval_s": 1,
                    "look_back_period_s": 3,
                },
            },
            "llava_model": {"num_replicas": 2, "num_cpus": 1, "resources": {"accelerator": 1}},
        }
    )


def placement() -> dict[str, list[str]]:
    from ray.util.state import list_actors, list_nodes

    labels = {}
    for node in list_nodes():
        res = node.resources_total
        labels[node.node_id] = "accelerator" if "accelerator" in res else "cpu"
    where: dict[str, list[str]] = {}
    for actor in list_actors(filters=[("state", "=", "ALIVE")]):
        if actor.class_name.startswith("ServeReplica:llava:"):
            name = actor.class_name.split(":")[-1]
            where.setdefault(name, []).append(labels[actor.node_id])
    return where


def preprocessor_replicas() -> tuple[int, int]:
    """(running, wanted): wanted counts replicas still starting as well."""
    from ray import serve

    states = serve.status().applications["llava"].deployments["ImagePreprocessor"].replica_states
    return states.get("RUNNING", 0), states.get("RUNNING", 0) + states.get("STARTING", 0)


async def run(args) -> dict:
    import ray
    from ray import serve
    from ray.cluster_utils import Cluster

    from deployments.app import build
    from llava_serve.models import tiny

    tiny_dir = str(tiny.ensure("tiny"))
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "resources": {"cpu_node": 1}})
    cluster.add_node(num_cpus=2, resources={"cpu_node": 1})
    for _ in range(2):
        cluster.add_node(num_cpus=1, resources={"accelerator": 1})
    ray.init(address=cluster.address, log_to_driver=False)
    serve.start(proxy_location="HeadOnly", http_options={"host": "127.0.0.1", "port": args.port})
    serve.run(build(config(tiny_dir)), name="llava", route_prefix="/")
    url = f"http://127.0.0.1:{args.port}"
    server, image_url = slow_image_host(0.3)

    where = placement()
    timeline: list[tuple[float, str, int, int]] = []
    start = time.monotonic()
    stop = asyncio.Event()

    async def sample(phase: list[str]):
        while not stop.is_set():
            timeline.append((round(time.monotonic() - start, 1), phase[0], *preprocessor_replicas()))
            await asyncio.sleep(1)

    phase = ["load"]
    sampler = asyncio.create_task(sample(phase))
    parts = [
        {"type": "image_url", "image_url": {"url": f"{image_url}/cat.png"}},
        {"type": "text", "text": "What is this?"},
    ]
    body = {"messages": [{"role": "user", "content": parts}], "max_tokens": 4}

    async with httpx.AsyncClient(timeout=60) as client:

        async def user():
            while time.monotonic() - start < args.load_s:
                await client.post(f"{url}/v1/chat/completions", json=body)

        await asyncio.gather(*[user() for _ in range(args.concurrency)])
    phase[0] = "quiet"
    await asyncio.sleep(args.quiet_s)
    stop.set()
    await sampler
    check = await closed_loop(url, 10, 4, cancel_fraction=0.0, max_tokens=(2, 4))
    server.shutdown()
    serve.shutdown()
    ray.shutdown()
    cluster.shutdown()
    load_counts = [n for _, p, n, _ in timeline if p == "load"]
    quiet_counts = [n for _, p, n, _ in timeline if p == "quiet"]
    return {
        "placement": {k: dict(Counter(v)) for k, v in where.items()},
        "preprocessor_replicas_max_under_load": max(load_counts),
        "preprocessor_replicas_at_end": quiet_counts[-1],
        "timeline": timeline,
        "after_check": check.summary(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--load-s", type=float, default=90)
    parser.add_argument("--quiet-s", type=float, default=40)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--port", type=int, default=8321)
    parser.add_argument("--out", default="benchmarks/results/multinode.json")
    args = parser.parse_args()
    results = asyncio.run(run(args))
    print("| deployment | nodes its replicas run on |\n|---|---|")
    for name, nodes in results["placement"].items():
        print(f"| {name} | {nodes} |")
    print("\nImagePreprocessor replicas every second, running/wanted (L: load phase, Q: quiet):")
    print(" ".join(f"{p[0].upper()}{n}/{w}" for _, p, n, w in results["timeline"]))
    print(
        f"\nmax under load {results['preprocessor_replicas_max_under_load']}, "
        f"at the end {results['preprocessor_replicas_at_end']}; "
        f"requests afterwards: {results['after_check']['complete']}/10 complete"
    )
    save(results, args)


if __name__ == "__main__":
    main()
