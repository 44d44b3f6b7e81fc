"""ChatService without Ray: admission, retry before the first token, and what reaches the tokenizer.

The backend here runs the real library pieces in-process (fetcher, image preprocessing, prompt
builder, engine), in the roles the Serve deployments play in production.
"""

import asyncio

import pytest
import ray

from llava_serve import images
from llava_serve.admission import Admission
from llava_serve.chat import ChatService
from llava_serve.config import AdmissionConfig, AppConfig, EngineConfig
from llava_serve.engine import Engine
from llava_serve.engine.runner import ModelRunner
from llava_serve.engine.sequence import ACCEPTED
from llava_serve.errors import Overloaded, Unavailable
from llava_serve.fetch import ImageFetcher
from llava_serve.health import HealthProbe
from llava_serve.models import load_adapter
from llava_serve.prompts import PromptBuilder
from tests.conftest import data_uri, random_image
from tests.reference import hf_greedy, image_request


class LocalBackend:
    """The deployments' jobs, in this process. `deaths` makes the next calls fail as a dead
    replica does, at the stage named: "tokenize" (before the engine) or "stream" (after it
    accepted the request)."""

    def __init__(self, config: AppConfig, processor, engine: Engine):
        self.fetcher = ImageFetcher(config.images)
        self.adapter = load_adapter(processor.tokenizer.name_or_path)
        self.builder = PromptBuilder(self.adapter, 2048)
        self.engine = engine
        self.tokenized: list = []
        self.deaths: dict[str, int] = {}

    def _die(self, stage: str) -> None:
        if self.deaths.get(stage):
            self.deaths[stage] -= 1
            raise Unavailable(f"replica died during {stage}")

    # Started at once and awaited later, as Serve's DeploymentResponses are.
    def prepare_image(self, source, num_images):
        return asyncio.ensure_future(self._prepare_image(source.url, source.param, source.detail, num_images))

    def tokenize(self, messages, max_tokens, image_tokens):
        self.tokenized.append(messages)
        return asyncio.ensure_future(self._tokenize(messages, max_tokens, image_tokens))

    async def _prepare_image(self, source, param, detail, num_images):
        data = await self.fetcher.fetch(source, param)
        base_only = self.adapter.base_only(detail, num_images)
        return images.prepare(data, self.adapter, images.ImageConfig(), param, base_only)

    async def _tokenize(self, messages, max_tokens, image_tokens):
        self._die("tokenize")
        return self.builder.build(messages, max_tokens, image_tokens)

    async def generate(self, prompt, params, images_):
        prompt = await prompt
        seq = self.engine.submit(prompt.input_ids, images_, params)
        try:
            yield ACCEPTED
            self._die("stream")
            async for out in self.engine.stream(seq):
                yield out
        finally:
            self.engine.cancel(seq)


@pytest.fixture
async def service(tiny_dir, processor, hf_model):
    config = AppConfig.model_validate({"model": tiny_dir})
    engine = Engine(
        ModelRunner(hf_model, 1 << 20),
        processor.tokenizer,
        [hf_model.config.text_config.eos_token_id],
        EngineConfig(),
    )
    yield ChatService(config, LocalBackend(config, processor, engine), takes_video=False)
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


def test_admission_refuses_past_the_limit_and_frees_slots():
    admission = Admission(AdmissionConfig(max_inflight_requests=2, retry_after_s=3))
    with admission.slot(), admission.slot():
        with pytest.raises(Overloaded) as info, admission.slot():
            pass
        assert info.value.retry_after_s == 3 and "2 requests in flight" in info.value.message
    assert admission.inflight == 0
    with admission.slot():  # free again
        assert admission.inflight == 1
    unlimited = Admission(AdmissionConfig(max_inflight_requests=0))
    with unlimited.slot(), unlimited.slot(), unlimited.slot():
        assert unlimited.inflight == 3


async def test_health_probe_caches_answers_and_reports_silence():
    calls = []

    async def answer():
        calls.append(1)
        return {"running": 0}

    probe = HealthProbe(answer, cache_s=60, timeout_s=1)
    assert await asyncio.gather(probe.check(), probe.check(), probe.check()) == [{"running": 0}] * 3
    assert len(calls) == 1

    async def silent():
        await asyncio.sleep(10)

    probe = HealthProbe(silent, cache_s=0, timeout_s=0.05)
    with pytest.raises(Unavailable, match=r"did not answer within 0\.05s"):
        await probe.check()


def test_ray_failures_that_lose_a_request_read_as_unavailable():
    """Ray's errors are recognised by name (the library imports no Ray); these are the real ones."""
    from ray.exceptions import ActorDiedError, OwnerDiedError, RayTaskError

    from llava_serve.errors import unwrap

    lost = OwnerDiedError(ray.ObjectRef.from_random().hex(), "owner", "call site")
    wrapped = RayTaskError("generate", "traceback", lost)
    assert isinstance(unwrap(wrapped), Unavailable)
    assert isinstance(unwrap(ActorDiedError()), Unavailable)


def test_a_full_object_store_reads_as_overloaded_not_as_a_server_error():
    from ray.exceptions import ObjectStoreFullError, OutOfDiskError, RayTaskError

    from llava_serve.errors import Overloaded, unwrap

    for full in (ObjectStoreFullError("no room for 8 MiB"), OutOfDiskError("spill failed")):
        error = unwrap(RayTaskError("__call__", "traceback", full))
        assert isinstance(error, Overloaded) and not isinstance(error, Unavailable)
        assert error.status_code == 503 and "object store is full" in error.message
