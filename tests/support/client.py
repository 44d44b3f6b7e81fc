"""Requests to a running server, as a caller writes them, and the checks on its answers."""

from __future__ import annotations

import threading
import time

import httpx

from tests.support.media import data_uri, random_image


def image_request(url: str, question: str = "What is in this image?", **params) -> dict:
    return {
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": url}},
                    {"type": "text", "text": question},
                ],
            }
        ],
        **params,
    }


IMAGE_PARAM = "messages[0].content[0].image_url.url"


def post(serve_url: str, body: dict, **kw) -> httpx.Response:
    return httpx.post(f"{serve_url}/v1/chat/completions", json=body, timeout=kw.pop("timeout", 30), **kw)


def assert_4xx(r: httpx.Response, param: str | None = ..., fragment: str = "") -> dict:
    assert 400 <= r.status_code < 500, (r.status_code, r.text)
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["type"] == "invalid_request_error"
    if param is not ...:
        assert error["param"] == param, error
    assert fragment in error["message"], error
    return error


def ok_request(serve_url: str) -> None:
    r = post(serve_url, image_request(data_uri(random_image(99)), max_tokens=4, temperature=0))
    assert r.status_code == 200, r.text


def still_serves(serve_url: str) -> None:
    r = post(serve_url, image_request(data_uri(random_image(5)), "Hi", max_tokens=2))
    assert r.status_code == 200, r.text


def stream_gaps(serve_url: str, during=None, max_tokens: int = 120) -> list[float]:
    """Seconds between the chunks of one running stream, while `during()` runs beside it; the
    stream must end with [DONE]."""

    body = {
        "messages": [{"role": "user", "content": "Talk."}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
    }
    gaps, last, worker, failed, done = [], None, None, [], False

    def run():
        try:
            during()
        except BaseException as e:  # raised again below, on the test's own thread
            failed.append(e)

    with httpx.stream("POST", f"{serve_url}/v1/chat/completions", json=body, timeout=60) as r:
        for line in r.iter_lines():
            done = done or line == "data: [DONE]"
            if not line.startswith("data: {"):
                continue
            assert '"error"' not in line, line
            now = time.monotonic()
            if last is None and during is not None:
                worker = threading.Thread(target=run)
                worker.start()
            elif last is not None:
                gaps.append(now - last)
            last = now
    if worker is not None:
        worker.join()
    if failed:
        raise failed[0]
    assert done, "the stream ended without [DONE]"
    return gaps
