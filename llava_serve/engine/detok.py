"""Incremental detokenization that never emits broken UTF-8, and stop-string handling."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field


@dataclass
class IncrementalDetokenizer:
    """Turns a growing list of token ids into text deltas.

    Decodes a small window and emits only what changed past the already-read point; a
    window ending in U+FFFD is an incomplete multi-byte character, so it waits for more.
    """

    tokenizer: object
    ids: list[int] = field(default_factory=list)
    prefix_offset: int = 0
    read_offset: int = 0
    skip_special_tokens: bool = True

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        return self.advance()

    def advance(self) -> str:
        """The text of tokens appended to `ids` since the last call, once it is whole."""
        prefix, full = self._window()
        if full.endswith("\ufffd") or len(full) <= len(prefix):
            return ""
        self.prefix_offset = self.read_offset
        self.read_offset = len(self.ids)
        return full[len(prefix) :]

    def flush(self) -> str:
        """At the end: whatever was held back, an incomplete character included (as U+FFFD)."""
        prefix, full = self._window()
        self.prefix_offset = self.read_offset = len(self.ids)
        return full[len(prefix) :]

    def _window(self) -> tuple[str, str]:
        """The text already read of the window, and the whole window's."""
        decode, skip = self.tokenizer.decode, self.skip_special_tokens
        prefix = decode(self.ids[self.prefix_offset : self.read_offset], skip_special_tokens=skip)
        return prefix, decode(self.ids[self.prefix_offset :], skip_special_tokens=skip)


@dataclass
class StopMatcher:
    """Holds back text that could be the start of a stop string; truncates at a full match."""

    stops: tuple[str, ...]
    include: bool = False  # the stop string stays in the text (vLLM's include_stop_str_in_output)
    pending: str = ""

    def feed(self, text: str) -> tuple[str, bool]:
        """Return (text safe to emit, whether a stop string was hit)."""
        if not self.stops:
            return text, False
        self.pending += text
        hits = [(i, len(s)) for s in self.stops if (i := self.pending.find(s)) >= 0]
        if hits:
            at, length = min(hits)
            out, self.pending = self.pending[: at + (length if self.include else 0)], ""
            return out, True
        hold = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, len(self.pending)), 0, -1):
                if self.pending.endswith(s[:k]):
                    hold = max(hold, k)
                    break
        cut = len(self.pending) - hold
        out, self.pending = self.pending[:cut], self.pending[cut:]
        return out, False

    def flush(self) -> str:
        """At the end of generation, held-back text was not a stop after all."""
        out, self.pending = self.pending, ""
        return out


_BYTE_FALLBACK = re.compile(r"<0x([0-9A-Fa-f]{2})>")


class TokenBytes:
    """The bytes each token stands for, as OpenAI's `logprobs[].bytes` reports them.

    Decoding one token alone is not enough: a token may hold part of a multi-byte character
    (decoding gives U+FFFD), and SentencePiece decoders strip a sequence's leading space. So
    the token's vocabulary string is mapped back to bytes by the tokenizer's own scheme:
    byte-level BPE (GPT-2, Llama-3, Qwen2) through its byte-to-unicode table; SentencePiece
    (Llama-2, Mistral) with `▁` as a space and `<0xNN>` byte-fallback pieces as that byte.
    Special tokens never reach the text, so they are no bytes.
    """

    def __init__(self, tokenizer):
        from transformers.convert_slow_tokenizer import bytes_to_unicode

        self.tokenizer = tokenizer
        decoder = json.loads(tokenizer.backend_tokenizer.to_str()).get("decoder") or {}
        self.byte_level = "ByteLevel" in json.dumps(decoder)
        self.unicode_to_byte = {c: b for b, c in bytes_to_unicode().items()}
        self.special = set(tokenizer.all_special_ids)

    def __call__(self, token_id: int) -> bytes:
        if token_id in self.special:
            return b""
        piece = self.tokenizer.convert_ids_to_tokens(token_id)
        if self.byte_level:
            return bytes(self.unicode_to_byte[c] for c in piece)
        fallback = _BYTE_FALLBACK.fullmatch(piece)
        if fallback:
            return bytes([int(fallback.group(1), 16)])
        return piece.replace("\u2581", " ").encode()
