"""What hostile traffic costs the requests beside it, side by side in one run against one server.

    serve run serve_config.yaml &                   # or `make serve`
    python benchmarks/perimeter.py                  # against http://127.0.0.1:8000

Each scenario runs a streaming request (400 tokens, greedy) and one normal non-streamed request,
first alone, then beside a flood, and reports the stream's p99 gap between chunks, the normal
request's status and latency, and what the flood itself got back:

- `slow-bodies`: 200 connections that promise a 10 kB body and send a byte every 0.2 s;
- `hard-grammars`: 6 schemas, each a different anyOf of 600 or 700 objects (0.5-1 s of
  llguidance work apiece; the 700-branch ones are past its row limit);
- `validation`: 3 bodies of a million tiny messages (30 MB each), one after another;
- `upscale`: 6 requests with a 20000x1 PNG of ~100 bytes, which a processor scales up to the
  tower's height on its short edge.

It also reports the peak resident memory of each Serve replica with its child processes (the
decode workers), from /proc, so the server must run on this machine.

Run it on two commits to compare them; the JSON keeps the commit each ran on.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import re
import sys
import threading
import time
from pathlib import Path

import httpx
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.report import pct, save
from tests.support.load import trickle_body

STREAM = {
    "messages": [{"role": "user", "content": "Talk."}],
    "max_tokens": 120,
    "temperature": 0,
    "stream": True,
}
NORMAL = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}


def stream_gaps(url: str, start_flood) -> list[float]:
    gaps, last = [], None
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=STREAM, timeout=120) as r:
        for line in r.iter_lines():
            if not line.startswith("data: {"):
                continue
            now = time.monotonic()
            if last is None:
                start_flood()
            else:
                gaps.append(now - last)
            last = now
    return gaps


def normal(url: str) -> tuple[int, float]:
    start = time.monotonic()
    try:
        status = httpx.post(f"{url}/v1/chat/completions", json=NORMAL, timeout=60).status_code
    except httpx.HTTPError:
        status = 0
    return status, time.monotonic() - start


async def _trickle(host: str, port: int, stop: threading.Event, results: list[str]) -> None:
    try:
        answer = await trickle_body(host, port, stop.is_set)
    except OSError as e:
        results.append(type(e).__name__)
        return
    if answer is None:
        results.append("still open")
    else:
        results.append(answer.split(b" ")[1].decode() if answer.startswith(b"HTTP/") else "closed")


def slow_bodies(url: str, count: int = 200):
    host, port = url.removeprefix("http://").split(":")
    stop, results = threading.Event(), []

    def run():
        async def all_of_them():
            await asyncio.gather(*(_trickle(host, int(port), stop, results) for _ in range(count)))

        asyncio.run(all_of_them())

    return run, stop, results


def hard_grammars(url: str):
    bodies = []
    for k, n in enumerate([600, 700] * 3):
        branches = [{"type": "object", "properties": {f"k{i}_{n}_{k}": {"const": i}}} for i in range(n)]
        fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"anyOf": branches}}}
        bodies.append(json.dumps({**NORMAL, "max_tokens": 3, "response_format": fmt}).encode())
    return _posts(url, bodies)


def validation_flood(url: str, count: int = 3):
    body = b'{"messages":[' + b",".join([b'{"role":"user","content":"x"}'] * 1_000_000) + b"]}"
    return _posts(url, [body] * count)


def upscale(url: str, count: int = 6):
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (20000, 1), (200, 10, 10)).save(buf, "PNG")
    uri = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    part = {"type": "image_url", "image_url": {"url": uri}}
    body = {**NORMAL, "messages": [{"role": "user", "content": [part, {"type": "text", "text": "?"}]}]}
    return _posts(url, [json.dumps(body).encode()] * count)


def _posts(url: str, bodies: list[bytes]):
    """One after another, each answer's status kept."""
    stop, results = threading.Event(), []

    def run():
        for body in bodies:
            if stop.is_set():
                return
            try:
                r = httpx.post(
                    f"{url}/v1/chat/completions",
                    content=body,
                    headers={"content-type": "application/json"},
                    timeout=300,
                )
                results.append(str(r.status_code))
            except httpx.HTTPError as e:
                results.append(type(e).__name__)

    return run, stop, results


def replica_peak_mib() -> dict[str, float]:
    """Each Serve deployment's peak resident memory on this machine (VmHWM, MiB), its replicas'
    processes and their children summed (psutil finds them; the peak is only in /proc)."""
    peaks: dict[str, float] = {}
    for replica in psutil.process_iter(["cmdline"]):
        found = re.match(r"ray::ServeReplica:[^:]+:(\w+)", (replica.info["cmdline"] or [""])[0])
        if not found:
            continue
        try:
            tree = [replica, *replica.children(recursive=True)]
        except psutil.Error:
            continue
        for process in tree:
            try:
                with open(f"/proc/{process.pid}/status") as f:
                    kb = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
            except (OSError, StopIteration):
                continue
            peaks[found.group(1)] = peaks.get(found.group(1), 0.0) + kb / 1024
    return {k: round(v, 1) for k, v in sorted(peaks.items())}


def measure(url: str, flood=None) -> dict:
    """The stream's gaps and the normal request, alone (`flood` None) or beside the flood, which
    starts at the stream's first chunk; the normal request goes 2 s into the flood."""
    run, stop, results = flood if flood is not None else (None, threading.Event(), [])
    workers: list[threading.Thread] = []
    outcome: dict = {}

    def start_flood():
        if run is not None:
            workers.append(threading.Thread(target=run, daemon=True))
            workers[-1].start()

        def later():
            time.sleep(2 if run is not None else 0)
            outcome["normal"] = normal(url)

        workers.append(threading.Thread(target=later, daemon=True))
        workers[-1].start()

    gaps = stream_gaps(url, start_flood)
    workers[-1].join()
    stop.set()
    for w in workers[:-1]:
        w.join(120)
    counts: dict[str, int] = {}
    for r in results:
        counts[r] = counts.get(r, 0) + 1
    status, seconds = outcome["normal"]
    return {
        "stream_gap_p99_ms": round(pct(gaps, 0.99) * 1e3, 1),
        "stream_gap_p50_ms": round(pct(gaps, 0.5) * 1e3, 1),
        "normal_status": status,
        "normal_s": round(seconds, 2),
        "flood_got": counts,
        "peak_mib": replica_peak_mib(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument(
        "--scenarios", nargs="+", default=["slow-bodies", "hard-grammars", "validation", "upscale"]
    )
    parser.add_argument("--out", default="benchmarks/results/perimeter.json")
    args = parser.parse_args()
    floods = {
        "slow-bodies": slow_bodies,
        "hard-grammars": hard_grammars,
        "validation": validation_flood,
        "upscale": upscale,
    }
    results = {}
    head = f"{'scenario':<16}{'side':<8}{'gap p50':>9}{'gap p99':>9}{'normal':>8}{'its s':>7}"
    print(f"{head}  flood got; peak MiB")
    for name in args.scenarios:
        for side, flood in (("alone", None), ("flood", floods[name](args.url))):
            row = measure(args.url, flood)
            results[f"{name}/{side}"] = row
            print(
                f"{name:<16}{side:<8}{row['stream_gap_p50_ms']:>9}{row['stream_gap_p99_ms']:>9}"
                f"{row['normal_status']:>8}{row['normal_s']:>7}  {json.dumps(row['flood_got'])}; "
                f"{json.dumps(row['peak_mib'])}"
            )
    save(results, args)


if __name__ == "__main__":
    main()
