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


def test_n_greedy_choices_are_all_generates_answer_and_the_prompt_counts_once(client, processor, hf_model):
    image = random_image(22, (60, 44))
    body = image_request(data_uri(image), "What is it?", max_tokens=12)
    expected, prompt_tokens = hf_greedy(processor, hf_model, body["messages"], [image], 12)
    out = client.chat.completions.create(
        model="llava-tiny", messages=body["messages"], max_tokens=12, temperature=0, n=3
    )
    assert [c.index for c in out.choices] == [0, 1, 2]
    assert [c.message.content for c in out.choices] == [expected] * 3
    each = out.usage.completion_tokens // 3
    assert out.usage.prompt_tokens == prompt_tokens
    assert out.usage.completion_tokens == 3 * each and out.usage.total_tokens == prompt_tokens + 3 * each


def test_n_seeded_choices_stream_with_their_index_and_repeat(client):
    def run() -> dict[int, str]:
        stream = client.chat.completions.create(
            model="llava-tiny",
            messages=[{"role": "user", "content": "Tell me a story."}],
            max_tokens=16,
            temperature=1.0,
            seed=11,
            n=3,
            stream=True,
            stream_options={"include_usage": True},
        )
        texts: dict[int, str] = {}
        finished = set()
        for chunk in stream:
            for choice in chunk.choices:
                texts[choice.index] = texts.get(choice.index, "") + (choice.delta.content or "")
                if choice.finish_reason is not None:
                    finished.add(choice.index)
            if chunk.usage is not None:
                usage = chunk.usage
        assert finished == {0, 1, 2}
        assert usage.completion_tokens >= 3
        return texts

    first = run()
    assert sorted(first) == [0, 1, 2] and len(set(first.values())) == 3
    assert run() == first


def test_n_over_the_servers_limit_is_a_bad_request(client):
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(
            model="llava-tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=2, n=9
        )
    assert info.value.body["param"] == "n" and "generation.max_n" in info.value.message
