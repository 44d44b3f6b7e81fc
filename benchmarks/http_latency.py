"""Streaming latency of a running server over HTTP: TTFT and time per output token.

    make serve &      # or any llava-serve URL
    python benchmarks/http_latency.py --url http://127.0.0.1:8000 --requests 20 --max-tokens 64

Sequential streamed requests (concurrency 1) with a small image; prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import base64
import io
import itertools
import json
import time
from pathlib import Path

import httpx
from PIL import Image


def one(client: httpx.Client, url: str, body: dict) -> tuple[float, list[float]]:
    t0 = time.perf_counter()
    stamps = []
    with client.stream("POST", f"{url}/v1/chat/completions", json=body) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if line.startswith("data: {"):
                chunk = json.loads(line[6:])
                if chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                    stamps.append(time.perf_counter())
    return stamps[0] - t0, [b - a for a, b in itertools.pairwise(stamps)]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--requests", type=int, default=20)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--out", default="benchmarks/results/http_latency.json")
    args = parser.parse_args()
    buf = io.BytesIO()
    Image.new("RGB", (128, 96), (30, 140, 200)).save(buf, "PNG")
    uri = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    body = {
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": uri}},
                    {"type": "text", "text": "Describe."},
                ],
            }
        ],
        "max_tokens": args.max_tokens,
        "temperature": 0.7,
        "stream": True,
    }
    ttfts, gaps = [], []
    with httpx.Client(timeout=60) as client:
        one(client, args.url, body)  # warm-up
        for _ in range(args.requests):
            ttft, g = one(client, args.url, body)
            ttfts.append(ttft * 1000)
            gaps.extend(x * 1000 for x in g)
    ttfts.sort()
    gaps.sort()

    def p(v, q):
        return round(v[min(len(v) - 1, int(q * len(v)))], 2)

    result = {
        "requests": args.requests,
        "ttft_ms": {"p50": p(ttfts, 0.5), "p99": p(ttfts, 0.99)},
        "inter_token_ms": {"p50": p(gaps, 0.5), "p99": p(gaps, 0.99), "n": len(gaps)},
    }
    print("| metric | p50 ms | p99 ms |\n|---|---|---|")
    print(f"| TTFT | {result['ttft_ms']['p50']} | {result['ttft_ms']['p99']} |")
    print(f"| inter-token | {result['inter_token_ms']['p50']} | {result['inter_token_ms']['p99']} |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
