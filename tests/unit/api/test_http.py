"""Slow clients and crowds against a real uvicorn on loopback: uploads that trickle and readers
that stop reading hold nothing another request needs, and the proxy's edge refuses past its limit
before the app sees anything."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket

import httpx
import uvicorn
from fastapi import FastAPI

from llava_serve.api.admission import Admission
from llava_serve.api.http import EdgeAdmission, RequestGuard, SendTimeout
from llava_serve.config import AdmissionConfig, LimitsConfig
from tests.support.load import trickle_body


@contextlib.asynccontextmanager
async def serving(app, send_buffer: int | None = None):
    """`app` under uvicorn on 127.0.0.1; its URL. `send_buffer` caps the kernel's send buffer of
    every connection (accepted sockets inherit the listener's), so a stalled reader is felt soon."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if send_buffer:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, send_buffer)
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
    task = asyncio.ensure_future(server.serve(sockets=[sock]))
    while not server.started:
        await asyncio.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        await task


def guarded_app(admission: Admission, limits: LimitsConfig) -> RequestGuard:
    app = FastAPI()

    @app.post("/v1/chat/completions")
    async def chat(body: dict):
        return {"echo": body}

    return RequestGuard(app, limits, admission)


async def trickle(url: str, stop: asyncio.Event) -> bytes | None:
    host, port = url.removeprefix("http://").split(":")
    return await trickle_body(host, int(port), stop.is_set)


async def test_a_body_slower_than_the_minimum_rate_is_a_408_and_holds_nothing():
    admission = Admission(AdmissionConfig())
    limits = LimitsConfig(min_body_bytes_per_s=100, body_grace_s=0.5)
    async with serving(guarded_app(admission, limits)) as url:
        answer = await asyncio.wait_for(trickle(url, asyncio.Event()), 10)
        status, _, rest = answer.partition(b"\r\n")
        assert b" 408 " in status, answer
        error = json.loads(rest.partition(b"\r\n\r\n")[2])["error"]
        assert error["code"] == "request_timeout" and "limits.min_body_bytes_per_s" in error["message"]
        assert (admission.receiving, admission.inflight) == (0, 0)


async def test_200_trickling_uploads_do_not_keep_a_normal_request_out():
    admission = Admission(AdmissionConfig())  # 128 in flight: fewer than the tricklers
    async with serving(guarded_app(admission, LimitsConfig())) as url:
        stop = asyncio.Event()
        tricklers = [asyncio.ensure_future(trickle(url, stop)) for _ in range(200)]
        try:
            while admission.receiving < 200:
                await asyncio.sleep(0.05)
            async with httpx.AsyncClient() as client:
                r = await client.post(f"{url}/v1/chat/completions", json={"messages": []}, timeout=10)
            assert r.status_code == 200, r.text
            assert admission.inflight == 0 and admission.receiving == 200
        finally:
            stop.set()
            await asyncio.gather(*tricklers, return_exceptions=True)


async def test_a_reader_that_stops_reading_is_dropped_and_its_response_stopped():
    state = {"sent": 0, "disconnected": False}

    async def endless(scope, receive, send):  # streams until the server says the client left
        async def listen():
            while (await receive())["type"] != "http.disconnect":
                pass
            state["disconnected"] = True

        listener = asyncio.ensure_future(listen())
        await send({"type": "http.response.start", "status": 200, "headers": []})
        while not state["disconnected"] and state["sent"] < 10_000:
            await send({"type": "http.response.body", "body": b"x" * 65536, "more_body": True})
            state["sent"] += 1
        listener.cancel()

    async with serving(SendTimeout(endless, timeout_s=0.5), send_buffer=4096) as url:
        host, port = url.removeprefix("http://").split(":")
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.setblocking(False)
        loop = asyncio.get_running_loop()
        await loop.sock_connect(sock, (host, int(port)))
        await loop.sock_sendall(sock, b"GET / HTTP/1.1\r\nhost: localhost\r\n\r\n")
        assert await loop.sock_recv(sock, 1024)  # it reads a little, then never again
        for _ in range(100):
            if state["disconnected"]:
                break
            await asyncio.sleep(0.05)
        dropped, sent = state["disconnected"], state["sent"]  # the client is still connected
        sock.close()
    assert dropped and sent < 100


async def test_a_reader_that_keeps_reading_is_never_dropped():
    async def short(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": []})
        for _ in range(50):
            await send({"type": "http.response.body", "body": b"y" * 65536, "more_body": True})
            await asyncio.sleep(0.01)
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    async with (
        serving(SendTimeout(short, timeout_s=0.5), send_buffer=4096) as url,
        httpx.AsyncClient() as client,
    ):
        r = await client.get(url, timeout=30)
    assert r.status_code == 200 and len(r.content) == 50 * 65536


async def test_the_edge_refuses_past_its_limit_before_the_app_and_counts_no_arriving_body():
    entered, arriving, release = [], set(), asyncio.Event()

    async def held(scope, receive, send):  # reads its whole body, then waits to answer
        while (await receive()).get("more_body", False):
            arriving.add(id(scope))
        entered.append(scope["path"])
        await release.wait()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})

    refusals = []
    edge = EdgeAdmission(held, limit=2, retry_after_s=3, on_refused=lambda: refusals.append(1))
    chat = "/v1/chat/completions"
    async with serving(edge) as url, httpx.AsyncClient() as client:
        first = [asyncio.ensure_future(client.post(url + chat, content=b"{}", timeout=10)) for _ in range(2)]
        while len(entered) < 2:
            await asyncio.sleep(0.01)
        refused = await client.post(url + chat, content=b"{}", timeout=10)
        assert refused.status_code == 503 and refused.headers["retry-after"] == "3"
        error = refused.json()["error"]
        assert error["type"] == "overloaded_error" and "LLAVA_SERVE_EDGE_MAX_INFLIGHT" in error["message"]
        assert len(entered) == 2 and len(refusals) == 1  # the app never saw it; the proxy counted it
        release.set()
        assert [r.status_code for r in await asyncio.gather(*first)] == [200, 200]
        stop = asyncio.Event()
        tricklers = [asyncio.ensure_future(trickle(url, stop)) for _ in range(3)]
        try:  # three bodies arriving, more than the limit: none of them counts
            for _ in range(200):
                if len(arriving) == 3:
                    break
                await asyncio.sleep(0.05)
            assert len(arriving) == 3 and edge.inflight == 0, "an arriving body was counted"
            assert (await client.post(url + chat, content=b"{}", timeout=10)).status_code == 200
        finally:
            stop.set()
            await asyncio.gather(*tricklers, return_exceptions=True)
    assert edge.inflight == 0
