"""A request from sampled logits to what its stream sends: the sampler's token and logprobs, the
request's token-level end, the output processor's text and stop strings; and a failed sampling
step that changes nothing."""

import random

import pytest
import torch

from llava_serve.engine.detok import TokenBytes
from llava_serve.engine.output import Detokenizer, RequestText
from llava_serve.engine.sampler import Sampler
from llava_serve.engine.sampling import SamplingParams
from llava_serve.engine.sequence import Sequence
from tests.support.tokenizers import sentencepiece_tokenizer

TEXT = "Hello wörld 語 東京 🙂 end"


def forcing(token: int, vocab: int) -> torch.Tensor:
    """Logits under which greedy decoding picks `token`."""
    logits = torch.full((vocab,), -10.0)
    logits[token] = 10.0
    return logits


def run(tokenizer, tokens: list[int], **params) -> tuple[Sequence, list]:
    """Each token forced through the sampler, taken by the request, and made text."""
    prompt = tokenizer("Say:")["input_ids"]
    params = SamplingParams(**{"max_tokens": 100, "temperature": 0.0, **params})
    seq = Sequence.create(prompt, [], params, [tokenizer.eos_token_id], "cpu")
    text, token_bytes, sampler = RequestText(seq, tokenizer), TokenBytes(tokenizer), Sampler(len(tokenizer))
    outs = []
    for token in tokens:
        sampled = sampler.sample([seq], forcing(token, len(tokenizer))[None])
        assert sampled.picked == {0: token}
        outs.append(text.step(seq, seq.accept(token, sampled.logprobs.get(0)), token_bytes))
        if outs[-1].finish_reason:
            break
    return seq, outs


@pytest.fixture(params=["byte-level", "sentencepiece"])
def tokenizer(request, processor):
    return processor.tokenizer if request.param == "byte-level" else sentencepiece_tokenizer()


def test_logprob_tokens_concatenate_to_the_answer_and_carry_their_own_bytes(tokenizer):
    ids = tokenizer(TEXT, add_special_tokens=False)["input_ids"]
    _, outs = run(tokenizer, [*ids, tokenizer.eos_token_id], logprobs=True, top_logprobs=2)
    content = "".join(o.text for o in outs)
    assert content.strip() == TEXT
    entries = [o.logprobs[0] for o in outs]
    assert "".join(e.token for e in entries) == content  # leading spaces kept
    assert b"".join(e.bytes for e in entries) == content.encode()
    split = [e for e in entries if e.bytes and e.token == ""]
    assert split, "some token holds only part of a character: no text yet, but its own bytes"
    for out, entry in zip(outs[:-1], entries, strict=False):
        assert entry.top[0][0:2] == (tokenizer.decode([out.token_id]), entry.bytes)


def test_finish_reasons(processor):
    tok = processor.tokenizer
    ids = tok(" one two three", add_special_tokens=False)["input_ids"]
    seq, outs = run(tok, ids, max_tokens=2)
    assert [o.finish_reason for o in outs] == [None, "length"] and seq.finished
    seq, outs = run(tok, [ids[0], tok.eos_token_id, ids[1]])
    assert [o.finish_reason for o in outs] == [None, "stop"] and seq.num_generated == 2
    full = tok.decode(ids)
    _, outs = run(tok, ids, stop=(full.split()[1],))
    assert outs[-1].finish_reason == "stop" and "".join(o.text for o in outs) == full[: full.index("two")]


def test_a_failed_sampling_step_changes_nothing(processor):
    tok = processor.tokenizer
    seq, _ = run(tok, tok(" a b", add_special_tokens=False)["input_ids"], temperature=1.0, seed=3)
    state = list(seq.generated)
    nan = torch.full((len(tok),), float("nan"))
    sampled = Sampler(len(tok)).sample([seq], torch.stack([nan]))
    assert not sampled.picked and "non-finite" in str(sampled.failures[0])
    assert seq.generated == state and not seq.finished


def test_streamed_text_equals_the_full_decode_and_never_splits_a_character(processor):
    """`DecodeStream` for the byte-level tokenizer: with random ids (broken byte sequences among
    them) the deltas join to the tokenizer's own decode. Both tokenizers stream a text exactly,
    never a broken character, with the answer's leading space kept."""
    text = "Émile paid 12,50 € for café; 東京 ✓ 🙂 naïve résumé"
    tok = processor.tokenizer
    ids = tok(text, add_special_tokens=False)["input_ids"]
    rng = random.Random(0)
    for _ in range(20):
        answer = ids + [rng.randrange(10, tok.vocab_size) for _ in range(30)]
        detok = Detokenizer(tok, [1])
        pieces = [detok.push(t) for t in answer] + [detok.flush()]
        assert "".join(pieces) == tok.decode(answer, skip_special_tokens=True)
    for tok in (processor.tokenizer, sentencepiece_tokenizer()):
        ids = tok(" " + text, add_special_tokens=False)["input_ids"]
        detok = Detokenizer(tok, tok("Say:")["input_ids"])
        pieces = [detok.push(t) for t in ids] + [detok.flush()]
        assert all("\ufffd" not in p for p in pieces)
        assert "".join(pieces) == " " + text
