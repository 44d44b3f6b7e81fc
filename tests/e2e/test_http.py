"""The OpenAI-compatible HTTP surface of a running app, checked against `transformers.generate`."""

import io
import json

import httpx
import pytest
from PIL import Image

from tests.support.client import image_request
from tests.support.media import data_uri, encode, random_image
from tests.support.oracle import hf_greedy, reference_inputs


def sse_events(response: httpx.Response) -> list:
    events = []
    for line in response.iter_lines():
        if line.startswith("data: "):
            payload = line[len("data: ") :]
            events.append(payload if payload == "[DONE]" else json.loads(payload))
    return events


def test_greedy_completion_equals_transformers_generate(serve_url, processor, hf_model):
    image = random_image(10, (80, 60))
    body = image_request(data_uri(image), max_tokens=20, temperature=0)
    expected, prompt_tokens = hf_greedy(processor, hf_model, body["messages"], [image], 20)
    r = httpx.post(f"{serve_url}/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["object"] == "chat.completion" and out["model"] == "llava-tiny"
    assert out["choices"][0]["message"] == {"role": "assistant", "content": expected}
    assert out["usage"]["prompt_tokens"] == prompt_tokens
    assert out["usage"]["completion_tokens"] <= 20
    assert r.headers["x-request-id"]


def test_streamed_completion_equals_transformers_generate(serve_url, processor, hf_model):
    image = random_image(11, (33, 90), "RGBA")
    body = image_request(
        data_uri(image),
        "Describe it.",
        max_tokens=24,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    expected, prompt_tokens = hf_greedy(processor, hf_model, body["messages"], [image], 24)
    with httpx.stream("POST", f"{serve_url}/v1/chat/completions", json=body, timeout=60) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        events = sse_events(r)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert text == expected
    finish = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]]
    assert finish[-1] in ("stop", "length") and not any(finish[:-1])
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["prompt_tokens"] == prompt_tokens
    assert len({c["id"] for c in chunks}) == 1


def test_http_image_url_is_fetched(serve_url, image_server, processor, hf_model):
    image = random_image(12, (64, 64))
    url = image_server.add("/cat.jpg", encode(image, "JPEG"), "image/jpeg")
    body = image_request(url, max_tokens=12, temperature=0)
    expected, _ = hf_greedy(
        processor, hf_model, body["messages"], [Image.open(io.BytesIO(encode(image, "JPEG")))], 12
    )
    r = httpx.post(f"{serve_url}/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"] == expected


@pytest.mark.parametrize(
    ("body", "param", "fragment"),
    [
        ({"messages": []}, "messages", "at least 1"),
        (
            {"messages": [{"role": "robot", "content": "hi"}]},
            "messages[0].role",
            "'system', 'developer', 'user', 'assistant' or 'tool'",
        ),
        (
            {"messages": [{"role": "user", "content": "hi"}], "temperature": 3},
            "temperature",
            "less than or equal to 2",
        ),
        ({"messages": [{"role": "user", "content": "hi"}], "n": 0}, "n", "greater than or equal to 1"),
        ({"messages": [{"role": "user", "content": "hi"}], "functions": []}, "functions", "Extra inputs"),
        (
            {"messages": [{"role": "user", "content": "hi"}], "logit_bias": {"5": 101}},
            "logit_bias",
            "[-100, 100]",
        ),
        (
            {"messages": [{"role": "user", "content": "hi"}], "logit_bias": {"99999999": 1}},
            "logit_bias",
            "outside 0..",
        ),
        (
            {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 10**6},
            "max_tokens",
            "limit of 4096",
        ),
        (image_request("data:image/png;base64,AAAA"), "messages[0].content[0].image_url.url", "not an image"),
        (image_request("ftp://example.com/x.png"), "messages[0].content[0].image_url.url", "scheme 'ftp'"),
        ({"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}, "model", "not served here"),
    ],
)
@pytest.mark.parametrize("stream", [False, True])
def test_bad_requests_get_a_precise_4xx(serve_url, body, param, fragment, stream):
    r = httpx.post(f"{serve_url}/v1/chat/completions", json={**body, "stream": stream}, timeout=30)
    assert 400 <= r.status_code < 500, r.text
    error = r.json()["error"]
    assert error["param"] == param
    assert fragment in error["message"]
    assert error["type"] == "invalid_request_error"


def test_malformed_json_is_400(serve_url):
    r = httpx.post(
        f"{serve_url}/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"}
    )
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"


def test_models_and_health(serve_url):
    models = httpx.get(f"{serve_url}/v1/models").json()
    assert [m["id"] for m in models["data"]] == ["llava-tiny"]
    health = httpx.get(f"{serve_url}/health")
    assert health.status_code == 200
    assert health.json()["status"] == "ok" and set(health.json()["model"]) == {"running", "waiting"}


def test_client_request_id_is_echoed(serve_url):
    r = httpx.get(f"{serve_url}/health", headers={"x-request-id": "abc-123"})
    assert r.headers["x-request-id"] == "abc-123"


@pytest.mark.parametrize(
    ("method", "path", "status", "fragment"),
    [
        ("POST", "/v1/embeddings", 404, "no route POST /v1/embeddings"),
        ("GET", "/v1/nothing/here", 404, "no route GET /v1/nothing/here"),
        ("GET", "/v1/chat/completions", 405, "Method Not Allowed"),
    ],
)
def test_unknown_paths_and_methods_answer_in_openai_s_error_shape(serve_url, method, path, status, fragment):
    r = httpx.request(method, f"{serve_url}{path}", json={}, timeout=30)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and fragment in error["message"]
    assert error["type"] == "invalid_request_error"


def test_tokenize_and_detokenize_in_vllm_s_shapes(serve_url, processor):
    image = random_image(12, (60, 40))
    body = image_request(data_uri(image), "What is it?")
    r = httpx.post(
        f"{serve_url}/tokenize", json={"model": "llava-tiny", "messages": body["messages"]}, timeout=60
    )
    assert r.status_code == 200, r.text
    out = r.json()
    expected = reference_inputs(processor, body["messages"], [image])["input_ids"][0].tolist()
    assert out == {
        "count": len(expected),
        "max_model_len": out["max_model_len"],
        "tokens": expected,
        "token_strs": None,
    }
    prompt = {"prompt": "Hello there", "return_token_strs": True}
    out = httpx.post(f"{serve_url}/tokenize", json=prompt, timeout=30).json()
    assert out["tokens"] == processor.tokenizer("Hello there")["input_ids"]
    assert out["token_strs"] == processor.tokenizer.convert_ids_to_tokens(out["tokens"])
    back = httpx.post(f"{serve_url}/detokenize", json={"tokens": out["tokens"]}, timeout=30)
    assert back.json() == {"prompt": processor.tokenizer.decode(out["tokens"])}
    bad = httpx.post(f"{serve_url}/detokenize", json={"tokens": [10**7]}, timeout=30)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "tokens"
