"""The official `openai` client against the running server."""

import openai
import pytest

from tests.support.client import image_request
from tests.support.media import data_uri, random_image
from tests.support.oracle import hf_greedy


@pytest.fixture
def client(serve_url):
    return openai.OpenAI(base_url=f"{serve_url}/v1", api_key="unused", max_retries=0)


def test_openai_client_streams_a_chat_completion_with_an_image(client, processor, hf_model):
    image = random_image(20, (70, 50))
    body = image_request(data_uri(image), max_tokens=16)
    expected, prompt_tokens = hf_greedy(processor, hf_model, body["messages"], [image], 16)
    stream = client.chat.completions.create(
        model="llava-tiny",
        messages=body["messages"],
        max_tokens=16,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == expected
    assert chunks[-1].usage.prompt_tokens == prompt_tokens


async def test_async_openai_client_non_streamed(serve_url, processor, hf_model):
    client = openai.AsyncOpenAI(base_url=f"{serve_url}/v1", api_key="unused", max_retries=0)
    image = random_image(21)
    body = image_request(data_uri(image), "Caption?", max_tokens=10)
    expected, _ = hf_greedy(processor, hf_model, body["messages"], [image], 10)
    out = await client.chat.completions.create(
        model="llava-tiny", messages=body["messages"], max_tokens=10, temperature=0
    )
    assert out.choices[0].message.content == expected
    assert out.choices[0].finish_reason in ("stop", "length")


def test_openai_client_raises_bad_request_for_a_bad_image(client):
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(
            model="llava-tiny", messages=image_request("data:image/png;base64,bm90IGFuIGltYWdl")["messages"]
        )
    assert "not an image" in info.value.message
