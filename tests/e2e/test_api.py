"""The OpenAI contract as real clients see it: cancellation, logprobs, stop, seed, multi-turn, errors."""

from __future__ import annotations

import asyncio
import time

import httpx
import openai
import pytest
from ray import serve

from tests.support.client import image_request
from tests.support.media import data_uri, random_image
from tests.support.oracle import hf_greedy

LONG = 1500  # output tokens: far more than a test waits for (greedy "Talk." runs past it)


@pytest.fixture
def client(serve_url):
    return openai.OpenAI(base_url=f"{serve_url}/v1", api_key="unused", max_retries=0)


@pytest.fixture
def aclient(serve_url):
    return openai.AsyncOpenAI(base_url=f"{serve_url}/v1", api_key="unused", max_retries=0)


def model_stats() -> dict:
    return serve.get_deployment_handle("LlavaModel", "llava").stats.remote().result()


def wait_for(predicate, timeout_s: float) -> float:
    start = time.monotonic()
    while not predicate():
        assert time.monotonic() - start < timeout_s, "timed out"
        time.sleep(0.02)
    return time.monotonic() - start


def test_client_disconnect_cancels_generation_within_a_second(serve_url):
    body = {
        "messages": [{"role": "user", "content": "Talk."}],
        "max_tokens": LONG,
        "stream": True,
        "temperature": 0,
    }
    before = model_stats()["cancelled"]
    with httpx.stream("POST", f"{serve_url}/v1/chat/completions", json=body, timeout=30) as r:
        lines = r.iter_lines()
        got = [next(lines) for _ in range(8)]  # a few chunks (and the blank lines between them)
        assert model_stats()["running"] >= 1
    # Leaving the block closed the connection mid-stream.
    assert sum(line.startswith("data: {") for line in got) >= 3
    elapsed = wait_for(lambda: model_stats()["cancelled"] == before + 1, 1.0)
    wait_for(lambda: model_stats()["running"] == 0, 1.0 - elapsed)


async def test_cancelling_a_handle_stream_cancels_generation(serve_url):
    stream = (
        serve.get_app_handle("llava")
        .options(stream=True)
        .chat_stream.remote(
            {
                "messages": [{"role": "user", "content": "Talk."}],
                "max_tokens": LONG,
                "stream": True,
                "temperature": 0,
            }
        )
    )
    model = serve.get_deployment_handle("LlavaModel", "llava")
    before = (await model.stats.remote())["cancelled"]
    chunks = [await anext(stream) for _ in range(3)]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    stream.cancel()
    start = time.monotonic()
    while (await model.stats.remote())["cancelled"] != before + 1:
        assert time.monotonic() - start < 1.0
        await asyncio.sleep(0.02)


def test_multi_turn_conversation_about_an_image(client, processor, hf_model):
    image = random_image(40, (50, 70))
    messages = [
        *image_request(data_uri(image), "What is in this image?")["messages"],
        {"role": "assistant", "content": "A cat."},
        {"role": "user", "content": [{"type": "text", "text": "What colour is it?"}]},
    ]
    expected, prompt_tokens = hf_greedy(processor, hf_model, messages, [image], 12)
    out = client.chat.completions.create(model="llava-tiny", messages=messages, max_tokens=12, temperature=0)
    assert out.choices[0].message.content == expected
    assert out.usage.prompt_tokens == prompt_tokens  # image tokens included, as the processor counts
    assert out.usage.total_tokens == prompt_tokens + out.usage.completion_tokens


def test_stop_strings_end_the_answer_and_are_never_emitted(client):
    messages = [{"role": "user", "content": "Count."}]
    full = client.chat.completions.create(model="llava-tiny", messages=messages, max_tokens=40, temperature=0)
    text = full.choices[0].message.content
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    assert len(stop.strip()) > 0
    for stream in (False, True):
        out = client.chat.completions.create(
            model="llava-tiny", messages=messages, max_tokens=40, temperature=0, stop=[stop], stream=stream
        )
        if stream:
            chunks = list(out)
            got = "".join(c.choices[0].delta.content or "" for c in chunks)
            finish = chunks[-1].choices[0].finish_reason
        else:
            got, finish = out.choices[0].message.content, out.choices[0].finish_reason
        assert got == text[: text.index(stop)] and finish == "stop"


async def test_seeded_sampling_is_reproducible(aclient):
    async def sample(seed: int) -> str:
        out = await aclient.chat.completions.create(
            model="llava-tiny",
            messages=[{"role": "user", "content": "Say something."}],
            max_tokens=16,
            temperature=1.0,
            seed=seed,
        )
        return out.choices[0].message.content

    runs = await asyncio.gather(sample(7), sample(7), sample(7), sample(8))
    assert runs[0] == runs[1] == runs[2]
    assert runs[3] != runs[0]  # and the seed is what decides it


async def test_logprobs_shape_streamed_and_not(aclient):
    kw = {
        "model": "llava-tiny",
        "messages": image_request(data_uri(random_image(41)), max_tokens=8)["messages"],
        "max_tokens": 8,
        "temperature": 0,
        "logprobs": True,
        "top_logprobs": 2,
    }
    out = await aclient.chat.completions.create(**kw)
    content = out.choices[0].logprobs.content
    assert len(content) == out.usage.completion_tokens
    for entry in content:
        assert entry.logprob <= 0 and len(entry.top_logprobs) == 2
        assert entry.top_logprobs[0].logprob == pytest.approx(entry.logprob)  # greedy picks the top
    # The tokens spell the answer exactly; each carries its own bytes (a token that holds part of
    # a character has no text yet, but its bytes).
    assert "".join(e.token for e in content) == out.choices[0].message.content
    # (decoded leniently: the answer may stop inside a character when max_tokens runs out)
    answer = bytes(b for e in content for b in e.bytes).decode(errors="replace")
    assert answer == out.choices[0].message.content
    chunks = [c async for c in await aclient.chat.completions.create(**kw, stream=True)]
    with_logprobs = [c.choices[0].logprobs for c in chunks if c.choices and c.choices[0].logprobs]
    streamed = [e for logprobs in with_logprobs for e in logprobs.content]
    assert [e.token for e in streamed] == [e.token for e in content]


def test_penalties_are_accepted_and_change_the_answer(client):
    kw = {"model": "llava-tiny", "messages": [{"role": "user", "content": "Repeat."}], "max_tokens": 30}
    plain = client.chat.completions.create(**kw, temperature=0).choices[0].message.content
    extension = {"repetition_penalty": 1.3}
    penalized = client.chat.completions.create(
        **kw, temperature=0, frequency_penalty=2.0, presence_penalty=1.0, extra_body=extension
    )
    assert penalized.choices[0].message.content != plain


def test_client_errors_map_to_the_openai_exception_types(client):
    ok = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(model="gpt-4o", **ok)
    assert info.value.body["param"] == "model"
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="llava-tiny", top_logprobs=2, **ok)
    assert "top_logprobs requires logprobs" in info.value.message
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="llava-tiny", presence_penalty=3, **ok)
    assert info.value.body["param"] == "presence_penalty"
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="llava-tiny", n=0, **ok)
    assert info.value.body["param"] == "n"


def test_request_id_is_honoured_on_completions_and_errors(serve_url):
    url = f"{serve_url}/v1/chat/completions"
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    for payload in (body, {**body, "temperature": 9}):
        r = httpx.post(url, json=payload, headers={"x-request-id": "req-42"}, timeout=30)
        assert r.headers["x-request-id"] == "req-42"
    assert httpx.post(url, json=body, timeout=30).headers["x-request-id"]


def test_openapi_schema_describes_the_real_models(serve_url):
    schema = httpx.get(f"{serve_url}/openapi.json").json()
    request = schema["components"]["schemas"]["ChatCompletionRequest"]["properties"]
    assert {"messages", "logprobs", "top_logprobs", "presence_penalty", "repetition_penalty"} <= set(request)
    route = schema["paths"]["/v1/chat/completions"]["post"]
    ok = route["responses"]["200"]["content"]["application/json"]["schema"]
    assert ok["$ref"].endswith("/ChatCompletion")


def test_vllm_s_sampling_extensions_pass_through_the_openai_client(client, tiny_dir):
    """What vLLM's clients and `vllm bench serve` send, through `extra_body` as they send it."""
    from transformers import AutoTokenizer

    eos = AutoTokenizer.from_pretrained(tiny_dir).eos_token_id
    ask = {"model": "llava-tiny", "messages": [{"role": "user", "content": "Hi"}], "temperature": 0}
    forced = {"logit_bias": {str(eos): 100}}  # the answer would end at its first token
    short = client.chat.completions.create(**ask, max_tokens=6, **forced)
    assert (short.usage.completion_tokens, short.choices[0].finish_reason) == (1, "stop")
    extra = {
        "ignore_eos": True,
        "min_p": 0.1,
        "skip_special_tokens": True,
        "include_stop_str_in_output": False,
    }
    full = client.chat.completions.create(**ask, max_tokens=6, **forced, extra_body=extra)
    assert (full.usage.completion_tokens, full.choices[0].finish_reason) == (6, "length")
    held = client.chat.completions.create(**ask, max_tokens=6, **forced, extra_body={"min_tokens": 4})
    assert held.usage.completion_tokens == 5  # four tokens, then the end of sequence
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(**ask, max_tokens=2, extra_body={"min_tokens": 3})
    assert info.value.body["param"] == "min_tokens"
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(**ask, max_tokens=2, extra_body={"stop_token_ids": [-1]})
    assert info.value.body["param"] == "stop_token_ids"
