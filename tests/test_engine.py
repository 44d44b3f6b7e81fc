"""The engine against `transformers.generate` on the same checkpoint, inputs and images."""

import asyncio
import contextlib
import itertools

import pytest
import torch

from llava_serve import images
from llava_serve.config import EngineConfig
from llava_serve.engine import Engine
from llava_serve.engine.runner import ModelRunner
from llava_serve.engine.sampling import SamplingParams
from llava_serve.errors import EngineError, Overloaded, Unavailable
from tests.engine_cases import collect


async def test_mixed_batch_greedy_equals_solo_generate(engine, cases):
    # Staggered arrivals: later requests join a batch that is already decoding.
    results = await asyncio.gather(*[collect(engine, c, delay=0.005 * i) for i, c in enumerate(cases)])
    for case, tokens in zip(cases, results, strict=True):
        assert tokens == case.expected
    assert engine.num_running == 0 and engine.runner.batch is None


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
    await asyncio.sleep(0.05)
    assert engine.num_running == 0 and engine.runner.num_rows == 0
    # The freed slots are reused: a new request runs and is correct.
    assert await collect(engine, cases[1]) == cases[1].expected


async def test_cancelled_request_leaves_the_batch_at_the_next_step(engine, cases):
    long = SamplingParams(max_tokens=500, temperature=0.0)
    stream = engine.generate(cases[2].input_ids, [], long)
    await anext(stream)
    assert engine.num_running == 1
    await stream.aclose()
    for _ in range(100):
        if engine.runner.num_rows == 0:
            break
        await asyncio.sleep(0.01)
    assert engine.num_running == 0 and engine.runner.num_rows == 0


async def test_full_queue_is_overloaded(tiny_dir, processor, cases):
    from transformers import LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(tiny_dir).eval()
    eng = Engine(ModelRunner(model, 0), processor.tokenizer, [2], EngineConfig(max_batch_size=1, max_queue=1))
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
        with torch.no_grad():
            out = hf_model.generate(**case.inputs, max_new_tokens=case.max_tokens, do_sample=False, **kw)
        return out[0, case.inputs["input_ids"].shape[1] :].tolist()

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
    with torch.no_grad():
        ref = hf_model.generate(
            **case.inputs,
            max_new_tokens=case.max_tokens,
            do_sample=False,
            output_logits=True,
            return_dict_in_generate=True,
        )
    for (token, logprob), logits in zip(entries, ref.logits, strict=True):
        expected = torch.log_softmax(logits[0].float(), -1)
        assert logprob.logprob == pytest.approx(float(expected[token]), abs=1e-4)
        assert len(logprob.top) == 3
        assert logprob.top[0][-1] == pytest.approx(float(expected.max()), abs=1e-4)  # greedy: the top one
        assert [e[-1] for e in logprob.top] == sorted((e[-1] for e in logprob.top), reverse=True)


async def test_health_check_fails_when_the_loop_is_wedged_or_dead(tiny_dir, processor, cases):
    import threading

    from transformers import LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(tiny_dir).eval()
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
    from transformers import LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(tiny_dir).eval()
    eng = Engine(ModelRunner(model, 0), processor.tokenizer, [2], EngineConfig(max_batch_size=1, max_queue=8))
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


def test_the_vision_cache_keeps_the_recently_used_within_its_bytes():
    import torch

    from llava_serve.engine.vision import VisionCache

    cache = VisionCache(max_bytes=100)  # ten float32s are 40 bytes: two fit
    for key in "ab":
        cache.put(key, torch.zeros(10))
    assert cache.get("a") is not None  # a is now the more recently used
    cache.put("c", torch.zeros(10))
    assert (cache.get("b"), cache.bytes, sorted(cache.entries)) == (None, 80, ["a", "c"])
    cache.put("d", torch.zeros(30))  # larger than the whole budget: not kept, nothing evicted
    assert sorted(cache.entries) == ["a", "c"] and (cache.hits, cache.misses) == (1, 1)
