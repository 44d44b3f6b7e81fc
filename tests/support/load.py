"""An HTTP load generator for the chat endpoint that accounts for every request it sends.

Each request ends in exactly one of: `complete` (a whole answer: a finish reason, and `[DONE]`
when streamed), `cancelled` (we dropped it mid-stream on purpose), `refused` (a 503 with an
OpenAI error body), `error` (another status or an error event, with a message). Anything else -
a timeout, a connection reset, a stream that stops without `[DONE]` - is `lost`. Used by
`benchmarks/serve.py load` and by the CI load test; `started_together` is the burst of
`benchmarks/serve.py burst` and its CI test; `trickle_body` is the slow upload of
`benchmarks/perimeter.py` and the slow-client tests.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import json
import random
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import httpx
import numpy as np
from PIL import Image


def random_png(rng: random.Random) -> str:
    w, h = rng.randint(24, 160), rng.randint(24, 160)
    pixels = np.random.RandomState(rng.randrange(2**31)).randint(0, 256, (h, w, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def mixed_request(rng: random.Random, max_tokens: tuple[int, int]) -> dict:
    """Text-only or with one or two images; short or long answers; streamed or not."""
    parts: list[dict] = [
        {"type": "image_url", "image_url": {"url": random_png(rng)}} for _ in range(rng.choice([0, 1, 1, 2]))
    ]
    parts.append({"type": "text", "text": rng.choice(["What is this?", "Describe it in detail.", "Why?"])})
    body = {
        "messages": [{"role": "user", "content": parts}],
        "max_tokens": rng.randint(*max_tokens),
        "temperature": rng.choice([0, 0.7]),
        "stream": rng.random() < 0.7,
    }
    if body["stream"]:
        body["stream_options"] = {"include_usage": True}
    return body


@dataclass
class Outcome:
    kind: str
    latency_s: float
    tokens: int = 0
    status: int = 0
    detail: str = ""


@dataclass
class LoadReport:
    outcomes: list[Outcome] = field(default_factory=list)
    wall_s: float = 0.0

    def count(self, kind: str) -> int:
        return sum(o.kind == kind for o in self.outcomes)

    def latencies(self, kind: str) -> list[float]:
        return sorted(o.latency_s for o in self.outcomes if o.kind == kind)

    def summary(self) -> dict:
        done = self.latencies("complete")
        refused = self.latencies("refused")
        tokens = sum(o.tokens for o in self.outcomes)
        return {
            "requests": len(self.outcomes),
            **{k: self.count(k) for k in ("complete", "cancelled", "refused", "error", "lost")},
            "wall_s": round(self.wall_s, 2),
            "tokens_per_s": round(tokens / self.wall_s, 1) if self.wall_s else 0.0,
            "latency_p50_ms": _ms(_pct(done, 0.5)),
            "latency_p99_ms": _ms(_pct(done, 0.99)),
            "refused_p50_ms": _ms(_pct(refused, 0.5)),
            "refused_p99_ms": _ms(_pct(refused, 0.99)),
            "lost_details": [o.detail for o in self.outcomes if o.kind == "lost"][:5],
        }


def _pct(values: list[float], q: float) -> float | None:
    """The q-quantile (the standard library's, inclusive); None when there are none."""
    if len(values) < 2:
        return values[0] if values else None
    return statistics.quantiles(values, n=100, method="inclusive")[round(q * 100) - 1]


def _ms(v: float | None) -> float | None:
    return None if v is None else round(v * 1000, 1)


async def one(client: httpx.AsyncClient, url: str, body: dict, cancel_after: int | None) -> Outcome:
    """Send one request; with `cancel_after`, drop the stream after that many content chunks."""
    start = time.monotonic()
    try:
        if not body.get("stream"):
            r = await client.post(url, json=body)
            return _plain(r, start)
        async with client.stream("POST", url, json=body) as r:
            if r.status_code != 200:
                await r.aread()
                return _plain(r, start)
            return await _stream(r, start, cancel_after)
    except (httpx.HTTPError, TimeoutError, json.JSONDecodeError) as e:
        return Outcome("lost", time.monotonic() - start, detail=f"{type(e).__name__}: {e}")


def _plain(r: httpx.Response, start: float) -> Outcome:
    elapsed = time.monotonic() - start
    try:
        payload = r.json()
    except ValueError:
        return Outcome("lost", elapsed, status=r.status_code, detail=f"non-JSON {r.status_code}")
    if r.status_code == 200:
        tokens = payload["usage"]["completion_tokens"]
        ok = payload["choices"][0]["finish_reason"] in ("stop", "length")
        return Outcome("complete" if ok else "lost", elapsed, tokens, 200, "" if ok else "no finish reason")
    message = payload.get("error", {}).get("message")
    if not message:
        return Outcome("lost", elapsed, status=r.status_code, detail="error without a message")
    kind = "refused" if r.status_code == 503 and "retry-after" in r.headers else "error"
    return Outcome(kind, elapsed, status=r.status_code, detail=message)


async def _stream(r: httpx.Response, start: float, cancel_after: int | None) -> Outcome:
    tokens, chunks, finish, error = 0, 0, None, None
    async for line in r.aiter_lines():
        if not line.startswith("data: "):
            continue
        data = line[len("data: ") :]
        if data == "[DONE]":
            elapsed = time.monotonic() - start
            if error:
                return Outcome("error", elapsed, tokens, 200, error)
            if finish:
                return Outcome("complete", elapsed, tokens, 200)
            return Outcome("lost", elapsed, tokens, 200, "[DONE] without a finish reason")
        event = json.loads(data)
        if "error" in event:
            error = event["error"]["message"]
            continue
        if event.get("usage"):
            tokens = event["usage"]["completion_tokens"]
        for choice in event.get("choices", []):
            finish = choice.get("finish_reason") or finish
            if choice["delta"].get("content"):
                chunks += 1
                tokens = max(tokens, chunks)
        if cancel_after is not None and chunks >= cancel_after and not finish:
            return Outcome("cancelled", time.monotonic() - start, tokens, 200)
    return Outcome("lost", time.monotonic() - start, tokens, 200, "stream ended without [DONE]")


async def closed_loop(
    url: str,
    n: int,
    concurrency: int,
    cancel_fraction: float = 0.1,
    max_tokens: tuple[int, int] = (4, 64),
    seed: int = 0,
    timeout_s: float = 120,
) -> LoadReport:
    """`n` mixed requests, `concurrency` at a time; `cancel_fraction` of them dropped mid-stream."""
    rng = random.Random(seed)
    bodies = [mixed_request(rng, max_tokens) for _ in range(n)]
    cancels = set(rng.sample(range(n), round(n * cancel_fraction)))
    # A cancelled request must be a long stream, or it would finish first: its second message can
    # come a whole shared stream interval after the first (engine.max_stream_messages_per_s).
    for i in cancels:
        bodies[i] |= {
            "stream": True,
            "max_tokens": max(max_tokens[1], 512),
            "stream_options": {"include_usage": True},
        }
    report, sem = LoadReport(), asyncio.Semaphore(concurrency)
    limits = httpx.Limits(max_connections=concurrency * 2)
    async with httpx.AsyncClient(timeout=timeout_s, limits=limits) as client:

        async def bounded(i: int) -> Outcome:
            async with sem:
                return await one(client, f"{url}/v1/chat/completions", bodies[i], 2 if i in cancels else None)

        start = time.monotonic()
        report.outcomes = await asyncio.gather(*[bounded(i) for i in range(n)])
        report.wall_s = time.monotonic() - start
    return report


async def open_loop(
    url: str, rate_per_s: float, duration_s: float, max_tokens: tuple[int, int] = (16, 16), seed: int = 1
) -> LoadReport:
    """Requests arriving at a fixed rate whatever the server does: how overload looks to users."""
    rng = random.Random(seed)
    report = LoadReport()
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=64)
    async with httpx.AsyncClient(timeout=120, limits=limits) as client:
        tasks, start = [], time.monotonic()
        while (now := time.monotonic() - start) < duration_s:
            body = mixed_request(rng, max_tokens)
            body.pop("stream_options", None)
            body["stream"] = False
            tasks.append(asyncio.create_task(one(client, f"{url}/v1/chat/completions", body, None)))
            await asyncio.sleep(max(0.0, len(tasks) / rate_per_s - now))
        report.outcomes = await asyncio.gather(*tasks)
        report.wall_s = time.monotonic() - start
    return report


# A chat request that promises a 10 000-byte body and then sends it a byte at a time.
_TRICKLE_HEAD = (
    b"POST /v1/chat/completions HTTP/1.1\r\nhost: localhost\r\ncontent-type: application/json\r\n"
    b"content-length: 10000\r\n\r\n{"
)


async def trickle_body(
    host: str, port: int, stopped: Callable[[], bool], every_s: float = 0.2
) -> bytes | None:
    """A slow upload: one more byte of the body every `every_s` until the server answers (what
    it sent first; b"" if it closed without a word) or `stopped()` (None: still open). Connection
    errors are the caller's to count."""
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(_TRICKLE_HEAD)
    try:
        while not stopped():
            await writer.drain()
            with contextlib.suppress(TimeoutError):
                return await asyncio.wait_for(reader.read(4096), every_s)
            writer.write(b" ")
        return None
    finally:
        writer.close()


# A burst over plain sockets: a load generator should cost far less CPU per request than the
# server it measures (on 2 cores, httpx's would move the figures).


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
SocketOutcome = tuple[str, float, str]


async def over_socket(host: str, port: int, payload: bytes, timeout_s: float = 120.0) -> SocketOutcome:
    """One request over a plain socket, read to the end of its response. The response ends where
    its framing says (Content-Length, or the last chunk), not when the server closes the
    connection, and an answer that never comes is "other"."""
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


async def started_together(url: str, n: int, max_tokens: int) -> list[SocketOutcome]:
    target = httpx.URL(url)
    body = json.dumps(
        {"messages": [{"role": "user", "content": "Talk."}], "max_tokens": max_tokens, "stream": True}
    ).encode()
    payload = (
        f"POST {target.raw_path.decode()} HTTP/1.1\r\nHost: {target.host}:{target.port}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    ).encode() + body
    return await asyncio.gather(*[over_socket(target.host, target.port, payload) for _ in range(n)])
