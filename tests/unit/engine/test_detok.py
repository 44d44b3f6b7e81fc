import random

from llava_serve.engine.detok import IncrementalDetokenizer, StopMatcher, TokenBytes
from tests.support.tokenizers import sentencepiece_tokenizer


def test_incremental_text_equals_full_decode_and_never_splits_characters(processor):
    tok = processor.tokenizer
    text = "Émile paid 12,50 € for café; 東京 ✓ 🙂 naïve résumé"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    rng = random.Random(0)
    for _ in range(20):
        seq = ids + [rng.randrange(10, tok.vocab_size) for _ in range(30)]
        detok = IncrementalDetokenizer(tok, [1], 0, 1)
        pieces = [detok.push(t) for t in seq] + [detok.flush()]
        assert "".join(pieces) == tok.decode(seq, skip_special_tokens=True)
    detok = IncrementalDetokenizer(tok, [1], 0, 1)
    pieces = [detok.push(t) for t in ids]
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) == text


def test_stop_strings_are_cut_and_never_emitted():
    m = StopMatcher(("STOP", "\n\n"))
    out = []
    for piece in ["Hello ", "wor", "ld S", "TO", "P and more"]:
        text, hit = m.feed(piece)
        out.append(text)
        if hit:
            break
    assert "".join(out) == "Hello world "
    assert hit


def test_held_back_prefix_is_released_when_it_does_not_complete():
    m = StopMatcher(("STOP",))
    assert m.feed("abc ST") == ("abc ", False)
    assert m.feed("ART S") == ("START ", False)
    assert m.flush() == "S"


def test_token_bytes_are_each_tokens_own_bytes_for_both_schemes(processor):
    """Byte-level BPE and SentencePiece with byte fallback: a token's bytes joined over a text
    give the text's UTF-8 exactly, including tokens that hold part of a character."""
    text = "Hello wörld 語 東京 🙂 end"
    for tokenizer in (processor.tokenizer, sentencepiece_tokenizer()):
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        token_bytes = TokenBytes(tokenizer)
        pieces = [token_bytes(i) for i in ids]
        joined = b"".join(pieces)
        # SentencePiece marks the first word with a space the decoder strips.
        assert joined.removeprefix(b" ") == text.encode()
        assert any(p and not _is_utf8(p) for p in pieces), "the text should split a character"
        assert token_bytes(tokenizer.eos_token_id) == b""


def _is_utf8(data: bytes) -> bool:
    try:
        data.decode()
    except UnicodeDecodeError:
        return False
    return True


def test_a_stop_string_stays_in_the_text_when_asked_to():
    for include, expected in ((False, "one, "), (True, "one, two")):
        matcher = StopMatcher(("two",), include)
        out = [matcher.feed(piece) for piece in ("one, t", "wo, three")]
        assert "".join(text for text, _ in out) == expected and out[-1][1]
