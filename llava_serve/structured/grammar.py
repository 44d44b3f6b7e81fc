"""Grammar-constrained decoding with llguidance: compile a format once, mask each step's logits.

llguidance over xgrammar, measured on this project's 2-core CI machine with a 32 000-token
vocabulary (`benchmarks/micro/grammar_mask.py`): a JSON-schema grammar compiles in 12-18 ms against
xgrammar's 119-144 ms, the per-step mask costs about 0.1 ms a row for both, and llguidance has
no dependencies beyond its wheel. A compiled matcher is kept per format (keyed by the schema's
hash) and each request gets a copy, which costs microseconds. Every grammar is built under explicit
parser and lexer limits (`engine.grammar_limits`) and a time limit, with its first token mask, on
the grammar thread before its request joins a batch.
"""

from __future__ import annotations

import json
import threading
from typing import NamedTuple

import llguidance
import llguidance.hf
import llguidance.torch
import torch
from cachetools import LRUCache

from llava_serve.config import GrammarLimits
from llava_serve.errors import EngineError, InvalidRequest
from llava_serve.structured.spec import OutputFormat

# No whitespace between tokens of the JSON: a model (a random-weight one most of all) that may
# put spaces anywhere may also never stop putting them.
JSON_OPTIONS = {"whitespace_flexible": False}


class Grammar:
    """One request's position in its format's grammar."""

    def __init__(
        self,
        matcher: llguidance.LLMatcher,
        first_mask: torch.Tensor | None = None,
        param: str = "response_format",
    ):
        self.matcher = matcher
        self.param = param
        # The mask before any token, computed with the compilation so that the first step a
        # request joins never computes one (for a hard grammar, the slowest mask of all).
        self.first_mask = first_mask

    def copy(self) -> Grammar:
        """An independent matcher at the same position (another answer to the same request)."""
        return Grammar(self.matcher.deep_copy(), self.first_mask, self.param)

    @property
    def done(self) -> bool:
        """Nothing but the end of the answer may follow."""
        return self.matcher.is_stopped()

    def accept(self, token: int) -> None:
        """Advance past `token`, which was sampled under this grammar's own mask: if the grammar
        then refuses it, it ran past its limits on the way (a rule too wide, a lexer too large),
        and the schema that made it so is the caller's."""
        self.first_mask = None
        if not self.matcher.consume_token(token):
            raise self.past_limits() or EngineError(f"the output grammar rejected token {token}")

    def past_limits(self) -> InvalidRequest | None:
        """The request's own error when its grammar has failed (past a limit computing a mask or
        taking a token); a grammar in error allows nothing it could check."""
        if not self.matcher.is_error():
            return None
        return InvalidRequest(
            f"{self.param}: this schema cannot be enforced: {self.matcher.get_error()}", self.param
        )


# What a compiled matcher holds, per character of its grammar, measured over schemas of 1-80 kB
# (27-67 bytes); the constant is what a trivial one holds.
_BYTES_PER_GRAMMAR_CHAR = 64
_MATCHER_BYTES = 64 * 1024


class _Compiled(NamedTuple):
    matcher: llguidance.LLMatcher
    first_mask: torch.Tensor  # [1, words] int32, as MaskBuffer fills them
    weight: int


class GrammarCompiler:
    """Compiles output formats against one tokenizer under `limits`; thread-safe, so compilation
    runs off both the event loop and the model thread."""

    def __init__(
        self, tokenizer, vocab_size: int, eos_ids: list[int], cache_bytes: int, limits: GrammarLimits
    ):
        self.vocab_size = vocab_size
        self._tokenizer = llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab_size, eos_token=eos_ids)
        # verbose_errors off: the parser's state in an error message would echo the schema back.
        self._limits = llguidance.LLParserLimits(**limits.model_dump(), verbose_errors=False)
        self._compiled: LRUCache[str, _Compiled] = LRUCache(maxsize=cache_bytes, getsizeof=lambda c: c.weight)
        # Formats refused for taking too long: refused again at once, not compiled again.
        self._refused: LRUCache[str, str] = LRUCache(maxsize=1024)
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    @property
    def cache_bytes(self) -> int:
        return int(self._compiled.currsize)

    def compile(self, fmt: OutputFormat) -> Grammar:
        """A fresh matcher for `fmt`, its first mask computed; a format the grammar library cannot
        enforce within its limits is an `InvalidRequest` naming what it refused."""
        key = fmt.key
        with self._lock:
            refused = self._refused.get(key)
            compiled = self._compiled.get(key)
            self.hits += compiled is not None
        if refused is not None:
            raise InvalidRequest(refused, fmt.param)
        if compiled is None:
            compiled = self._build(fmt)
            with self._lock:
                self.misses += 1
                if compiled.weight <= self._compiled.maxsize and key not in self._refused:
                    self._compiled[key] = compiled
        return Grammar(compiled.matcher.deep_copy(), compiled.first_mask, fmt.param)

    def refusal(self, fmt: OutputFormat) -> str | None:
        """Why `fmt` was refused before, if it was."""
        with self._lock:
            return self._refused.get(fmt.key)

    def refuse(self, fmt: OutputFormat, message: str) -> None:
        """Remember that `fmt` is refused (it took too long to compile), so it costs nothing next time."""
        with self._lock:
            self._refused[fmt.key] = message
            self._compiled.pop(fmt.key, None)

    def _build(self, fmt: OutputFormat) -> _Compiled:
        param = fmt.param
        try:
            grammar = llguidance.LLMatcher.grammar_from_json_schema(json.loads(fmt.schema_json), JSON_OPTIONS)
        except Exception as e:  # the library's own errors are ValueErrors; a schema is the caller's
            raise InvalidRequest(f"{param}: this schema cannot be enforced: {e}", param) from None
        is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar, limits=self._limits)
        if is_error:
            raise InvalidRequest(f"{param}: this schema cannot be enforced: {'; '.join(messages)}", param)
        matcher = llguidance.LLMatcher(self._tokenizer, grammar, log_level=0, limits=self._limits)
        first_mask = None
        if not matcher.is_error():
            first_mask = llguidance.torch.allocate_token_bitmask(1, self.vocab_size)
            llguidance.torch.fill_next_token_bitmask(matcher, first_mask, 0)
        if matcher.is_error():  # past a limit while compiling, or on its first mask
            raise InvalidRequest(f"{param}: this schema cannot be enforced: {matcher.get_error()}", param)
        # The mask after the tokens the grammar forces (`{"` before an object's first key) is
        # the first real choice, where a wide grammar is widest: computed here, not mid-stream.
        probe = matcher.deep_copy()
        probe.consume_tokens(probe.compute_ff_tokens())
        llguidance.torch.fill_next_token_bitmask(
            probe, llguidance.torch.allocate_token_bitmask(1, self.vocab_size), 0
        )
        if probe.is_error():
            raise InvalidRequest(f"{param}: this schema cannot be enforced: {probe.get_error()}", param)
        return _Compiled(matcher, first_mask, _MATCHER_BYTES + _BYTES_PER_GRAMMAR_CHAR * len(grammar))


class MaskBuffer:
    """Applies the grammars of a step's constrained rows to its logits in one pass."""

    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size
        self._bits = torch.arange(32, dtype=torch.int32)

    def apply(self, logits: torch.Tensor, rows: list[tuple[int, Grammar]]) -> dict[int, InvalidRequest]:
        """Set every token a row's grammar forbids to -inf, in place ([rows, vocab] logits); the
        rows whose grammar ran past its limits come back with their request's error."""
        if not rows:
            return {}
        bitmask = llguidance.torch.allocate_token_bitmask(len(rows), self.vocab_size)
        failed: dict[int, InvalidRequest] = {}
        for i, (row, grammar) in enumerate(rows):
            if grammar.first_mask is not None:
                bitmask[i] = grammar.first_mask[0]
            else:
                llguidance.torch.fill_next_token_bitmask(grammar.matcher, bitmask, i)
                if (error := grammar.past_limits()) is not None:
                    failed[row] = error
        allowed = (bitmask.unsqueeze(-1) >> self._bits).bitwise_and_(1).bool().flatten(1)
        index = torch.tensor([row for row, _ in rows], device=logits.device)
        allowed = allowed[:, : logits.shape[-1]].to(logits.device, non_blocking=True)
        with torch.inference_mode():  # the model's logits are inference tensors
            logits[index] = logits[index].masked_fill(~allowed, float("-inf"))
        return failed
