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


# Each request's outcome: its kind, seconds to the end of its answer, and what it got (the status
# and the body's end, or the exception), kept so that an "other" can be told apart.
Outcome = tuple[str, float, str]


async def one(host: str, port: int, payload: bytes, timeout_s: float = 120.0) -> Outcome:
    """One request over a plain socket, read to the end of its response: a load generator should
    cost far less CPU per request than the server it measures (on 2 cores, httpx's would move the
    figures). The response ends where its framing says (Content-Length, or the last chunk), not
    when the server closes the connection, and an answer that never comes is "other"."""
    start = time.monotonic()
    reader, writer = await asyncio.open_connection(host, port)
    seen = bytearray()  # what arrived, to say where an answer that never ended stopped
    try:
        writer.write(payload)
        status, headers, body = await asyncio.wait_for(read_response(reader, seen), timeout_s)
    except (TimeoutError, asyncio.IncompleteReadError, ConnectionError, ValueError) as e:
        return "other", time.monotonic() - start, f"{e!r} after {len(seen)} bytes: ...{bytes(seen[-300:])!r}"
    finally:
        writer.close()
    text = body.decode(errors="replace")
    return classify(status, headers, text), time.monotonic() - start, f"{status} ...{text[-300:]}"


async def read_response(reader: asyncio.StreamReader, seen: bytearray) -> tuple[int, httpx.Headers, bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    seen += head
    lines = head.decode("latin-1").rstrip("\r\n").split("\r\n")
    status = int(lines[0].split()[1]) if len(lines[0].split()) > 1 else 0
    headers = httpx.Headers([tuple(line.split(": ", 1)) for line in lines[1:] if ": " in line])
    if headers.get("content-length") is not None:
        return status, headers, await reader.readexactly(int(headers["content-length"]))
    if headers.get("transfer-encoding") == "chunked":
        body = bytearray()
        while True:
            line = await reader.readuntil(b"\r\n")
            size = int(line.split(b";")[0].strip() or b"0", 16)
            chunk = await reader.readexactly(size + 2)  # the data and its CRLF
            seen += line + chunk
            if size == 0:
                return status, headers, bytes(body)
            body += chunk[:-2]
    return status, headers, await reader.read()


async def burst(url: str, n: int, max_tokens: int) -> list[Outcome]:
    target = httpx.URL(url)
    body = json.dumps(
        {"messages": [{"role": "user", "content": "Talk."}], "max_tokens": max_tokens, "stream": True}
    ).encode()
    payload = (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: {target.host}:{target.port}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    ).encode() + body
    return await asyncio.gather(*[one(target.host, target.port, payload) for _ in range(n)])


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
    times = {kind: [t for k, t, _ in results if k == kind] for kind in ("complete", "refused", "other")}
    for _, _, got in (r for r in results if r[0] == "other"):
        print(f"other: {got}")
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
