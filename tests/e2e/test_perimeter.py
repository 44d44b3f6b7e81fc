"""What one request may cost, through the running app: each request here was accepted (or
answered with a 500) before the perimeter work; each now gets a 4xx naming its limit, and the
server carries on."""

from __future__ import annotations

import asyncio
import base64
import json
import re
import socket
import statistics
import time
from urllib.parse import urlsplit

import httpx
import pytest
from PIL import Image
from ray import serve
from transformers import AutoTokenizer

from tests.support.client import IMAGE_PARAM, assert_4xx, image_request, post, still_serves, stream_gaps
from tests.support.media import data_uri, encode, random_image


@pytest.mark.parametrize(
    ("bias", "fragment"),
    [
        ({"²": 1}, "not one"),  # a digit in another script: str.isdigit() says yes, int() no
        ({"٣": 1}, "not one"),  # Arabic-Indic three
        ({"1" * 5000: 1}, "not one"),  # past int()'s digit limit
        ({"99999999999": 1}, "not one"),  # longer than any vocabulary's ids
        ({"123456": 1}, "outside"),  # a plain id past the tiny model's vocabulary
    ],
)
def test_logit_bias_keys_that_are_no_token_id_are_a_400(serve_url, bias, fragment):
    body = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2, "logit_bias": bias}
    assert_4xx(post(serve_url, body), "logit_bias", fragment)
    still_serves(serve_url)


@pytest.mark.parametrize("pattern", ["a{4294967296}", "[a-z]{0,99999999999999999999}", "(a{2,4294967299})"])
def test_a_pattern_past_the_regex_engine_s_range_is_a_400(serve_url, pattern):
    schema = {"type": "object", "properties": {"s": {"type": "string", "pattern": pattern}}}
    body = {
        "messages": [{"role": "user", "content": "Hi"}],
        "max_tokens": 2,
        "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}},
    }
    assert_4xx(post(serve_url, body, timeout=60), "response_format.json_schema.schema")
    still_serves(serve_url)


def test_json_nested_thousands_deep_is_a_400_in_openai_s_shape(serve_url):
    deep = '{"messages": ' + "[" * 5000 + "]" * 5000 + "}"
    r = httpx.post(
        f"{serve_url}/v1/chat/completions", content=deep, headers={"content-type": "application/json"}
    )
    assert_4xx(r)
    still_serves(serve_url)


def test_video_for_a_model_without_video_is_refused_before_anything_is_fetched(serve_url, image_server):
    before = len(image_server.requests)
    url = image_server.add("/clip.mp4", b"\x00" * 64, "video/mp4")
    body = {
        "messages": [
            {
                "role": "user",
                "content": [{"type": "video_url", "video_url": {"url": url}}, {"type": "text", "text": "Hi"}],
            }
        ],
        "max_tokens": 2,
    }
    assert_4xx(post(serve_url, body), "messages[0].content[0].video_url.url", "does not take video")
    assert len(image_server.requests) == before


@pytest.mark.parametrize("size", [(20000, 1), (1, 20000), (6000, 2)])
def test_an_image_whose_resize_would_explode_is_a_400_before_resizing(serve_url, size):
    """A few hundred bytes of PNG whose shortest edge the processor would scale up to its tile:
    20000x1 becomes 6.7 million x 336 pixels."""
    tiny_png = encode(Image.new("RGB", size, (9, 9, 9)), "PNG")
    assert len(tiny_png) < 2000
    uri = "data:image/png;base64," + base64.b64encode(tiny_png).decode()
    assert_4xx(post(serve_url, image_request(uri, "Hi", max_tokens=2)), IMAGE_PARAM, "aspect ratio")
    still_serves(serve_url)


def test_a_client_cannot_switch_off_serve_s_disconnect_handling(serve_url):
    """`x-request-disconnect-disabled: ?1` would keep generating after the client left."""
    # As long as the tiny model's context allows, with no early end-of-sequence: left alone, its
    # reply to "Talk." ends in ~1 s, inside the time a busy machine may take to notice the leaving.
    body = {
        "messages": [{"role": "user", "content": "Talk."}],
        "max_tokens": 2000,
        "min_tokens": 2000,
        "stream": True,
    }
    model = serve.get_deployment_handle("LlavaModel", "llava")
    before = model.stats.remote().result()["cancelled"]
    headers = {"x-request-disconnect-disabled": "?1"}
    with httpx.stream(
        "POST", f"{serve_url}/v1/chat/completions", json=body, headers=headers, timeout=30
    ) as r:
        lines = r.iter_lines()
        assert sum(next(lines).startswith("data: {") for _ in range(6)) >= 2
    deadline = time.monotonic() + 5
    while model.stats.remote().result()["cancelled"] < before + 1:
        assert time.monotonic() < deadline, "the request went on after its client left"
        time.sleep(0.05)


def test_a_client_cannot_shorten_or_lift_serve_s_request_timeout(serve_url):
    """`x-request-timeout-seconds` from the client is ignored: a tiny one would cut the caller's
    own request short with Serve's error, not ours; 0 would lift the operator's timeout."""
    body = image_request(data_uri(random_image(6)), "Hi", max_tokens=4)
    r = post(serve_url, body, headers={"x-request-timeout-seconds": "0.0001"})
    assert r.status_code == 200, r.text


@pytest.mark.parametrize(
    ("sent", "kept"),
    [("req-42.a:b_c", True), ("x" * 129, False), ("has space", False), ("é-unicode", False), ("", False)],
)
def test_a_request_id_is_kept_only_when_it_is_a_short_plain_token(serve_url, sent, kept):
    r = post(
        serve_url,
        {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1},
        headers={"x-request-id": sent.encode()},
    )
    assert r.status_code == 200
    echoed = r.headers["x-request-id"]
    assert (echoed == sent) == kept
    assert re.fullmatch(r"[A-Za-z0-9._:-]{1,128}", echoed)


def user(text: str = "Hi") -> dict:
    return {"role": "user", "content": text}


def schema_format(schema: dict) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}


def tool(i: int, parameters: dict | None = None) -> dict:
    return {"type": "function", "function": {"name": f"f{i}", "parameters": parameters or {"type": "object"}}}


@pytest.mark.parametrize(
    ("body", "status", "knob"),
    [
        ({"messages": [user()], "stop": ["a"] * 120_000}, 413, "max_json_values"),
        ({"messages": [user()] * 513}, 400, "max_messages"),
        (
            {"messages": [{"role": "user", "content": [{"type": "text", "text": "a"}] * 1025}]},
            400,
            "max_content_parts",
        ),
        ({"messages": [user("a" * 600_000), user("b" * 500_000)]}, 400, "max_text_chars"),
        ({"messages": [user()], "tools": [tool(i) for i in range(129)]}, 400, "max_tools"),
        (
            {"messages": [user()], "response_format": schema_format({"description": "d" * 70_000})},
            400,
            "max_schema_bytes",
        ),
        (
            {"messages": [user()], "response_format": schema_format({"enum": list(range(5000))})},
            400,
            "max_schema_nodes",
        ),
        ({"messages": [user()], "tools": [tool(0, {"enum": list(range(5000))})]}, 400, "max_schema_nodes"),
    ],
)
def test_bodies_past_a_shape_limit_are_refused_naming_it(serve_url, body, status, knob):
    r = post(serve_url, body | {"max_tokens": 2})
    assert r.status_code == status, r.text
    assert f"limits.{knob}" in r.json()["error"]["message"]


def test_a_flood_of_pathological_bodies_leaves_a_running_stream_s_cadence_alone(serve_url):
    """A 30 MB body of a million messages took the ingress loop seconds to parse and validate
    when FastAPI did it there; now it is counted as it arrives and refused after its first
    megabyte. Moving 30 MB through the proxy costs this 2-core machine's CPU whatever the server
    does with it, so the control is a flood of larger bodies refused from their headers alone:
    the pathological flood must cost the running stream no more than that."""
    flood = b'{"messages": [' + b",".join([b'{"role":"user","content":"a"}'] * 1_000_000) + b"]}"
    control = b'{"messages": [], "x": "' + b"a" * (34 * 1024 * 1024) + b'"}'  # over max_request_bytes
    assert len(flood) < 32 * 1024 * 1024 < len(control)
    statuses = []

    def sender(body: bytes):
        def send():
            for _ in range(3):
                headers = {"content-type": "application/json"}
                r = httpx.post(f"{serve_url}/v1/chat/completions", content=body, headers=headers, timeout=120)
                statuses.append(r.status_code)

        return send

    alone = p99(stream_gaps(serve_url))
    transport = p99(stream_gaps(serve_url, during=sender(control)))
    flooded = p99(stream_gaps(serve_url, during=sender(flood)))
    assert statuses == [413] * 6
    print(
        f"\nstream gap p99: alone {alone * 1e3:.0f} ms, beside bodies refused by their size "
        f"{transport * 1e3:.0f} ms, beside the million-message bodies {flooded * 1e3:.0f} ms"
    )
    assert flooded < 1.5 * transport + 0.03, (alone, transport, flooded)


def test_hard_grammars_arriving_leave_a_running_stream_s_cadence_alone(serve_url):
    """Each schema is a different anyOf of hundreds of objects (0.5-1 s of llguidance work here),
    so none comes from the cache. 600 branches compile; 700 make the row after `{"` 2100 items
    wide, past `engine.grammar_limits.max_items_in_row`, which used to surface mid-answer as a
    500 and is now found while compiling: a 400. Both happen on the model replica's grammar
    thread, before the request joins the batch; the running stream's steps never wait."""
    results = []

    def arrivals():
        for n in [600, 700] * 3:
            branches = [
                {"type": "object", "properties": {f"k{i}_{n}_{len(results)}": {"const": i}}} for i in range(n)
            ]
            body = {
                "messages": [user()],
                "max_tokens": 3,
                "response_format": schema_format({"anyOf": branches}),
            }
            r = post(serve_url, body)
            results.append((r.status_code, r.json()["error"]["message"] if r.status_code != 200 else ""))

    alone = p99(stream_gaps(serve_url))
    beside = p99(stream_gaps(serve_url, during=arrivals))
    assert [status for status, _ in results] == [200, 400] * 3, results
    assert all("max is 2000" in message for _, message in results[1::2]), results
    print(f"\nstream gap p99: alone {alone * 1e3:.0f} ms, while hard grammars compile {beside * 1e3:.0f} ms")
    assert beside < 2 * alone + 0.03, (alone, beside)


async def test_a_client_that_stops_reading_mid_stream_is_dropped_and_frees_its_slot(serve_url, tiny_dir):
    """A streaming client that stops reading holds a KV slot only until one write has waited the
    proxy's send timeout (2 s in this session, see conftest). The client's socket advertises a
    small window and segment size, so the server's buffers fill after some tens of kilobytes of
    logprob-heavy chunks rather than megabytes. Its end-of-sequence token is banned, so the answer would
    run its full 2000 tokens (a minute or more here) if nobody dropped it."""
    eos = AutoTokenizer.from_pretrained(tiny_dir).eos_token_id
    model = serve.get_deployment_handle("LlavaModel", "llava")
    body = {
        "messages": [user("Talk.")],
        "max_tokens": 2000,
        "stream": True,
        "logprobs": True,
        "top_logprobs": 20,
        "logit_bias": {str(eos): -100},
    }
    payload = json.dumps(body).encode()
    url = urlsplit(serve_url)
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG, 536)
    sock.connect((url.hostname, url.port))
    sock.sendall(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (len(payload), payload)
    )
    try:
        start = time.monotonic()
        while (await model.stats.remote())["running"] == 0:
            if time.monotonic() - start > 30:
                sock.settimeout(1)
                raise AssertionError(f"the stream never started: {sock.recv(4096)!r}")
            await asyncio.sleep(0.1)
        started = time.monotonic()
        while (await model.stats.remote())["running"]:
            assert time.monotonic() - started < 30, "a reader that stopped still holds its slot after 30 s"
            await asyncio.sleep(0.2)
        held = time.monotonic() - started
        sock.settimeout(10)
        seen = b""
        while chunk := sock.recv(1 << 16):  # what the buffers held, then the server's close
            seen += chunk
    finally:
        sock.close()
    assert seen.startswith(b"HTTP/1.1 200") and b"data: {" in seen, seen[:300]
    assert b"data: [DONE]" not in seen  # dropped, not finished
    print(f"\na reader that stopped was dropped {held:.1f}s into its stream, after {len(seen)} bytes")


async def test_a_burst_past_the_limit_is_refused_at_the_proxy_before_it_is_routed(serve_url, metrics_url):
    """200 streams at once against 128 admission slots: every 503 comes from the proxy's edge
    (conftest sets its limit to the config's 128, as `llava-serve serve` does), so no refusal
    waits on the ingress replica's loop behind the admitted streams' work, and every admitted
    stream completes."""
    # Long enough that 128 are open at once while the rest arrive, on a fast machine too.
    body = {"messages": [user("Talk.")], "max_tokens": 100, "stream": True}

    async def one(client: httpx.AsyncClient) -> tuple[int, str]:
        async with client.stream("POST", f"{serve_url}/v1/chat/completions", json=body, timeout=120) as r:
            return r.status_code, (await r.aread()).decode()

    async with httpx.AsyncClient(limits=httpx.Limits(max_connections=None)) as client:
        results = await asyncio.gather(*(one(client) for _ in range(200)))
    refused = [json.loads(text)["error"] for status, text in results if status == 503]
    complete = [text for status, text in results if status == 200 and text.rstrip().endswith("[DONE]")]
    assert len(refused) + len(complete) == 200, [r for r in results if r[0] not in (200, 503)][:3]
    assert refused and all(
        e["type"] == "overloaded_error" and "LLAVA_SERVE_EDGE_MAX_INFLIGHT" in e["message"] for e in refused
    ), refused[:3]
    assert len(complete) >= 128
    deadline = time.monotonic() + 60  # the proxy's count of them reaches Prometheus
    while "ray_llava_edge_refusals_total" not in httpx.get(metrics_url, timeout=10).text:
        assert time.monotonic() < deadline, "the proxy's refusals were never exported"
        await asyncio.sleep(1)


def p99(gaps: list[float]) -> float:
    return statistics.quantiles(gaps, n=100, method="inclusive")[98]
