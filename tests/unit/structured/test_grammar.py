"""Structured outputs in the engine: schemas held token by token, inside mixed batches, against
`transformers.generate` with the same grammar applied by a logits processor."""

import asyncio
import json

import jsonschema
import llguidance
import llguidance.hf
import llguidance.torch
import pytest
import torch

from llava_serve.config import EngineConfig
from llava_serve.engine.sampling import SamplingParams
from llava_serve.errors import InvalidRequest
from llava_serve.structured.grammar import JSON_OPTIONS, GrammarCompiler
from llava_serve.structured.spec import JSON_OBJECT, OutputFormat, ToolCallFormat
from llava_serve.structured.tools import ToolCallReader, call_format
from tests.support import schemas
from tests.support.engines import Case, build_engine, collect
from tests.support.oracle import greedy_ids


@pytest.fixture(scope="module")
def cases(processor, hf_model):
    built = [
        Case(processor, hf_model, q, seeds, n)
        for q, seeds, n in [("Give me JSON.", [1], 200), ("Hi", [], 24)]
    ]
    built[1].expected = built[1].reference(hf_model)
    return built


@pytest.fixture
async def engine(tiny_dir, processor):
    eng = build_engine(
        tiny_dir, processor, EngineConfig(max_batch_size=16, max_queue=64, grammar_cache_bytes=4 * 2**20)
    )
    yield eng
    await eng.shutdown()


async def answer(engine, case, fmt, **params) -> tuple[str, str]:
    params = SamplingParams(**{"max_tokens": case.max_tokens, "temperature": 0.0, "output": fmt, **params})
    outs = [o async for o in engine.generate(case.input_ids, case.images, params)]
    return "".join(o.text for o in outs), outs[-1].finish_reason


# -- formats ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("schema", "names"),
    [
        ({"type": "array", "uniqueItems": True}, "uniqueItems"),
        ({"type": "object", "if": {"type": "object"}, "then": {}}, '"if"'),
        ({"type": "string", "pattern": "(?<=a)b"}, "look-around"),
        ({"$ref": "http://127.0.0.1:1/schema.json"}, "does not fetch"),
    ],
)
async def test_a_schema_the_grammar_cannot_enforce_is_refused_naming_the_keyword(engine, schema, names):
    with pytest.raises(InvalidRequest) as info:
        await engine.compile(OutputFormat.from_schema(schema, "response_format"))
    assert names in info.value.message and info.value.param == "response_format"


async def test_a_format_compiles_once_and_each_request_gets_its_own_matcher(engine, cases):
    fmt = OutputFormat.from_schema(schemas.PERSON, "response_format")
    first, second = await engine.compile(fmt), await engine.compile(fmt)
    assert (engine.grammars.misses, engine.grammars.hits) == (1, 1)
    first.accept(first.matcher.compute_ff_tokens()[0])  # one moves on, the other does not
    assert first.matcher.compute_ff_tokens() != second.matcher.compute_ff_tokens()


def _compiler(processor, **config) -> GrammarCompiler:
    engine, tok = EngineConfig(**config), processor.tokenizer
    eos = [tok.eos_token_id]
    return GrammarCompiler(tok, len(tok), eos, engine.grammar_cache_bytes, engine.grammar_limits)


def _branches(n: int, tag: str = "") -> dict:
    return {"anyOf": [{"type": "object", "properties": {f"k{i}{tag}": {"const": i}}} for i in range(n)]}


def test_a_grammar_past_the_configured_limits_is_refused_not_built(processor):
    wide = OutputFormat.from_schema(_branches(300), "response_format")
    assert _compiler(processor).compile(wide).first_mask is not None  # within the defaults
    narrow = _compiler(processor, grammar_limits={"max_grammar_size": 500})
    with pytest.raises(InvalidRequest) as info:
        narrow.compile(wide)
    assert "cannot be enforced" in info.value.message and info.value.param == "response_format"
    assert narrow.cache_bytes == 0


def test_the_first_mask_comes_with_the_compilation_and_is_the_matchers_own(processor):
    grammar = _compiler(processor).compile(OutputFormat.from_schema(schemas.PERSON, "response_format"))
    fresh = llguidance.torch.allocate_token_bitmask(1, len(processor.tokenizer))
    llguidance.torch.fill_next_token_bitmask(grammar.matcher.deep_copy(), fresh, 0)
    assert torch.equal(grammar.first_mask, fresh) and fresh.any()
    grammar.accept(grammar.matcher.compute_ff_tokens()[0])
    assert grammar.first_mask is None  # after a token, masks are the matcher's own again


def test_the_grammar_cache_is_bounded_by_bytes(processor):
    compiler = _compiler(processor, grammar_cache_bytes=2 * 2**20)
    for n in range(40):
        compiler.compile(OutputFormat.from_schema(_branches(50, f"_{n}"), "response_format"))
    assert 0 < compiler.cache_bytes <= 2 * 2**20
    assert compiler.misses == 40 and len(compiler._compiled) < 40


async def test_a_grammar_past_its_limits_mid_answer_fails_its_request_as_the_callers(engine, cases):
    # A choice first (1 or 2), then a row 2100 items wide: past max_items_in_row only after a token.
    wide = {
        "type": "object",
        "properties": {"a": {"enum": [1, 2]}, "b": _branches(700)},
        "required": ["a", "b"],
    }
    fmt = OutputFormat.from_schema(wide, "response_format")
    with pytest.raises(InvalidRequest) as info:
        await answer(engine, cases[1], fmt)
    assert "max is 2000" in info.value.message and info.value.param == "response_format"
    assert await collect(engine, cases[1]) == cases[1].expected  # the engine carries on


async def test_a_schema_that_takes_too_long_is_a_400_at_once_the_next_time(tiny_dir, processor):
    engine = build_engine(tiny_dir, processor, EngineConfig(grammar_timeout_s=0.005))
    try:
        slow = OutputFormat.from_schema(_branches(600), "tools[pick].function.parameters")
        with pytest.raises(InvalidRequest) as info:
            await engine.compile(slow)
        assert "engine.grammar_timeout_s" in info.value.message
        assert info.value.param == "tools[pick].function.parameters"
        with pytest.raises(InvalidRequest) as again:
            await engine.compile(slow)
        assert again.value.message == info.value.message
        for _ in range(500):  # the grammar thread finishes the build it started, within the limits
            if engine.grammars.misses:
                break
            await asyncio.sleep(0.01)
        assert engine.grammars.misses == 1 and engine.grammars.cache_bytes == 0  # built once, not kept
    finally:
        await engine.shutdown()


# -- answers ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(schemas.ALL))
async def test_greedy_and_sampled_answers_match_their_schema(engine, cases, name):
    schema = schemas.ALL[name]
    fmt = OutputFormat.from_schema(schema, "response_format")
    settings = [
        {},
        {"temperature": 1.0, "seed": 1},
        {"temperature": 0.7, "seed": 2, "top_p": 0.9, "top_k": 50},
    ]
    settings.append({"temperature": 1.0, "seed": 3, "repetition_penalty": 1.3, "presence_penalty": 0.5})
    answers = await asyncio.gather(*[answer(engine, cases[0], fmt, **kw) for kw in settings])
    for text, finish in answers:
        assert finish == "stop", text
        jsonschema.validate(json.loads(text), schema)


async def test_json_object_answers_are_objects(engine, cases, processor):
    # The grammar makes any answer a JSON object; a bias towards `"` and `}` makes a random-weight
    # model close its strings and objects before max_tokens (a trained one does by itself).
    vocab = processor.tokenizer
    closers = {str(i): 5.0 for i in range(len(vocab)) if set(vocab.decode([i])) & set('"}')}
    settings = [
        {"temperature": 1.0, "seed": seed, "logit_bias": tuple((int(k), v) for k, v in closers.items())}
        for seed in range(8)
    ]
    answers = await asyncio.gather(*[answer(engine, cases[0], JSON_OBJECT, **kw) for kw in settings])
    assert all(finish == "stop" and isinstance(json.loads(text), dict) for text, finish in answers), answers
    assert any(len(text) > 2 for text, _ in answers)  # not only "{}"


async def test_max_tokens_inside_the_json_ends_with_length(engine, cases):
    fmt = OutputFormat.from_schema(schemas.RECEIPT, "response_format")
    text, finish = await answer(engine, cases[0], fmt, max_tokens=12)
    assert finish == "length" and text.startswith('{"items')
    with pytest.raises(json.JSONDecodeError):
        json.loads(text)


class GrammarProcessor:
    """transformers' side of the parity check: the same llguidance grammar, applied to HF's
    logits one step at a time."""

    def __init__(self, tokenizer, schema_json: str, prompt_length: int, vocab: int, eos: int):
        lltok = llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab, eos_token=[eos])
        grammar = llguidance.LLMatcher.grammar_from_json_schema(json.loads(schema_json), JSON_OPTIONS)
        self.matcher = llguidance.LLMatcher(lltok, grammar)
        self.prompt_length, self.vocab = prompt_length, vocab

    def __call__(self, input_ids, scores):
        generated = input_ids[0, self.prompt_length :].tolist()
        if generated:
            assert self.matcher.consume_token(generated[-1])
        mask = llguidance.torch.allocate_token_bitmask(1, self.vocab)
        llguidance.torch.fill_next_token_bitmask(self.matcher, mask, 0)
        allowed = ((mask.unsqueeze(-1) >> torch.arange(32)) & 1).bool().flatten(1)[:, : scores.shape[-1]]
        return scores.masked_fill(~allowed, float("-inf"))


async def test_a_mixed_batch_equals_transformers_for_constrained_and_free_rows(
    engine, cases, processor, hf_model
):
    """Constrained rows equal HF's generate under the same grammar, and the free row beside them
    gives exactly the greedy answer it gives alone."""
    from transformers import LogitsProcessorList

    case, free = cases
    vocab = hf_model.get_output_embeddings().weight.shape[0]
    eos = hf_model.config.text_config.eos_token_id
    expected = []
    for schema in (schemas.PERSON, schemas.NESTED):
        fmt = OutputFormat.from_schema(schema, "response_format")
        processors = LogitsProcessorList(
            [
                GrammarProcessor(
                    processor.tokenizer, fmt.schema_json, case.inputs["input_ids"].shape[1], vocab, eos
                )
            ]
        )
        tokens = greedy_ids(hf_model, case.inputs, case.max_tokens, logits_processor=processors)
        expected.append(tokens[:-1] if tokens[-1] == eos else tokens)
    constrained = [
        SamplingParams(max_tokens=case.max_tokens, temperature=0.0, output=OutputFormat.from_schema(s, "r"))
        for s in (schemas.PERSON, schemas.NESTED)
    ]
    got = await asyncio.gather(
        collect(engine, case, constrained[0]), collect(engine, free), collect(engine, case, constrained[1])
    )
    ours = [got[0], got[2]]
    # Our answer ends at the grammar's last token; HF's, one step later, at the end-of-sequence one.
    assert ours == expected
    assert got[1] == free.expected


async def test_logprobs_are_over_what_the_grammar_allows(engine, cases):
    fmt = OutputFormat.from_schema(schemas.PERSON, "response_format")
    params = SamplingParams(max_tokens=200, temperature=0.0, output=fmt, logprobs=True, top_logprobs=5)
    outs = [o async for o in engine.generate(cases[0].input_ids, cases[0].images, params)]
    entries = [lp for o in outs for lp in o.logprobs]
    forced = [e for e in entries if e.bytes in (b"{", b'"', b":", b",")]
    assert forced and all(e.logprob == pytest.approx(0.0, abs=1e-5) for e in forced)  # the only way on
    assert all(sum(torch.tensor([lp for *_, lp in e.top]).exp()) <= 1 + 1e-4 for e in entries)
    assert all(e.top[0][-1] == pytest.approx(e.logprob, abs=1e-5) for e in entries)  # greedy: the top one


# -- tool calls ------------------------------------------------------------------------------


async def test_a_forced_call_streams_its_name_then_its_arguments(engine, cases):
    fmt = call_format(
        {"get_weather": schemas.WEATHER, "get_time": None}, ToolCallFormat(("get_weather", "get_time"), True)
    )
    params = SamplingParams(max_tokens=200, temperature=1.0, seed=4, output=fmt)
    outs = [o async for o in engine.generate(cases[0].input_ids, cases[0].images, params)]
    reader = ToolCallReader(fmt.tool_call)
    deltas = [d for o in outs if (d := reader.feed(o.text)) is not None]
    if (last := reader.finish(outs[-1].finish_reason == "stop")) is not None:
        deltas.append(last)
    assert deltas[0].name in ("get_weather", "get_time") and deltas[0].call_id.startswith("call_")
    assert all(d.name is None for d in deltas[1:])
    arguments = "".join(d.arguments for d in deltas)
    assert arguments == reader.arguments and isinstance(json.loads(arguments), dict)
    if reader.name == "get_weather":
        jsonschema.validate(json.loads(arguments), schemas.WEATHER)
    full = "".join(o.text for o in outs)
    assert json.loads(full) == {"name": reader.name, "arguments": json.loads(arguments)}
