"""A burst of streaming requests started at once: each must end complete or as a fast 503.

    serve run serve_config.yaml &                # the shipped config, tiny model
    python benchmarks/burst.py --requests 300    # against http://127.0.0.1:8000

Every request is one of: complete (200, the stream ends with `[DONE]` and no error event),
refused (503 with Retry-After and our OpenAI-shaped body), or other (anything else: Serve's own
503 body, a 5xx, a broken stream). Prints the counts and how long the refusals took; the
slowest refusal is the figure that says whether overload is answered fast.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.report import save


def classify(status: int, headers: httpx.Headers, text: str) -> str:
    if status == 200 and text.rstrip().endswith("data: [DONE]") and '"error"' not in text:
        return "complete"
    if status == 503 and headers.get("retry-after"):
        try:
            if json.loads(text)["error"]["type"] == "overloaded_error":
                return "refused"
        except (ValueError, KeyError, TypeError):
            pass
    return "other"


async def burst(url: str, n: int, max_tokens: int) -> list[tuple[str, float]]:
    body = {"messages": [{"role": "user", "content": "Talk."}], "max_tokens": max_tokens, "stream": True}
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=0)
    async with httpx.AsyncClient(timeout=300, limits=limits) as client:

        async def one() -> tuple[str, float]:
            start = time.monotonic()
            async with client.stream("POST", f"{url}/v1/chat/completions", json=body) as r:
                text = (await r.aread()).decode()
            return classify(r.status_code, r.headers, text), time.monotonic() - start

        return await asyncio.gather(*[one() for _ in range(n)])


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))] if values else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--out", default="benchmarks/results/burst.json")
    args = parser.parse_args()
    results = asyncio.run(burst(args.url, args.requests, args.max_tokens))
    times = {kind: [t for k, t in results if k == kind] for kind in ("complete", "refused", "other")}
    print("| requests | complete | refused | other | refusal p50 / p99 / slowest s | complete p50 / max s |")
    print("|---|---|---|---|---|---|")
    r, c = times["refused"], times["complete"]
    print(
        f"| {args.requests} | {len(c)} | {len(r)} | {len(times['other'])} "
        f"| {pct(r, 0.5):.2f} / {pct(r, 0.99):.2f} / {max(r, default=float('nan')):.2f} "
        f"| {pct(c, 0.5):.2f} / {max(c, default=float('nan')):.2f} |"
    )
    save({kind: {"count": len(ts), "seconds": ts} for kind, ts in times.items()}, args)


if __name__ == "__main__":
    main()
