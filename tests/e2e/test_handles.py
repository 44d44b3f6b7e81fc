"""The same request surface through DeploymentHandles, from a second app in the same cluster."""

import asyncio

import pytest
from ray import serve

from deployments.captioner import Captioner, caption_request
from llava_serve.errors import ImageError
from tests.support.client import image_request
from tests.support.media import data_uri, random_image
from tests.support.oracle import hf_greedy


@pytest.fixture(scope="module")
def captioner(serve_url):
    serve.run(Captioner.bind("llava", 12), name="captioner", route_prefix=None)
    yield serve.get_app_handle("captioner")
    serve.delete("captioner")


async def test_second_app_streams_through_a_handle(captioner, processor, hf_model):
    image = random_image(30, (90, 40))
    body = caption_request(data_uri(image), 12)
    expected, _ = hf_greedy(processor, hf_model, body["messages"], [image], 12)
    assert await captioner.caption.remote(data_uri(image)) == expected


async def test_second_app_batches_non_streamed_calls(captioner, processor, hf_model):
    """Three calls issued together are decoded together: fewer engine steps than their tokens."""
    imgs = [random_image(31 + i) for i in range(3)]
    model = serve.get_deployment_handle("LlavaModel", "llava")
    steps = (await model.stats.remote())["steps"]
    got = await captioner.caption_many.remote([data_uri(i) for i in imgs])
    steps = (await model.stats.remote())["steps"] - steps
    expected = [hf_greedy(processor, hf_model, caption_request("x", 12)["messages"], [i], 12) for i in imgs]
    assert got == [text for text, _ in expected]
    tokens = sum(len(processor.tokenizer(text, add_special_tokens=False)["input_ids"]) for text in got)
    assert steps < tokens, (steps, tokens)


async def test_handle_errors_are_typed(serve_url):
    handle = serve.get_app_handle("llava")
    with pytest.raises(ImageError) as info:
        await handle.chat.remote(image_request("data:image/png;base64,AAAA"))
    assert info.value.param == "messages[0].content[0].image_url.url"


@serve.deployment(ray_actor_options={"num_cpus": 0.05})
class Relay:
    """A second app that sends whatever request it is given to llava-serve through a handle."""

    def __init__(self):
        self.llava = serve.get_app_handle("llava")

    async def chat(self, request: dict) -> dict:
        return await self.llava.chat.remote(request)

    async def chat_stream(self, request: dict) -> list[dict]:
        return [c async for c in self.llava.options(stream=True).chat_stream.remote(request)]

    async def chat_many(self, requests: list[dict]) -> list[dict]:
        """All at once from this one request: the calls share its internal request id."""
        return await asyncio.gather(*[self.llava.chat.remote(r) for r in requests])


@pytest.fixture(scope="module")
def relay(serve_url):
    serve.run(Relay.bind(), name="relay", route_prefix=None)
    yield serve.get_app_handle("relay")
    serve.delete("relay")


SCENARIOS = {
    "multi-turn": {
        "messages": [
            *image_request(data_uri(random_image(50)), "What is it?")["messages"],
            {"role": "assistant", "content": "A dog."},
            {"role": "user", "content": "And the colour?"},
        ],
        "max_tokens": 10,
        "temperature": 0,
    },
    "stop": {
        "messages": [{"role": "user", "content": "Count."}],
        "max_tokens": 30,
        "temperature": 0,
        "stop": "e",
    },
    "seed": {
        "messages": [{"role": "user", "content": "Hi"}],
        "max_tokens": 12,
        "temperature": 1.0,
        "seed": 3,
    },
    "logprobs": {
        "messages": [{"role": "user", "content": "Hi"}],
        "max_tokens": 6,
        "temperature": 0,
        "logprobs": True,
        "top_logprobs": 2,
    },
}


@pytest.mark.parametrize("name", list(SCENARIOS))
async def test_handle_results_equal_http_results(relay, serve_url, name):
    import httpx

    request = SCENARIOS[name]
    async with httpx.AsyncClient(timeout=30) as client:
        over_http = (await client.post(f"{serve_url}/v1/chat/completions", json=request)).json()
    whole = await relay.chat.remote(request)
    chunks = await relay.chat_stream.remote({**request, "stream": True})
    for got in (whole, over_http):
        assert got["choices"][0]["message"] == over_http["choices"][0]["message"]
        assert got["choices"][0]["logprobs"] == over_http["choices"][0]["logprobs"]
        counts = {k: v for k, v in got["usage"].items() if k != "prompt_tokens_details"}
        assert counts == {k: v for k, v in over_http["usage"].items() if k != "prompt_tokens_details"}
    # The same prompt again reuses the first one's KV, all but the last position (whose logits
    # come from computing it).
    assert whole["usage"]["prompt_tokens_details"]["cached_tokens"] == whole["usage"]["prompt_tokens"] - 1
    streamed = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert streamed == whole["choices"][0]["message"]["content"]


async def test_handle_errors_carry_the_same_types_as_http(relay):
    from llava_serve.errors import InvalidRequest, ModelNotFound

    with pytest.raises(ModelNotFound):
        await relay.chat.remote({"model": "other", "messages": [{"role": "user", "content": "hi"}]})
    with pytest.raises(InvalidRequest) as info:
        await relay.chat.remote({"messages": [{"role": "user", "content": "hi"}], "top_p": 0})
    assert info.value.param == "top_p"


async def test_calls_issued_together_from_one_request_all_complete(relay):
    """Serve gives the handle calls made inside one request their caller's internal id, so the
    model router sees several pending requests with one id; each must still be sent (with id-only
    matching, all but one waited forever)."""
    requests = [
        {"messages": [{"role": "user", "content": f"Say {i}."}], "max_tokens": 3, "temperature": 0}
        for i in range(12)
    ]
    answers = await asyncio.wait_for(relay.chat_many.remote(requests), timeout=120)
    assert len(answers) == len(requests)
    assert all(a["choices"][0]["finish_reason"] in ("stop", "length") for a in answers)
