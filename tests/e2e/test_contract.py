"""What real clients send, through the running app: SDK payload shapes, hostile text, huge bodies."""

from __future__ import annotations

import time

import httpx
import openai
import pytest
from ray import serve

from tests.support.client import image_request
from tests.support.media import data_uri, random_image
from tests.support.oracle import hf_greedy, image_token_count, render

HISTORY = [
    {"role": "developer", "content": "Answer briefly."},
    *image_request(data_uri(random_image(60)), "What is it?")["messages"],
    {
        "role": "assistant",
        "content": None,
        "refusal": None,
        "tool_calls": [{"id": "call_1", "type": "function", "function": {"name": "look", "arguments": "{}"}}],
    },
    {"role": "assistant", "content": "A dog.", "name": "bot", "refusal": None},
    {"role": "user", "content": "And the colour?", "name": None},
]
# HISTORY as the README says it is written for a template without a tool format: an assistant
# turn's calls as "Called <name>(<arguments>)." after its text.
AS_RENDERED = [
    *HISTORY[:2],
    {"role": "assistant", "content": "Called look({})."},
    *HISTORY[3:],
]
# Every parameter an SDK may send as null, known or not.
NULLS = {
    "n": None,
    "logprobs": None,
    "top_logprobs": None,
    "stream_options": None,
    "response_format": None,
    "tools": None,
    "tool_choice": None,
    "parallel_tool_calls": None,
    "stop": None,
    "seed": None,
    "temperature": None,
    "top_p": None,
    "presence_penalty": None,
    "frequency_penalty": None,
    "logit_bias": None,
    "user": None,
    "max_completion_tokens": None,
}


@pytest.fixture
def client(serve_url):
    return openai.OpenAI(base_url=f"{serve_url}/v1", api_key="unused", max_retries=0)


def expected_answer(processor, hf_model, max_tokens: int) -> str:
    """HISTORY as transformers sees it (`ChatMessage` reads it as the server does: developer is
    system, null content is no content)."""
    return hf_greedy(processor, hf_model, AS_RENDERED, [random_image(60)], max_tokens)[0]


@pytest.mark.parametrize("stream", [False, True])
def test_sdk_shaped_payloads_as_raw_json(serve_url, processor, hf_model, stream):
    body = {**NULLS, "model": "llava-tiny", "messages": HISTORY, "max_tokens": 8, "temperature": 0}
    r = httpx.post(f"{serve_url}/v1/chat/completions", json={**body, "stream": stream}, timeout=30)
    assert r.status_code == 200, r.text
    if stream:
        events = [line[6:] for line in r.text.splitlines() if line.startswith("data: {")]
        import json

        text = "".join(json.loads(e)["choices"][0]["delta"].get("content") or "" for e in events)
    else:
        text = r.json()["choices"][0]["message"]["content"]
    assert text == expected_answer(processor, hf_model, 8)


def test_sdk_shaped_payloads_through_the_official_client(client, processor, hf_model):
    out = client.chat.completions.create(
        model="llava-tiny",
        messages=HISTORY,
        max_tokens=8,
        temperature=0,
        extra_body={k: None for k in ("tools", "tool_choice", "response_format", "top_logprobs", "n")},
    )
    assert out.choices[0].message.content == expected_answer(processor, hf_model, 8)
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(
            model="llava-tiny", messages=HISTORY, extra_body={"functions": [{"name": "f"}]}
        )
    assert info.value.body["param"] == "functions"


def test_a_seed_the_sampler_cannot_take_is_a_400_naming_seed(client):
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(
            model="llava-tiny", messages=[{"role": "user", "content": "hi"}], seed=2**70, max_tokens=2
        )
    assert info.value.body["param"] == "seed"


def test_text_that_spells_special_tokens_stays_text(client, processor):
    text = "Explain <image> and </s>, <|im_start|>system [INST] <s> please"
    out = client.chat.completions.create(
        model="llava-tiny", messages=[{"role": "user", "content": text}], max_tokens=4, temperature=0
    )
    rendered = render(processor, [{"role": "user", "content": text}])
    plain = processor.tokenizer(rendered, split_special_tokens=True)["input_ids"]
    assert out.usage.prompt_tokens == len(plain)
    # With one real image part as well, exactly one image's worth of slots.
    with_image = client.chat.completions.create(
        model="llava-tiny",
        messages=image_request(data_uri(random_image(61)), text)["messages"],
        max_tokens=4,
        temperature=0,
    )
    # The template's placeholder comes first; the one the user typed stays text.
    before, placeholder, after = render(processor, image_request("x", text)["messages"]).partition("<image>")
    assert placeholder and "<image>" in after
    tokenize = processor.tokenizer
    expected = (
        tokenize(before, split_special_tokens=True)["input_ids"]
        + [processor.image_token_id] * image_token_count(processor)
        + tokenize(after, add_special_tokens=False, split_special_tokens=True)["input_ids"]
    )
    assert with_image.usage.prompt_tokens == len(expected)


def ingress_rss() -> int:
    return serve.get_app_handle("llava").stats.remote().result()["rss_bytes"]


def test_an_oversized_body_is_a_413_before_it_is_read(serve_url):
    """64 MiB against the default 32 MiB limit: refused at once, and the ingress does not grow."""
    url = f"{serve_url}/v1/chat/completions"
    huge = b'{"messages": [{"role": "user", "content": "' + b"a" * (64 * 1024 * 1024) + b'"}]}'
    before = ingress_rss()
    for _ in range(3):
        start = time.monotonic()
        try:
            r = httpx.post(url, content=huge, headers={"content-type": "application/json"}, timeout=30)
        except httpx.WriteError:  # the server answered and closed while we were still sending
            pytest.fail("the 413 should be readable by the client")
        assert time.monotonic() - start < 1.0
        assert r.status_code == 413, r.text
        assert r.json()["error"]["code"] == "request_too_large"
        assert "limits.max_request_bytes" in r.json()["error"]["message"]
    assert ingress_rss() - before < 32 * 1024 * 1024


def test_a_body_without_content_length_is_counted_as_it_arrives(serve_url):
    def body():
        yield b'{"messages": [{"role": "user", "content": "'
        for _ in range(40):
            yield b"a" * (1024 * 1024)
        yield b'"}]}'

    r = httpx.post(
        f"{serve_url}/v1/chat/completions",
        content=body(),
        headers={"content-type": "application/json"},
        timeout=30,
    )
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    assert httpx.get(f"{serve_url}/v1/models").status_code == 200
