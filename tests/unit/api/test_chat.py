"""ChatService without Ray: admission, retry before the first token, and what reaches the tokenizer.

The backend here runs the real library pieces in-process (fetcher, image preprocessing, prompt
builder, engine), in the roles the Serve deployments play in production.
"""

import asyncio
import copy
import json

import pytest

from llava_serve.api.chat import ChatService
from llava_serve.config import AppConfig, EngineConfig
from llava_serve.engine import Engine
from llava_serve.engine.runner import ModelRunner
from llava_serve.errors import LlavaServeError, Unavailable
from llava_serve.inputs.media import MediaPreparer
from llava_serve.inputs.prompts import PromptBuilder
from tests.support.client import image_request
from tests.support.media import data_uri, random_image
from tests.support.oracle import hf_greedy, reference_inputs


class LocalBackend:
    """`ChatService`'s backend in this process: each call goes to the library class the deployment
    behind it serves (MediaPreparer, PromptBuilder, Engine.serve), unawaited as Serve's responses
    are. `deaths` makes the next calls fail as a dead replica does, at the stage named:
    "tokenize" (before the engine) or "stream" (after it accepted the request)."""

    def __init__(self, media: MediaPreparer, builder: PromptBuilder, engine: Engine):
        self.media, self.builder, self.engine = media, builder, engine
        self.tokenized: list = []
        self.deaths: dict[str, int] = {}

    def _die(self, stage: str) -> None:
        if self.deaths.get(stage):
            self.deaths[stage] -= 1
            raise Unavailable(f"replica died during {stage}")

    def prepare_image(self, source, num_images):
        args = (source.url, source.param, source.detail, num_images, source.kind)
        return asyncio.ensure_future(self.media.prepare(*args))

    def tokenize(self, messages, max_tokens, media_tokens, add_generation_prompt=True, media_hashes=None):
        self.tokenized.append(messages)
        return asyncio.ensure_future(
            self._tokenize(messages, max_tokens, media_tokens, add_generation_prompt, media_hashes)
        )

    async def _tokenize(self, *args):
        self._die("tokenize")
        return await asyncio.to_thread(self.builder.build, *args)

    def encode(self, text, add_special_tokens):
        return asyncio.to_thread(self.builder.encode, text, add_special_tokens)

    def decode(self, ids):
        return asyncio.to_thread(self.builder.decode, ids)

    def pieces(self, ids):
        return asyncio.to_thread(self.builder.pieces, ids)

    async def context_length(self):
        return self.builder.context_length

    async def generate(self, prompt, params, images):
        outputs = self.engine.serve(await prompt, params, list(images))
        try:
            async for out in outputs:
                yield out
                if out.accepted:
                    self._die("stream")
        finally:
            await outputs.aclose()


@pytest.fixture(scope="module")
def media(tiny_dir):
    config = AppConfig.model_validate({"model": tiny_dir})
    preparer = MediaPreparer(config.model, config.images, workers=1)
    yield preparer
    preparer.close()


@pytest.fixture
async def service(tiny_dir, processor, hf_model, media):
    config = AppConfig.model_validate({"model": tiny_dir})
    engine = Engine(
        ModelRunner(copy.deepcopy(hf_model), 1 << 20),
        processor.tokenizer,
        [hf_model.config.text_config.eos_token_id],
        EngineConfig(),
    )
    builder = PromptBuilder(media.adapter, 2048)
    yield ChatService(config, LocalBackend(media, builder, engine), takes_video=False)
    await engine.shutdown()


def request(processor, hf_model, seed: int = 3):
    image = random_image(seed)
    body = image_request(data_uri(image), "What is it?", max_tokens=8, temperature=0)
    expected, _ = hf_greedy(processor, hf_model, body["messages"], [image], 8)
    return body, expected


async def test_a_replica_death_before_the_engine_accepts_is_retried(service, processor, hf_model):
    body, expected = request(processor, hf_model)
    service.backend.deaths = {"tokenize": 2}
    out = await service.complete(body)
    assert out.choices[0].message.content == expected
    assert len(service.backend.tokenized) == 3  # two deaths, then the answer


async def test_retries_give_up_after_three(service, processor, hf_model):
    body, _ = request(processor, hf_model)
    service.backend.deaths = {"tokenize": 4}
    with pytest.raises(Unavailable):
        await service.complete(body)
    assert len(service.backend.tokenized) == 4


async def test_a_death_after_the_engine_accepted_is_not_retried(service, processor, hf_model):
    body, _ = request(processor, hf_model)
    service.backend.deaths = {"stream": 1}
    stream = service.stream({**body, "stream": True})
    first = await anext(stream)  # the response has begun: the role chunk
    assert first.choices[0].delta.role == "assistant"
    with pytest.raises(Unavailable):
        async for _ in stream:
            pass
    assert len(service.backend.tokenized) == 1


async def test_the_tokenizer_gets_text_and_image_slots_never_image_data(service, processor, hf_model):
    body, expected = request(processor, hf_model)
    out = await service.complete(body)
    assert out.choices[0].message.content == expected
    [messages] = service.backend.tokenized
    assert messages == [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]}
    ]


async def test_tokenize_counts_a_chat_s_images_as_the_processor_does(service, processor):
    image = random_image(5, (70, 50))
    body = image_request(data_uri(image), "What is it?")
    expected = reference_inputs(processor, body["messages"], [image])["input_ids"][0].tolist()
    out = await service.tokenize(
        json.dumps({"messages": body["messages"], "return_token_strs": True}).encode()
    )
    assert (out.tokens, out.count) == (expected, len(expected))
    assert out.token_strs == processor.tokenizer.convert_ids_to_tokens(expected)
    assert out.max_model_len == 2048
    assert processor.image_token_id in out.tokens


async def test_tokenize_a_prompt_and_detokenize_as_the_tokenizer_does(service, processor):
    tok = processor.tokenizer
    text = "Hello </s> wörld"  # a special token's string matches here, as the tokenizer's own encode
    for add in (True, False):
        out = await service.tokenize({"prompt": text, "add_special_tokens": add})
        assert out.tokens == tok(text, add_special_tokens=add)["input_ids"] and out.token_strs is None
    back = await service.detokenize({"tokens": out.tokens})
    assert back.prompt == tok.decode(out.tokens)


@pytest.mark.parametrize(
    ("call", "body", "param"),
    [
        ("tokenize", {"prompt": "a", "messages": [{"role": "user", "content": "a"}]}, None),
        ("tokenize", {}, None),
        ("detokenize", {"tokens": [10**7]}, "tokens"),
        ("detokenize", {"tokens": [-1]}, "tokens"),
        ("tokenize", {"prompt": "a", "model": "gpt-4o"}, "model"),
    ],
)
async def test_tokenize_and_detokenize_refuse_what_they_cannot_do_naming_it(service, call, body, param):
    with pytest.raises(LlavaServeError) as info:
        await getattr(service, call)(body)
    assert 400 <= info.value.status_code < 500 and info.value.param == param, info.value.message
