"""One request's state: tokens to text, finish reasons, logprobs, and failures that change nothing."""

import pytest
import torch

from llava_serve.engine.detok import TokenBytes
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
    prompt = tokenizer("Say:")["input_ids"]
    params = SamplingParams(**{"max_tokens": 100, "temperature": 0.0, **params})
    seq = Sequence.create(prompt, [], params, TokenBytes(tokenizer), [tokenizer.eos_token_id], "cpu")
    outs = []
    for token in tokens:
        outs.append(seq.advance(forcing(token, len(tokenizer))))
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
    state = (list(seq.generated), list(seq.detok.ids))
    nan = torch.full((len(tok),), float("nan"))
    with pytest.raises(RuntimeError):
        seq.advance(nan)
    assert (list(seq.generated), list(seq.detok.ids)) == state
    assert not seq.finished
