"""Engine v2's mechanisms against `transformers.generate`: prompts written in chunks while other
rows decode, and prefixes reused from finished requests (a follow-up turn, a shared image)."""

import asyncio
import time

import pytest
import torch
from transformers import AutoConfig

from llava_serve import images
from llava_serve.config import EngineConfig, ImageConfig, ModelConfig
from llava_serve.engine.core import Engine
from llava_serve.engine.kvcache import SlotKV
from llava_serve.engine.sampling import SamplingParams
from llava_serve.errors import EngineError, InvalidRequest
from llava_serve.models import load_adapter
from llava_serve.prompts import PromptBuilder, to_template_messages
from llava_serve.protocol import ChatMessage
from tests.conftest import encode, random_image
from tests.engine_cases import build_engine, collect
from tests.reference import greedy_ids, reference_inputs


class Conversation:
    """A chat (its messages as the API takes them), its engine inputs and `generate`'s greedy answer."""

    def __init__(self, processor, hf_model, messages: list[dict], pictures: list, max_tokens: int):
        adapter = load_adapter(processor.tokenizer.name_or_path)
        msgs = to_template_messages([ChatMessage(**m) for m in messages])
        builder = PromptBuilder(processor, 2048)
        self.images = [images.prepare(encode(p), adapter, ImageConfig()) for p in pictures]
        self.input_ids = builder.build(msgs, max_tokens, [im.num_tokens for im in self.images]).input_ids
        self.max_tokens = max_tokens
        self.expected = greedy_ids(hf_model, reference_inputs(processor, messages, pictures), max_tokens)
        self.text = processor.tokenizer.decode(self.expected, skip_special_tokens=True)


def ask(question: str, image: bool = True) -> dict:
    parts = [{"type": "image_url", "image_url": {"url": "x"}}] if image else []
    return {"role": "user", "content": [*parts, {"type": "text", "text": question}]}


@pytest.fixture(scope="module")
def turns(processor, hf_model):
    """A first turn about a picture, and the follow-up that carries its answer."""
    picture = random_image(7, (52, 44))
    first = Conversation(processor, hf_model, [ask("What is in this picture? Describe it.")], [picture], 12)
    history = [
        ask("What is in this picture? Describe it."),
        {"role": "assistant", "content": first.text},
        ask("And what colour is it, mostly?", image=False),
    ]
    follow = Conversation(processor, hf_model, history, [picture], 12)
    other = Conversation(
        processor, hf_model, [ask("What is in this picture? Describe it.")], [random_image(8, (52, 44))], 12
    )
    return first, follow, other


@pytest.fixture
async def chunky(tiny_dir, processor):
    """Steps of at most 40 tokens: with 8 rows decoding, a prompt joins 32 positions at a time."""
    eng = build_engine(tiny_dir, processor, EngineConfig(max_batch_size=8, max_step_tokens=40))
    yield eng
    await eng.shutdown()


async def test_prompts_written_in_chunks_while_others_decode_equal_generate(chunky, cases):
    longest = max(len(c.input_ids) for c in cases)
    assert longest > 40, "the cases must need several chunks"
    results = await asyncio.gather(*[collect(chunky, c, delay=0.004 * i) for i, c in enumerate(cases * 2)])
    for case, tokens in zip(cases * 2, results, strict=True):
        assert tokens == case.expected
    assert chunky.fused_steps > 0, "some steps decoded and prefilled in one pass"
    assert chunky.num_running == 0 and chunky.runner.num_rows == 0 and not chunky.runner.staged


async def test_running_streams_keep_decoding_while_a_long_prompt_joins(chunky, cases):
    """A step never computes more than max_step_tokens: a request that is decoding gets a token
    every step while a longer prompt is written in chunks around it."""
    long_case = max(cases, key=lambda c: len(c.input_ids))
    running = chunky.generate(cases[2].input_ids, [], SamplingParams(max_tokens=30, temperature=0.0))
    await anext(running)
    steps = chunky.steps
    joining = asyncio.ensure_future(collect(chunky, long_case))
    got = 0
    async for out in running:
        got += len(out.token_ids)
        if joining.done():
            break
    assert await joining == long_case.expected
    chunks = -(-len(long_case.input_ids) // (40 - 1))
    assert chunky.steps - steps >= chunks  # the prompt took several steps ...
    assert got >= chunks - 1  # ... and the running stream produced a token in each


async def test_a_follow_up_turn_reuses_the_first_turns_kv(engine, turns):
    first, follow, _ = turns
    assert await collect(engine, first) == first.expected
    before = engine.stats()
    assert await collect(engine, follow) == follow.expected
    after = engine.stats()
    assert after["prefix_cache_hits"] == before["prefix_cache_hits"] + 1
    reused = after["prefix_cache_hit_tokens"] - before["prefix_cache_hit_tokens"]
    assert reused >= len(first.input_ids)  # the whole first prompt, the image included


async def test_a_different_image_shares_nothing_past_the_first_image_position(engine, turns, processor):
    first, _, other = turns
    assert first.input_ids == other.input_ids  # same tokens: only the picture differs
    await collect(engine, first)
    before = engine.stats()["prefix_cache_hit_tokens"]
    assert await collect(engine, other) == other.expected
    reused = engine.stats()["prefix_cache_hit_tokens"] - before
    assert reused <= first.input_ids.index(engine.runner.image_token_id)


async def test_a_prefix_hit_in_a_busy_batch_with_chunks_equals_generate(chunky, turns, cases):
    first, follow, other = turns
    await collect(chunky, first)
    results = await asyncio.gather(
        collect(chunky, follow), collect(chunky, cases[3], delay=0.002), collect(chunky, other, delay=0.004)
    )
    assert results == [follow.expected, cases[3].expected, other.expected]
    assert chunky.stats()["prefix_cache_hits"] >= 1


async def test_without_a_prefix_cache_nothing_is_kept(tiny_dir, processor, turns):
    eng = build_engine(tiny_dir, processor, EngineConfig(max_batch_size=4, prefix_cache_bytes=0))
    first, follow, _ = turns
    await collect(eng, first)
    assert await collect(eng, follow) == follow.expected
    stats = eng.stats()
    assert stats["prefix_cache_hits"] == 0 and stats["prefix_cache_bytes"] == 0
    await eng.shutdown()


async def test_cancelling_a_joining_request_gives_its_slot_back(chunky, cases):
    long_case = max(cases, key=lambda c: len(c.input_ids))
    stream = chunky.generate(long_case.input_ids, long_case.images, SamplingParams(8, temperature=0.0))
    first = asyncio.ensure_future(anext(stream))
    for _ in range(200):
        if chunky.runner.staged:
            break
        await asyncio.sleep(0.001)
    first.cancel()
    await asyncio.gather(first, return_exceptions=True)
    await stream.aclose()
    for _ in range(200):
        if not chunky.runner.staged and chunky.num_running == 0:
            break
        await asyncio.sleep(0.01)
    assert not chunky.runner.staged and chunky.num_running == 0
    assert chunky.runner.free_slots == chunky.runner.kv.slots


async def test_the_vision_tower_gets_at_most_its_share_of_a_step(tiny_dir, processor, cases):
    """One tile per step: four requests with images arriving together start one per step (the
    tower never sees two at once), and each still equals generate."""
    eng = build_engine(tiny_dir, processor, EngineConfig(max_batch_size=8, max_step_vision_tiles=1))
    seen: list[int] = []
    encode = eng.runner.encode_images

    def counting(images):
        seen.append(sum(im.pixel_values.shape[0] for im in images))
        return encode(images)

    eng.runner.encode_images = counting
    with_images = [c for c in cases if c.images][:4]
    results = await asyncio.gather(*[collect(eng, c) for c in with_images])
    assert results == [c.expected for c in with_images]
    # Each pass through the tower holds one request's images, a request whose images alone
    # pass the share included (it starts alone: nothing waits for ever).
    tiles = [sum(im.pixel_values.shape[0] for im in c.images) for c in with_images]
    assert sorted(seen) == sorted(tiles) and max(tiles) > 1
    await eng.shutdown()


async def test_streams_share_a_message_budget_and_carry_several_tokens(tiny_dir, processor, cases):
    """With a shared budget of messages per second, concurrent streams send fewer, fuller
    messages, each answer unchanged; without one, they send more."""

    async def run(config: EngineConfig) -> tuple[list[list[int]], list[list[int]], float]:
        eng = build_engine(tiny_dir, processor, config)

        async def one(case):
            params = SamplingParams(max_tokens=case.max_tokens, temperature=0.0)
            sizes, ids = [], []
            async for out in eng.generate(case.input_ids, case.images, params):
                sizes.append(len(out.token_ids))
                ids += out.token_ids
            return sizes, ids

        t0 = time.monotonic()
        results = await asyncio.gather(*(one(c) for c in cases))
        took = time.monotonic() - t0
        await eng.shutdown()
        return [s for s, _ in results], [i for _, i in results], took

    budget = 20.0
    sizes, answers, took = await run(
        EngineConfig(max_batch_size=8, stream_interval_s=0.0, max_stream_messages_per_s=budget)
    )
    assert answers == [c.expected for c in cases]
    # First and last message of each stream aside, the streams together stay within the budget.
    assert sum(len(s) for s in sizes) <= budget * took + 2 * len(cases)
    assert max(n for s in sizes for n in s) > 1
    free, answers, _ = await run(
        EngineConfig(max_batch_size=8, stream_interval_s=0.0, max_stream_messages_per_s=0)
    )
    assert answers == [c.expected for c in cases]
    assert sum(len(s) for s in free) > sum(len(s) for s in sizes)


async def test_a_failed_single_pass_step_runs_again_as_decode_and_prefill_apart(chunky, cases):
    """The first step that decodes and prefills in one pass fails inside the model; the step runs
    again as the two passes apart, and every answer is still `generate`'s."""
    failed = []

    def fail_once(module, args, kwargs):
        if "step_layout" in kwargs and not failed:
            failed.append(True)
            raise RuntimeError("injected failure in the single-pass step")

    layer = chunky.runner.decoder.layers[0]
    handle = layer.register_forward_pre_hook(fail_once, with_kwargs=True)
    try:
        results = await asyncio.wait_for(
            asyncio.gather(*[collect(chunky, c, delay=0.004 * i) for i, c in enumerate(cases)]), timeout=60
        )
    finally:
        handle.remove()
    assert failed, "a single-pass step ran"
    assert results == [c.expected for c in cases]


async def test_if_the_decode_fails_too_the_joining_prompts_start_again(chunky, cases):
    """The single-pass step fails and so does the decode run apart: the decoding rows fail with a
    typed error, the prompts that were joining start again from nothing and still answer as
    `generate` does, and the engine serves the next request."""
    calls = []

    def fail_twice(module, args, kwargs):
        if "step_layout" in kwargs and not calls:
            calls.append("single pass")
            raise RuntimeError("injected failure in the single-pass step")
        if len(calls) == 1:
            calls.append("decode")
            raise RuntimeError("injected failure in the decode run apart")

    handle = chunky.runner.decoder.layers[0].register_forward_pre_hook(fail_twice, with_kwargs=True)
    try:
        # Bounded: a regression here would leave requests waiting for good, not fail them.
        results = await asyncio.wait_for(
            asyncio.gather(
                *[collect(chunky, c, delay=0.004 * i) for i, c in enumerate(cases)], return_exceptions=True
            ),
            timeout=60,
        )
    finally:
        handle.remove()
    assert calls == ["single pass", "decode"]
    failed = [r for r in results if isinstance(r, Exception)]
    assert failed and all(isinstance(r, EngineError) for r in failed)
    answered = [(c, r) for c, r in zip(cases, results, strict=True) if not isinstance(r, Exception)]
    assert answered and all(r == c.expected for c, r in answered)
    assert await collect(chunky, cases[0]) == cases[0].expected


async def test_kv_cache_bytes_sizes_the_slots_and_a_request_must_fit_one(tiny_dir, turns):
    """The budget is allocated once, shared by max_batch_size slots; a request whose prompt plus
    max_tokens would outgrow a slot is refused up front, naming the knob."""
    first = turns[0]
    per_token = SlotKV.bytes_per_token(AutoConfig.from_pretrained(tiny_dir), torch.float32)
    length = len(first.input_ids) + first.max_tokens
    config = EngineConfig(max_batch_size=4, kv_cache_bytes=4 * per_token * length + per_token - 1)
    engine = Engine.load(ModelConfig(name=tiny_dir), config)
    try:
        assert engine.runner.kv.max_len == length
        assert engine.stats()["kv_cache_bytes"] == 4 * per_token * length
        greedy = SamplingParams(max_tokens=first.max_tokens, temperature=0.0)
        outputs = engine.generate(first.input_ids, first.images, greedy)
        answer = [t async for o in outputs for t in o.token_ids]
        assert answer == first.expected  # a request that fills its slot exactly
        longer = SamplingParams(max_tokens=first.max_tokens + 1, temperature=0.0)
        with pytest.raises(InvalidRequest, match="kv_cache_bytes"):
            engine.submit(first.input_ids, first.images, longer)
    finally:
        await engine.shutdown()


@pytest.mark.parametrize("cap", [None, "one request"])
async def test_admission_is_by_free_slots_with_an_optional_token_cap(tiny_dir, processor, cases, cap):
    """Unset, `max_batch_tokens` reserves nothing: every free slot takes a waiting request. Set,
    a newcomer whose prompt + max_tokens would pass it waits for the running ones to finish."""
    longest = max(cases, key=lambda c: len(c.input_ids) + c.max_tokens)
    budget = None if cap is None else len(longest.input_ids) + longest.max_tokens
    eng = build_engine(tiny_dir, processor, EngineConfig(max_batch_size=3, max_batch_tokens=budget))
    try:
        tasks = [asyncio.ensure_future(collect(eng, c)) for c in cases[:3]]
        running = held = 0
        async with asyncio.timeout(60):
            while not all(t.done() for t in tasks):
                running = max(running, eng.num_running)
                held = max(held, eng.stats()["kv_tokens_used"])
                await asyncio.sleep(0.001)
        assert running == (3 if cap is None else 1)
        for task, case in zip(tasks, cases[:3], strict=True):
            assert task.result() == case.expected
        assert 0 < held <= sum(len(c.input_ids) + c.max_tokens for c in cases[:3])
        stats = eng.stats()
        assert stats["kv_tokens_used"] == 0
        assert stats["kv_tokens_capacity"] == eng.runner.kv.slots * eng.runner.kv.max_len
    finally:
        await eng.shutdown()
