"""`llava-serve serve`: start the app on a Ray cluster, wait until it answers, serve until a signal."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable

# Ray Serve's documented high-throughput mode, as `make serve` runs it; read when Ray starts.
os.environ.setdefault("RAY_SERVE_THROUGHPUT_OPTIMIZED", "1")

import httpx
import ray
from ray import serve

from deployments.app import build
from llava_serve.api.auth import load_keys
from llava_serve.config import AppConfig


def wait_until_answering(base_url: str, model: str, timeout_s: float, key: str | None = None) -> None:
    """Until one real chat completion succeeds: replicas up, weights loaded, first call warmed."""
    body = {"model": model, "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 1}
    headers = {"authorization": f"Bearer {key}"} if key else {}
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            url = f"{base_url}/v1/chat/completions"
            if httpx.post(url, json=body, headers=headers, timeout=30).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{base_url} did not answer within {timeout_s:.0f}s")


def drain(timeout_s: float) -> None:
    """New requests get a 503 while running streams finish, for up to `timeout_s`; what is
    still running then ends with an error event when Ray shuts down."""
    import asyncio

    async def run() -> int:
        return await serve.get_app_handle("llava").drain.remote(timeout_s)

    left = asyncio.run(run())  # handles need an event loop in Serve's throughput mode
    print(f"llava-serve: drained, {left} request(s) still running at the deadline", flush=True)


def serve_until_interrupted(
    config: AppConfig,
    host: str,
    port: int,
    address: str,
    timeout_s: float,
    announce: Callable[[str, AppConfig], None],
) -> None:
    ray.init(address=address, log_to_driver=False)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):  # after ray.init, which installs handlers of its own
        signal.signal(sig, lambda *_: stop.set())
    try:
        serve.start(http_options={"host": host, "port": port})
        serve.run(build(config), name="llava", route_prefix="/", blocking=False)
        base_url = f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port}"
        keys = load_keys(config.auth)
        wait_until_answering(base_url, config.model.public_name, timeout_s, keys[0] if keys else None)
        announce(base_url, config)
        stop.wait()
        drain(config.ingress.graceful_shutdown_timeout_s)
    finally:
        if address != "local":  # a shared cluster keeps its other apps
            serve.delete("llava")
        ray.shutdown()  # a cluster of our own goes with its processes
