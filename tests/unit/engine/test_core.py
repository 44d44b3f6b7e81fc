"""The engine against `transformers.generate` on the same checkpoint, inputs and images: mixed
batches, cancellation, failures; prompts written in chunks while other rows decode, and prefixes
reused from finished requests (a follow-up turn, a shared image)."""

import asyncio
import contextlib
import itertools
import json
import threading
import time
from dataclasses import replace

import jsonschema
import pytest
import torch
from transformers import AutoConfig

from llava_serve.api.messages import to_template_messages
from llava_serve.api.protocol import ChatMessage
from llava_serve.config import EngineConfig, ImageConfig, ModelConfig
from llava_serve.engine import Engine
from llava_serve.engine.kv import KVManager
from llava_serve.engine.runner import ModelRunner
from llava_serve.engine.sampling import SamplingParams
from llava_serve.errors import EngineError, InvalidRequest, Overloaded, Unavailable
from llava_serve.inputs import images
from llava_serve.inputs.prompts import PromptBuilder
from llava_serve.models import load_adapter
from llava_serve.structured.spec import OutputFormat
from llava_serve.types import PromptInputs
from tests.support import schemas
from tests.support.engines import build_engine, collect, fresh_model, settled
from tests.support.media import encode, random_image
from tests.support.oracle import greedy_ids, greedy_logits, reference_inputs
from tests.support.probes import ProbedEngine


async def test_mixed_batch_greedy_equals_solo_generate(engine, cases):
    # Staggered arrivals: later requests join a batch that is already decoding.
    results = await asyncio.gather(*[collect(engine, c, delay=0.005 * i) for i, c in enumerate(cases)])
    for case, tokens in zip(cases, results, strict=True):
        assert tokens == case.expected
    assert await settled(engine)


async def test_a_bfloat16_model_s_mixed_batch_greedy_equals_generate_in_bfloat16(tiny_dir, processor, cases):
    """`model.dtype: bfloat16` (the engine's AMX tiles on CPUs that have them, oneDNN's bf16
    products elsewhere): the engine answers what transformers' own `generate` answers on the same
    weights in the same dtype."""
    from transformers import LlavaForConditionalGeneration

    reference = LlavaForConditionalGeneration.from_pretrained(tiny_dir, dtype=torch.bfloat16).eval()
    expected = []
    for case in cases:
        inputs = {k: v.to(torch.bfloat16) if k == "pixel_values" else v for k, v in case.inputs.items()}
        expected.append(greedy_ids(reference, inputs, case.max_tokens))
    model = LlavaForConditionalGeneration.from_pretrained(tiny_dir, dtype=torch.bfloat16).eval()
    runner = ModelRunner(model, 1 << 24)
    assert runner.packed and runner.dtype == torch.bfloat16
    tiles = runner.ops is not None and runner.ops.tile_ready()
    assert (runner.head.packed.kernel == "tiles") == tiles
    eos = [model.config.text_config.eos_token_id]
    engine = ProbedEngine(runner, processor.tokenizer, eos, EngineConfig(max_batch_size=8, max_queue=64))
    try:
        results = await asyncio.gather(*[collect(engine, c, delay=0.005 * i) for i, c in enumerate(cases)])
    finally:
        await engine.shutdown()
    assert results == expected


async def test_seeded_sampling_is_reproducible_whatever_shares_the_batch(engine, cases):
    params = SamplingParams(max_tokens=20, temperature=0.9, top_p=0.95, top_k=50, seed=1234)
    solo = await collect(engine, cases[0], params)
    crowd = await asyncio.gather(
        collect(engine, cases[1]), collect(engine, cases[0], params, 0.003), collect(engine, cases[2])
    )
    assert crowd[1] == solo
    other_seed = await collect(engine, cases[0], SamplingParams(max_tokens=20, temperature=0.9, seed=99))
    assert other_seed != solo


async def test_cancelling_half_of_16_streams_leaves_the_rest_correct(engine, cases):
    case = cases[4]  # 40 tokens: long enough to be mid-stream when cancelled
    streams = [
        engine.generate(case.input_ids, case.images, SamplingParams(40, temperature=0.0)) for _ in range(16)
    ]

    async def run(i, stream):
        tokens = []
        async for out in stream:
            tokens += out.token_ids
            if i % 2 and len(tokens) >= 3:
                await stream.aclose()  # what a client disconnect does
                return None
        return tokens

    results = await asyncio.gather(*[run(i, s) for i, s in enumerate(streams)])
    for i, tokens in enumerate(results):
        assert tokens is None if i % 2 else tokens == case.expected
    assert await settled(engine)
    # The freed slots are reused: a new request runs and is correct.
    assert await collect(engine, cases[1]) == cases[1].expected


async def test_cancelled_request_leaves_the_batch_at_the_next_step(engine, cases):
    long = SamplingParams(max_tokens=500, temperature=0.0)
    stream = engine.generate(cases[2].input_ids, [], long)
    await anext(stream)
    assert engine.num_running == 1
    await stream.aclose()
    assert await settled(engine, timeout=1.0)


async def test_full_queue_is_overloaded(tiny_dir, processor, cases):
    model = fresh_model(tiny_dir)
    eng = ProbedEngine(
        ModelRunner(model, 0), processor.tokenizer, [2], EngineConfig(max_batch_size=1, max_queue=1)
    )
    first = eng.generate(cases[2].input_ids, [], SamplingParams(50, temperature=0.0))
    await anext(first)  # running
    queued = eng.generate(cases[2].input_ids, [], SamplingParams(5, temperature=0.0))
    task = asyncio.ensure_future(anext(queued))  # waiting
    await asyncio.sleep(0.01)
    with pytest.raises(Overloaded):
        await anext(eng.generate(cases[2].input_ids, [], SamplingParams(5, temperature=0.0)))
    task.cancel()  # the waiting caller goes away: its queue slot is free at once
    with contextlib.suppress(asyncio.CancelledError):
        await task
    await queued.aclose()
    assert eng.num_waiting == 0
    queued = eng.generate(cases[2].input_ids, [], SamplingParams(5, temperature=0.0))
    task = asyncio.ensure_future(anext(queued))
    await asyncio.sleep(0.01)
    assert eng.num_waiting == 1
    await first.aclose()
    await task
    await queued.aclose()


async def test_repeated_image_hits_the_vision_cache(engine, cases):
    cache = engine.runner.vision_cache
    await collect(engine, cases[0])
    misses, hits = cache.misses, cache.hits
    assert await collect(engine, cases[0]) == cases[0].expected
    assert (cache.misses, cache.hits) == (misses, hits + 1)


async def test_a_failing_request_fails_alone_and_the_engine_keeps_running(engine, cases):
    good = cases[0]
    broken = images.PreparedImage(good.images[0].pixel_values[:, :10, :10].copy(), "wrong-shape")
    params = SamplingParams(max_tokens=good.max_tokens, temperature=0.0)

    async def bad():
        return [o async for o in engine.generate(good.input_ids, [broken], params)]

    results = await asyncio.gather(
        collect(engine, good), bad(), collect(engine, cases[1]), return_exceptions=True
    )
    assert results[0] == good.expected and results[2] == cases[1].expected
    assert isinstance(results[1], EngineError)
    assert await collect(engine, cases[2]) == cases[2].expected


class OpenAIPenalties:
    """OpenAI's documented presence/frequency penalties, as a `transformers` logits processor:
    logit[j] -= frequency * count[j] + presence * (count[j] > 0), over generated tokens only."""

    def __init__(self, prompt_length: int, presence: float, frequency: float):
        self.prompt_length, self.presence, self.frequency = prompt_length, presence, frequency

    def __call__(self, input_ids, scores):
        for row, ids in enumerate(input_ids[:, self.prompt_length :]):
            counts = torch.bincount(ids, minlength=scores.shape[-1]).to(scores.dtype)
            scores[row] -= self.frequency * counts + self.presence * (counts > 0).to(scores.dtype)
        return scores


async def test_penalties_in_a_mixed_batch_equal_transformers(engine, cases, hf_model):
    from transformers import LogitsProcessorList

    def hf(case, **kw) -> list[int]:
        return greedy_ids(hf_model, case.inputs, case.max_tokens, **kw)

    rep, pen = cases[0], cases[4]
    processors = LogitsProcessorList([OpenAIPenalties(pen.inputs["input_ids"].shape[1], 0.7, 1.3)])
    expected = [hf(rep, repetition_penalty=1.5), hf(pen, logits_processor=processors), cases[2].expected]
    params = [
        SamplingParams(max_tokens=rep.max_tokens, temperature=0.0, repetition_penalty=1.5),
        SamplingParams(
            max_tokens=pen.max_tokens, temperature=0.0, presence_penalty=0.7, frequency_penalty=1.3
        ),
        None,
    ]
    got = await asyncio.gather(
        *[collect(engine, c, p) for c, p in zip([rep, pen, cases[2]], params, strict=True)]
    )
    assert got == expected
    assert expected[0] != rep.expected and expected[1] != pen.expected  # the penalties changed something


async def test_logprobs_are_the_models_distribution(engine, cases, hf_model):
    case = cases[1]
    params = SamplingParams(max_tokens=case.max_tokens, temperature=0.0, logprobs=True, top_logprobs=3)
    outs = [o async for o in engine.generate(case.input_ids, case.images, params)]
    entries = [(t, lp) for o in outs for t, lp in zip(o.token_ids, o.logprobs, strict=True)]
    reference = greedy_logits(hf_model, case.inputs, case.max_tokens)
    for (token, logprob), logits in zip(entries, reference, strict=True):
        expected = torch.log_softmax(logits.float(), -1)
        assert logprob.logprob == pytest.approx(float(expected[token]), abs=1e-4)
        assert len(logprob.top) == 3
        assert logprob.top[0][-1] == pytest.approx(float(expected.max()), abs=1e-4)  # greedy: the top one
        assert [e[-1] for e in logprob.top] == sorted((e[-1] for e in logprob.top), reverse=True)


async def test_health_check_fails_when_the_loop_is_wedged_or_dead(tiny_dir, processor, cases):
    import threading

    model = fresh_model(tiny_dir)
    eng = Engine(
        ModelRunner(model, 1 << 20),
        processor.tokenizer,
        [model.config.text_config.eos_token_id],
        EngineConfig(stall_timeout_s=0.3),
    )
    eng.check_health()  # idle is healthy, however long
    gate = threading.Event()
    eng._executor.submit(gate.wait)  # the model thread is stuck, as in a hung kernel
    pending = asyncio.create_task(collect(eng, cases[5]))
    await asyncio.sleep(0.5)
    with pytest.raises(EngineError, match="no step finished"):
        eng.check_health()
    gate.set()
    assert await pending == cases[5].expected
    eng.check_health()
    eng._task.cancel()
    await asyncio.sleep(0)
    with pytest.raises(EngineError, match="loop exited"):
        eng.check_health()
    await eng.shutdown()


async def test_a_row_whose_logits_go_bad_fails_alone_and_the_others_are_unchanged(engine, cases):
    """NaN logits in one row mid-decode: that request fails with a typed error, the rows beside
    it produce exactly what they produce alone."""
    victim = cases[4]  # 40 tokens: still decoding when the others are

    def poison(seqs, logits):
        for i, seq in enumerate(seqs):
            if seq.input_ids == victim.input_ids and seq.num_generated == 3:
                logits = logits.clone()
                logits[i] = float("nan")
        return logits

    engine.logits_hook = poison
    results = await asyncio.gather(
        collect(engine, cases[0]), collect(engine, victim), collect(engine, cases[3]), return_exceptions=True
    )
    assert isinstance(results[1], EngineError) and "non-finite" in results[1].message
    assert results[0] == cases[0].expected and results[2] == cases[3].expected
    engine.logits_hook = None
    assert await collect(engine, victim) == victim.expected


async def test_a_failed_prefill_is_retried_one_by_one_without_advancing_anyone_twice(engine, cases):
    """Four requests admitted in one prefill: one with a broken image (the batch's forward
    fails, so each is retried alone), one whose first sampling fails (NaN logits). The good
    ones' outputs are exactly their solo outputs, one token per step: no sampler, detokenizer
    or stop state advanced twice."""
    good = cases[0]
    broken = images.PreparedImage(good.images[0].pixel_values[:, :10, :10].copy(), "wrong-shape")
    params = SamplingParams(max_tokens=good.max_tokens, temperature=0.0)
    seqs = [
        engine.submit(good.input_ids, good.images, params),
        engine.submit(good.input_ids, [broken], params),
        engine.submit(
            cases[1].input_ids, cases[1].images, SamplingParams(cases[1].max_tokens, temperature=0.0)
        ),
        engine.submit(cases[2].input_ids, [], SamplingParams(5, temperature=1.0, seed=1)),
    ]

    def poison_first_token(step_seqs, logits):
        bad = [i for i, seq in enumerate(step_seqs) if seq is seqs[3]]
        return logits.index_fill(0, torch.tensor(bad, dtype=torch.long), float("nan")) if bad else logits

    engine.logits_hook = poison_first_token

    async def drain(seq):
        return [o async for o in engine.stream(seq)]

    results = await asyncio.gather(*map(drain, seqs), return_exceptions=True)
    assert isinstance(results[1], EngineError) and isinstance(results[3], EngineError)
    for outs, case in ((results[0], good), (results[2], cases[1])):
        assert [t for o in outs for t in o.token_ids] == case.expected
        assert [o.completion_tokens for o in outs] == list(
            itertools.accumulate(len(o.token_ids) for o in outs)
        )


async def one_running_one_waiting(tiny_dir, processor, cases):
    """An engine of one row: a long request decoding, another waiting for the row."""
    model = fresh_model(tiny_dir)
    eng = ProbedEngine(
        ModelRunner(model, 0), processor.tokenizer, [2], EngineConfig(max_batch_size=1, max_queue=8)
    )
    running = eng.generate(cases[2].input_ids, [], SamplingParams(500, temperature=0.0))
    await anext(running)
    waiting = asyncio.ensure_future(collect(eng, cases[5]))
    await asyncio.sleep(0.05)
    assert (eng.num_running, eng.num_waiting) == (1, 1)
    return eng, running, waiting


async def test_if_the_loop_dies_every_request_ends_at_once_with_a_typed_error(tiny_dir, processor, cases):
    eng, running, waiting = await one_running_one_waiting(tiny_dir, processor, cases)

    def die(seqs, logits):
        raise RuntimeError("a bug in the step loop")

    eng.logits_hook = die
    with pytest.raises(EngineError, match="engine stopped"):
        async with asyncio.timeout(5):
            async for _ in running:
                pass
    with pytest.raises(EngineError, match="engine stopped"):
        await asyncio.wait_for(waiting, 5)
    with pytest.raises(EngineError, match="loop exited"):
        eng.check_health()
    with pytest.raises(EngineError, match="has stopped"):
        eng.submit(cases[5].input_ids, [], SamplingParams(5, temperature=0.0))
    await eng.shutdown()


async def test_shutdown_ends_running_and_waiting_requests_with_unavailable(tiny_dir, processor, cases):
    eng, running, waiting = await one_running_one_waiting(tiny_dir, processor, cases)
    await eng.shutdown()
    with pytest.raises(Unavailable):
        async with asyncio.timeout(5):
            async for _ in running:
                pass
    with pytest.raises(Unavailable):
        await asyncio.wait_for(waiting, 5)


async def test_the_first_output_carries_the_requests_stage_timings(engine, cases):
    case = cases[3]  # two images
    params = SamplingParams(max_tokens=case.max_tokens, temperature=0.0)
    seq = engine.submit(case.input_ids, case.images, params, {"tokenize": 0.25, "image_fetch": 0.5})
    outs = [o async for o in engine.stream(seq)]
    stages = outs[0].stages
    assert set(stages) == {"tokenize", "image_fetch", "queue", "vision_encode", "prefill"}
    assert (stages["tokenize"], stages["image_fetch"]) == (0.25, 0.5)
    assert all(v >= 0 for v in stages.values()) and stages["prefill"] > 0
    assert all(o.stages is None for o in outs[1:])


# -- chunked prefill and prefix reuse -------------------------------------------------------


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
    assert await settled(chunky)


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


async def test_the_engine_tells_the_router_what_it_holds_and_each_answer_what_it_reused(
    tiny_dir, processor, turns
):
    """Routing digests are held while a request runs and after it, in the prefix cache; the
    follow-up's outputs count the positions it reused."""
    first, follow, _ = turns
    eng = build_engine(tiny_dir, processor, EngineConfig())
    try:
        params = SamplingParams(max_tokens=first.max_tokens, temperature=0.0)
        stream = eng.serve(PromptInputs(first.input_ids, 1, route_blocks=(101, 102)), params, first.images)
        assert (await anext(stream)).accepted
        assert eng.held_blocks() == {101, 102} and eng.utilization() > 0
        outs = [out async for out in stream]
        assert [t for o in outs for t in o.token_ids] == first.expected and outs[-1].cached_tokens == 0
        assert await settled(eng)
        assert eng.held_blocks() == {101, 102} and eng.utilization() == 0
        outs = [o async for o in eng.serve(PromptInputs(follow.input_ids, 1), params, follow.images)][1:]
        assert [t for o in outs for t in o.token_ids] == follow.expected
        assert outs[-1].cached_tokens >= len(first.input_ids)
    finally:
        await eng.shutdown()


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


async def test_cancelling_a_joining_request_gives_its_slot_back(tiny_dir, processor, cases):
    """Cancelled while its prompt is written chunk by chunk (held inside its second chunk's step,
    so the state is there to see however fast a step runs): its slot comes back."""
    # No prefix cache: the whole prompt is written, 32 positions a step.
    eng = build_engine(
        tiny_dir, processor, EngineConfig(max_batch_size=8, max_step_tokens=32, prefix_cache_bytes=0)
    )
    long_case = max(cases, key=lambda c: len(c.input_ids))
    assert len(long_case.input_ids) > 32  # two chunks at least
    chunks = []
    writing, release = threading.Event(), threading.Event()

    def hold(layout):  # the model thread waits inside the step writing the prompt's second chunk
        if layout.segments:
            chunks.append(layout)
            if len(chunks) == 2:
                writing.set()
                release.wait(timeout=30)

    eng.runner.step_hook = hold
    kv = eng.runner.kv
    try:
        stream = eng.generate(long_case.input_ids, long_case.images, SamplingParams(8, temperature=0.0))
        first = asyncio.ensure_future(anext(stream))
        assert await asyncio.to_thread(writing.wait, 30)
        assert eng.stats()["joining"] == 1 and kv.free_slots == kv.slots - 1
        first.cancel()
        await asyncio.gather(first, return_exceptions=True)
        release.set()
        await stream.aclose()
        assert await settled(eng, timeout=2.0)
    finally:
        release.set()
        await eng.shutdown()


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


async def test_a_failed_step_fails_the_requests_in_it_and_nothing_else(chunky, cases):
    """A forward pass fails inside the model while rows decode and prompts are written: the
    requests in that step fail with a typed error; requests still waiting then run and answer as
    `generate` does (no other slot was touched), every slot is given back, and the engine serves
    the next request."""
    failing = []

    def fail_once(layout):
        # The first step that both decodes and writes prompt chunks fails (which step that is
        # depends on the machine's speed: the requests arrive 4 ms apart).
        if not failing and layout.rows and layout.segments:
            failing.append(layout)
            raise RuntimeError("injected failure in a step")

    chunky.runner.step_hook = fail_once
    try:
        # Bounded: a regression here would leave requests waiting for good, not fail them.
        results = await asyncio.wait_for(
            asyncio.gather(
                *[collect(chunky, c, delay=0.004 * i) for i, c in enumerate(cases * 2)],
                return_exceptions=True,
            ),
            timeout=60,
        )
    finally:
        chunky.runner.step_hook = None
    assert failing, "no step both decoded and wrote prompt chunks"
    failed = [r for r in results if isinstance(r, Exception)]
    assert failed and all(isinstance(r, EngineError) for r in failed)
    answered = [(c, r) for c, r in zip(cases * 2, results, strict=True) if not isinstance(r, Exception)]
    assert answered and all(r == c.expected for c, r in answered)
    assert await settled(chunky)
    assert await collect(chunky, cases[0]) == cases[0].expected


async def test_kv_cache_bytes_sizes_the_slots_and_a_request_must_fit_one(tiny_dir, turns):
    """The budget is allocated once, shared by max_batch_size slots; a request whose prompt plus
    max_tokens would outgrow a slot is refused up front, naming the knob."""
    first = turns[0]
    per_token = KVManager.bytes_per_token(AutoConfig.from_pretrained(tiny_dir), torch.float32)
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


# -- vLLM's sampling extensions ---------------------------------------------------------------


async def answer(engine, case, **params) -> tuple[list[int], str, str]:
    """(token ids, text, finish reason) of one greedy request with `params` over the defaults."""
    sampling = SamplingParams(**{"max_tokens": case.max_tokens, "temperature": 0.0, **params})
    outs = [o async for o in engine.generate(case.input_ids, case.images, sampling)]
    return [t for o in outs for t in o.token_ids], "".join(o.text for o in outs), outs[-1].finish_reason


async def test_ignore_eos_runs_to_max_tokens_past_an_end_of_sequence(engine, cases, hf_model):
    eos = hf_model.config.text_config.eos_token_id
    forced = ((eos, 100.0),)  # the answer would end at its first token
    ids, _, finish = await answer(engine, cases[1], logit_bias=forced)
    assert (ids, finish) == ([eos], "stop")
    ids, text, finish = await answer(engine, cases[1], logit_bias=forced, ignore_eos=True)
    assert (ids, text, finish) == ([eos] * cases[1].max_tokens, "", "length")


async def test_min_tokens_holds_off_the_end_of_sequence_and_stop_strings(engine, cases, hf_model):
    eos = hf_model.config.text_config.eos_token_id
    case = cases[0]
    ids, _, finish = await answer(engine, case, logit_bias=((eos, 100.0),), min_tokens=5)
    assert len(ids) == 6 and eos not in ids[:5] and ids[5] == eos and finish == "stop"
    _, whole, _ = await answer(engine, case)  # `generate`'s greedy text: a stop string from it
    stop = whole[1:3]
    _, early, _ = await answer(engine, case, stop=(stop,))
    assert early == whole[: whole.index(stop)]
    _, later, _ = await answer(engine, case, stop=(stop,), min_tokens=case.max_tokens)
    assert later == whole  # a stop string before min_tokens does not count


async def test_a_stop_token_ends_the_answer_and_stays_out_unless_asked_for(engine, cases, processor):
    case = cases[0]
    stop_at = 3
    token = case.expected[stop_at]
    first = case.expected.index(token)  # where the greedy answer first writes it
    decode = processor.tokenizer.decode
    ids, text, finish = await answer(engine, case, stop_token_ids=(token,))
    assert (ids, finish) == (case.expected[: first + 1], "stop")
    assert text == decode(case.expected[:first], skip_special_tokens=True)
    _, kept, _ = await answer(engine, case, stop_token_ids=(token,), include_stop_str_in_output=True)
    assert kept == decode(case.expected[: first + 1], skip_special_tokens=True)


async def test_a_stop_string_stays_in_the_answer_when_asked_to(engine, cases):
    case = cases[0]
    _, whole, _ = await answer(engine, case)
    stop = whole[2:5]
    _, text, finish = await answer(engine, case, stop=(stop,), include_stop_str_in_output=True)
    assert (text, finish) == (whole[: whole.index(stop) + len(stop)], "stop")


async def test_special_tokens_the_model_writes_show_when_not_skipped(engine, cases, processor):
    image = processor.image_token_id  # a special token of the tiny tokenizer
    forced = ((image, 100.0),)
    _, skipped, _ = await answer(engine, cases[1], logit_bias=forced, max_tokens=3)
    _, shown, _ = await answer(engine, cases[1], logit_bias=forced, max_tokens=3, skip_special_tokens=False)
    assert (skipped, shown) == ("", processor.image_token * 3)


async def test_min_p_of_one_keeps_only_the_likeliest_token_so_sampling_is_greedy(engine, cases):
    case = cases[0]
    ids, _, _ = await answer(engine, case, temperature=1.5, seed=7, min_p=1.0)
    assert ids == case.expected


async def test_a_stop_token_outside_the_vocabulary_is_refused_naming_it(engine, cases):
    with pytest.raises(InvalidRequest) as info:
        await answer(engine, cases[0], stop_token_ids=(10**8,))
    assert info.value.param == "stop_token_ids"


# -- n choices ---------------------------------------------------------------------------------


async def choices(engine, case, params: SamplingParams) -> dict[int, list[int]]:
    """Each choice's token ids, by index, from one request's stream."""
    out: dict[int, list[int]] = {}
    async for o in engine.generate(case.input_ids, case.images, params):
        out.setdefault(o.index, []).extend(o.token_ids)
    return out


async def test_greedy_choices_are_identical_and_the_prompt_is_computed_once(engine, cases):
    case = cases[0]
    params = SamplingParams(max_tokens=case.max_tokens, temperature=0.0, n=3)
    got = await choices(engine, case, params)
    assert got == {i: case.expected for i in range(3)}
    assert engine.stats()["prefill_tokens"] == len(case.input_ids)
    assert await settled(engine)


async def test_seeded_choices_differ_and_each_is_its_own_seeded_request(engine, cases):
    """Choice i samples as a lone request with choice i's derived seed would: the forks share the
    prompt's logits and KV, nothing else."""
    case = cases[0]
    params = SamplingParams(max_tokens=20, temperature=1.0, seed=7, n=3)
    busy = asyncio.ensure_future(collect(engine, cases[3]))  # choices among other rows
    got = await choices(engine, case, params)
    assert await busy == cases[3].expected
    assert len({tuple(t) for t in got.values()}) == 3
    for i in range(3):
        alone = await collect(engine, case, replace(params, n=1).for_choice(i))
        assert got[i] == alone
    assert await choices(engine, case, params) == got


async def test_choices_under_a_grammar_each_match_it(engine, cases, processor):
    case = cases[2]
    fmt = OutputFormat.from_schema(schemas.PERSON, "response_format")
    params = SamplingParams(max_tokens=40, temperature=1.0, seed=3, n=2, output=fmt)
    texts: dict[int, str] = {}
    async for o in engine.generate(case.input_ids, case.images, params):
        texts[o.index] = texts.get(o.index, "") + o.text
    assert set(texts) == {0, 1}
    for text in texts.values():
        jsonschema.validate(json.loads(text), schemas.PERSON)


async def test_cancelling_a_request_for_n_choices_frees_every_slot(engine, cases):
    case = cases[4]
    params = SamplingParams(max_tokens=case.max_tokens, temperature=0.0, n=4)
    stream = engine.generate(case.input_ids, case.images, params)
    seen = set()
    async for o in stream:
        seen.add(o.index)
        if len(seen) == 4:
            break
    await stream.aclose()
    assert await settled(engine, timeout=10)
    assert await collect(engine, cases[1]) == cases[1].expected


async def test_n_over_the_batch_is_refused_naming_it(engine, cases):
    case = cases[0]
    with pytest.raises(InvalidRequest) as e:
        engine.submit(case.input_ids, case.images, SamplingParams(max_tokens=4, n=9))
    assert e.value.param == "n" and "max_batch_size" in str(e.value)
