"""What one request may cost, through the running app: each request here was accepted (or
answered with a 500) before the perimeter work; each now gets a 4xx naming its limit, and the
server carries on."""

from __future__ import annotations

import base64
import re
import time

import httpx
import pytest
from PIL import Image
from ray import serve

from tests.conftest import data_uri, encode, random_image
from tests.e2e.test_hostile import IMAGE_PARAM, assert_4xx, post
from tests.reference import image_request


def still_serves(serve_url: str) -> None:
    r = post(serve_url, image_request(data_uri(random_image(5)), "Hi", max_tokens=2))
    assert r.status_code == 200, r.text


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
    body = {"messages": [{"role": "user", "content": "Talk."}], "max_tokens": 1500, "stream": True}
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
