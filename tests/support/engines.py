"""The engine's test cases: requests with `transformers.generate`'s greedy answers, and engines
around fresh copies of the tiny model."""

import asyncio
import contextlib
import copy
import functools

import pytest

from llava_serve.api.messages import to_template_messages
from llava_serve.api.protocol import ChatMessage
from llava_serve.config import EngineConfig, ImageConfig
from llava_serve.engine import Engine
from llava_serve.engine.sampling import SamplingParams
from llava_serve.inputs import images
from llava_serve.inputs.prompts import PromptBuilder
from llava_serve.models import load_adapter
from tests.support.media import encode, random_image
from tests.support.oracle import greedy_ids, reference_inputs
from tests.support.probes import ProbedEngine, ProbedRunner

QUESTIONS = ["What is this?", "Describe the picture in detail, please.", "Hi", "Is there a cat?", "Why?"]


class Case:
    """One request: the engine's inputs and the HF reference output for greedy decoding."""

    def __init__(self, processor, hf_model, question: str, image_seeds: list[int], max_tokens: int):
        content = [{"type": "image_url", "image_url": {"url": "x"}} for _ in image_seeds]
        messages = [{"role": "user", "content": [*content, {"type": "text", "text": question}]}]
        msgs = to_template_messages([ChatMessage.model_validate(m) for m in messages])
        builder = PromptBuilder(processor, 2048)
        pics = [random_image(s, (40 + 13 * s, 64 - 3 * s)) for s in image_seeds]
        adapter = load_adapter(processor.tokenizer.name_or_path)
        self.images = [images.prepare(encode(p), adapter, ImageConfig()) for p in pics]
        self.input_ids = builder.build(msgs, max_tokens, [im.num_tokens for im in self.images]).input_ids
        self.max_tokens = max_tokens
        self.inputs = reference_inputs(processor, messages, pics)

    def reference(self, hf_model) -> list[int]:
        return greedy_ids(hf_model, self.inputs, self.max_tokens)


@pytest.fixture(scope="module")
def cases(processor, hf_model):
    specs = [(0, [1], 24), (1, [2], 9), (2, [], 30), (3, [3, 4], 17), (4, [1], 40), (0, [5], 3)]
    built = [Case(processor, hf_model, QUESTIONS[q], seeds, n) for q, seeds, n in specs]
    for c in built:
        c.expected = c.reference(hf_model)
    return built


@functools.cache
def _weights(tiny_dir: str):
    from transformers import LlavaForConditionalGeneration

    return LlavaForConditionalGeneration.from_pretrained(tiny_dir).eval()


def fresh_model(tiny_dir: str):
    """A copy of the tiny model, whose weights are loaded once per session: a runner wraps its
    model's modules, so each engine gets its own and nothing leaks between tests."""
    return copy.deepcopy(_weights(tiny_dir))


def build_engine(tiny_dir, processor, config: EngineConfig) -> Engine:
    """An engine around a fresh copy of the tiny model."""
    model = fresh_model(tiny_dir)
    return ProbedEngine(
        ProbedRunner(model, 1 << 24), processor.tokenizer, [model.config.text_config.eos_token_id], config
    )


@pytest.fixture
async def engine(tiny_dir, processor):
    eng = build_engine(tiny_dir, processor, EngineConfig(max_batch_size=8, max_queue=64))
    yield eng
    await eng.shutdown()


def idle(engine) -> bool:
    """No request in the engine, and every KV slot given back."""
    kv = engine.runner.kv
    return engine.num_running == 0 and kv.free_slots == kv.slots


async def settled(engine, timeout: float = 5.0) -> bool:
    """Whether the engine goes idle within `timeout` (a request's last output reaches its stream
    before the step that retires it has run)."""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(timeout):
            while not idle(engine):
                await asyncio.sleep(0.005)
    return idle(engine)


async def collect(engine, case, params=None, delay=0.0):
    await asyncio.sleep(delay)
    params = params or SamplingParams(max_tokens=case.max_tokens, temperature=0.0)
    return [t async for o in engine.generate(case.input_ids, case.images, params) for t in o.token_ids]
