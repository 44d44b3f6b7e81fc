"""Hostile and broken input through the running app: a precise 4xx each time, and nothing dies."""

from __future__ import annotations

import asyncio
import base64
import threading
import time

import httpx
import numpy as np
import pytest
from ray import serve

from llava_serve.engine.sampling import SamplingParams
from llava_serve.errors import EngineError
from llava_serve.types import PreparedImage, PromptInputs
from tests.support.client import IMAGE_PARAM, assert_4xx, image_request, ok_request, post
from tests.support.hostile_media import many_frame_gif, many_scan_jpeg
from tests.support.media import animated_gif, data_uri, encode, inline, png_bomb, random_image


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "GIF", "BMP"])
def test_each_accepted_format_is_served_by_url(serve_url, image_server, fmt):
    url = image_server.add(f"/ok.{fmt.lower()}", encode(random_image(5), fmt), f"image/{fmt.lower()}")
    r = post(serve_url, image_request(url, max_tokens=4, temperature=0))
    assert r.status_code == 200, r.text


def test_animated_gif_is_accepted(serve_url, image_server):
    # That only frame 0 is used is shown on pixels in tests/unit/inputs/test_images.py.
    url = image_server.add("/anim.gif", animated_gif(), "image/gif")
    assert post(serve_url, image_request(url, max_tokens=4)).status_code == 200


def test_a_gif_of_thousands_of_frames_costs_only_its_first(serve_url):
    """3000 one-pixel frames on a 4000-pixel canvas (69 kB): walking them would take about two
    minutes here, far past the 10 s decode deadline; the first frame alone is decoded and served."""
    body = image_request(inline(many_frame_gif(), "image/gif"), max_tokens=4, temperature=0)
    r = post(serve_url, body, timeout=60)
    assert r.status_code == 200, r.text


def test_a_jpeg_of_thousands_of_scans_is_stopped_at_the_decode_deadline(serve_url):
    """A 620 kB progressive JPEG of 10 000 repeated scans (5000 take libjpeg 42 s here): its
    worker is killed at images.decode_timeout_s (10 s), the caller gets a 400 naming it, a text
    request beside it is answered meanwhile, and the next image is served by a fresh worker."""
    beside = []
    text = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}
    worker = threading.Thread(target=lambda: (time.sleep(2), beside.append(post(serve_url, text))))
    worker.start()
    start = time.monotonic()
    jpeg = inline(many_scan_jpeg(repeats=10_000), "image/jpeg")  # past the deadline on a fast machine too
    r = post(serve_url, image_request(jpeg, max_tokens=4), timeout=60)
    took = time.monotonic() - start
    worker.join()
    error = assert_4xx(r, IMAGE_PARAM, "images.decode_timeout_s")
    assert error["code"] == "decode_timeout" and took < 30, (error, took)
    assert beside[0].status_code == 200, beside[0].text
    ok_request(serve_url)


@pytest.mark.parametrize(
    ("route", "fragment"),
    [
        ("drip", "longer than 2.0s"),
        ("endless", "larger than the limit of 1048576 bytes"),
        ("declared-huge", "larger than the limit"),
        ("short-body", "could not fetch image"),
        ("html", "not an image"),
        ("truncated", "could not decode image"),
        ("bomb", "over the limit of 50000000"),
        ("tiff", "format TIFF is not accepted"),
        ("too-many-hops", "redirected more than 3 times"),
        ("to-private", "private, loopback"),
        ("to-file", "only http(s) is followed"),
        ("missing", "HTTP 404"),
    ],
)
def test_hostile_image_hosts_get_a_precise_400(serve_url, image_server, forbidden_target, route, fragment):
    png = encode(random_image(2))
    base = image_server.base_url
    image_server.drip("/drip", png, interval_s=0.25)
    image_server.endless("/endless")
    image_server.add("/declared-huge", png, headers={"Content-Length": str(10**9)})
    image_server.route("/short-body", _short_body)
    image_server.add("/html", b"<html><body>not a cat</body></html>", "image/png")  # lying Content-Type
    image_server.add("/truncated", png[: len(png) // 2])
    image_server.add("/bomb", png_bomb())
    image_server.add("/tiff", encode(random_image(3), "TIFF"), "image/tiff")
    for i in range(5):
        image_server.redirect(f"/hop{i}", f"{base}/hop{i + 1}")
    image_server.redirect("/too-many-hops", f"{base}/hop0")
    image_server.redirect("/to-private", f"{forbidden_target.base_url}/x")
    image_server.redirect("/to-file", "file:///etc/passwd")
    before = forbidden_target.connections
    r = post(serve_url, image_request(f"{base}/{route}", max_tokens=4))
    assert_4xx(r, IMAGE_PARAM, fragment)
    assert forbidden_target.connections == before


def _short_body(h) -> None:
    """Declares more than it sends, then hangs up."""
    h.send_response(200)
    h.send_header("Content-Type", "image/png")
    h.send_header("Content-Length", "100000")
    h.end_headers()
    h.wfile.write(b"\x89PNG\r\n\x1a\n")


def test_a_lying_content_type_does_not_matter_when_the_bytes_are_an_image(serve_url, image_server):
    url = image_server.add("/really-a-png.txt", encode(random_image(4)), "text/html")
    assert post(serve_url, image_request(url, max_tokens=4)).status_code == 200


@pytest.mark.parametrize(
    "host",
    [
        "127.0.0.1:{port}",
        "localhost:{port}",
        "[::1]:{port}",
        "0.0.0.0:{port}",
        "2130706433:{port}",
        "0x7f000001:{port}",
        "0177.0.0.1:{port}",
        "10.0.0.1",
        "169.254.169.254",
    ],
)
def test_private_destinations_are_refused_without_a_connection(serve_url, forbidden_target, host):
    before = forbidden_target.connections
    url = f"http://{host.format(port=forbidden_target.port)}/latest/meta-data/"
    r = post(serve_url, image_request(url, max_tokens=4), timeout=10)
    assert assert_4xx(r, IMAGE_PARAM, "private, loopback")["code"] == "image_url_forbidden"
    assert forbidden_target.connections == before


@pytest.mark.parametrize(
    ("source", "fragment"),
    [
        (f"data:image/png;base64,{base64.b64encode(png_bomb()).decode()}", "over the limit of"),
        (f"data:image/png;base64,{'A' * (2 * 1024 * 1024)}", "larger than the limit"),
        ("data:image/png,rawbytes", "must be base64"),
        ("data:image/png;base64,!!!notbase64", "not valid base64"),
        ("file:///etc/passwd", "scheme 'file'"),
        ("gopher://example.com/", "scheme 'gopher'"),
        ("/etc/passwd", "scheme '(none)'"),
    ],
)
def test_hostile_inline_sources_get_a_precise_400(serve_url, source, fragment):
    assert_4xx(post(serve_url, image_request(source, max_tokens=4)), IMAGE_PARAM, fragment)


def user(*parts) -> dict:
    return {"messages": [{"role": "user", "content": list(parts)}]}


TEXT = {"type": "text", "text": "hi"}
IMAGE = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}


@pytest.mark.parametrize(
    ("body", "param", "fragment"),
    [
        ({"messages": "hello"}, "messages", "valid list"),
        ({"messages": [{"role": "user"}]}, "messages[0].content", "Field required"),
        ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content", "valid string or"),
        ({"messages": [{"role": "user", "content": []}]}, "messages[0].content", "at least 1 item"),
        ({"messages": [{"role": "user", "content": "  "}]}, None, "no text and no image"),
        ({"messages": [{"role": "system", "content": "hi"}]}, None, "at least one user message"),
        (user({"type": "image_url"}), "messages[0].content[0].image_url", "Field required"),
        (user({"type": "image_url", "image_url": {"url": ""}}, TEXT), IMAGE_PARAM, "at least 1 character"),
        (user({"type": "audio", "audio": {}}), "messages[0].content[0]", "'audio'"),
        (user(*[IMAGE] * 5, TEXT), "messages", "5 images; the limit is 4"),
        ({**user(TEXT), "max_tokens": 0}, "max_tokens", "greater than or equal to 1"),
        ({**user(TEXT), "max_tokens": "many"}, "max_tokens", "valid integer"),
        ({**user(TEXT), "top_p": 0}, "top_p", "greater than 0"),
        ({**user(TEXT), "top_k": -1}, "top_k", "greater than or equal to 0"),
        ({**user(TEXT), "temperature": -0.5}, "temperature", "greater than or equal to 0"),
        ({**user(TEXT), "stop": [""]}, "stop", "non-empty"),
        ({**user(TEXT), "stop": ["a", "b", "c", "d", "e"]}, "stop", "at most 4"),
        ({**user(TEXT), "stream_options": {"include_usage": True}}, "stream_options", "stream: true"),
        ({**user(TEXT), "n": 30}, "n", "limit of 8"),
        (user({"type": "text", "text": "word " * 5000}), "messages", "over the model's context length"),
        ({**user(TEXT), "max_tokens": 4000}, "messages", "max_tokens is 4000"),
    ],
)
def test_bad_request_bodies_name_the_field_and_the_limit(serve_url, body, param, fragment):
    assert_4xx(post(serve_url, body), param, fragment)


def test_non_json_and_wrong_content_types_are_400(serve_url):
    for content in [b"", b"[]", b"null", b'{"messages": [', "\ud800".encode("utf-8", "surrogatepass")]:
        r = httpx.post(
            f"{serve_url}/v1/chat/completions", content=content, headers={"content-type": "application/json"}
        )
        assert_4xx(r)
    ok_request(serve_url)


async def test_a_model_side_failure_fails_that_request_alone(serve_url):
    """A malformed image reaching the model (as a buggy caller app could send) fails only itself."""
    model = serve.get_deployment_handle("LlavaModel", "llava").options(stream=True)
    broken = PreparedImage(np.zeros((3, 7, 7), np.float32), "broken")
    prompt = PromptInputs([1, 4, 5, 6], 1)
    good = image_request(data_uri(random_image(98)), max_tokens=6, temperature=0)
    async with httpx.AsyncClient(timeout=30) as client:
        ok = asyncio.create_task(client.post(f"{serve_url}/v1/chat/completions", json=good))
        with pytest.raises(EngineError):
            _ = [o async for o in model.generate.remote(prompt, SamplingParams(max_tokens=4), broken)]
        assert (await ok).status_code == 200
