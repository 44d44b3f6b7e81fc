"""The same request surface through DeploymentHandles, from a second app in the same cluster."""

import pytest
from ray import serve

from deployments.captioner import Captioner, caption_request
from llava_serve.errors import ImageError
from tests.conftest import data_uri, random_image
from tests.reference import hf_greedy, image_request


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
    imgs = [random_image(31 + i) for i in range(3)]
    got = await captioner.caption_many.remote([data_uri(i) for i in imgs])
    assert len(got) == 3 and len(set(got)) >= 2  # different images, different captions


async def test_handle_errors_are_typed(serve_url):
    handle = serve.get_app_handle("llava")
    with pytest.raises(ImageError) as info:
        await handle.chat.remote(image_request("data:image/png;base64,AAAA"))
    assert info.value.param == "messages[0].content[0].image_url.url"
