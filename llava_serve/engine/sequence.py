"""One request's state inside the engine: what it asked for and what it has produced so far."""

from __future__ import annotations

import asyncio
import itertools
import time
from dataclasses import dataclass, field

import torch

from llava_serve.engine.detok import IncrementalDetokenizer, StopMatcher, TokenBytes
from llava_serve.engine.sampling import (
    SamplingParams,
    apply_logit_bias,
    apply_penalties,
    make_generator,
    sample_row,
)
from llava_serve.structured.grammar import Grammar
from llava_serve.types import PreparedImage, SampledLogprob, StepOutput

_ids = itertools.count()


@dataclass(eq=False)
class Sequence:
    input_ids: list[int]
    images: list[PreparedImage]
    params: SamplingParams
    eos_ids: frozenset[int]
    detok: IncrementalDetokenizer
    generator: torch.Generator | None
    token_bytes: TokenBytes
    outputs: asyncio.Queue = field(default_factory=asyncio.Queue)
    seq_id: int = field(default_factory=lambda: next(_ids))
    generated: list[int] = field(default_factory=list)
    created_at: float = field(default_factory=time.monotonic)
    finished: bool = False
    cancelled: bool = False
    stages: dict[str, float] = field(default_factory=dict)
    # Present when the answer must match a format; the engine masks this row's logits with it.
    grammar: Grammar | None = None
    # While its prompt is written: the KV slot it holds, the prompt's embeddings (computed
    # once, chunks are slices of them) and how many positions the slot holds so far.
    slot: int | None = None
    embeds: torch.Tensor | None = field(default=None, repr=False)
    prefilled: int = 0
    joined: bool = False  # its prompt is whole and it decodes with the batch
    prefix_key: tuple | None = field(default=None, repr=False)  # see `engine.prefix`
    route_blocks: tuple[int, ...] = field(default=(), repr=False)  # its prompt's, for the router
    cached_tokens: int = 0  # prompt positions copied from the prefix cache
    # A request for `n` answers is `n` sequences: the first computes the prompt, and when its
    # prompt is whole each other one (`forks`) copies its KV and samples from the same logits.
    index: int = 0
    forks: list[Sequence] = field(default_factory=list, repr=False)
    fork_of: Sequence | None = field(default=None, repr=False)
    stop: StopMatcher = field(init=False)
    _prompt: torch.Tensor | None = field(default=None, init=False, repr=False)

    def __post_init__(self):
        self.stop = StopMatcher(self.params.stop, self.params.include_stop_str_in_output)

    @classmethod
    def create(
        cls,
        input_ids,
        images,
        params,
        token_bytes: TokenBytes,
        eos_ids,
        device,
        grammar: Grammar | None = None,
        index: int = 0,
    ) -> Sequence:
        tokenizer = token_bytes.tokenizer
        return cls(
            input_ids=list(input_ids),
            images=list(images),
            params=params,
            eos_ids=frozenset(eos_ids),
            detok=IncrementalDetokenizer.after_prompt(tokenizer, input_ids, params.skip_special_tokens),
            generator=make_generator(params, device),
            token_bytes=token_bytes,
            grammar=grammar,
            index=index,
        )

    def fork(self, index: int, token_bytes: TokenBytes, device) -> Sequence:
        """Choice `index` of this request: the same prompt, its own seed and grammar state."""
        fork = Sequence.create(
            self.input_ids,
            self.images,
            self.params.for_choice(index),
            token_bytes,
            self.eos_ids,
            device,
            None if self.grammar is None else self.grammar.copy(),
            index,
        )
        fork.fork_of = self
        fork.outputs = self.outputs  # one stream carries every choice
        return fork

    @property
    def group(self) -> list[Sequence]:
        """This request's sequences: itself and its forks."""
        return [self, *self.forks]

    @property
    def kv_budget(self) -> int:
        """Tokens this request may hold in the KV cache at its longest."""
        return len(self.input_ids) + self.params.max_tokens

    @property
    def prompt_left(self) -> int:
        """Prompt positions not yet in its KV slot."""
        return len(self.input_ids) - self.prefilled

    @property
    def num_generated(self) -> int:
        return len(self.generated)

    def advance(self, logits: torch.Tensor) -> StepOutput:
        """Sample the next token from this row's logits and take it (one row; the engine samples
        a step's rows together: `scores`, `sample_batch`, `accept`)."""
        return self.accept(sample_row(self.scores(logits), self.params, self.generator), logits)

    def scores(self, logits: torch.Tensor) -> torch.Tensor:
        """This row's logits with its penalties and logit bias applied (the logits themselves
        when it has none). A constrained row's logits come already masked by its grammar."""
        scores = logits
        if self.params.penalized:
            scores = apply_penalties(logits, self.params, self._prompt_tensor(logits.device), self.generated)
        if self.params.logit_bias:
            scores = apply_logit_bias(scores, self.params.logit_bias)
        if self.num_generated < self.params.min_tokens:  # nothing may end the answer yet
            ends = [*self.eos_ids, *self.params.stop_token_ids]
            scores = scores.index_fill(
                0, torch.tensor(ends, dtype=torch.long, device=scores.device), float("-inf")
            )
        return scores

    def accept(self, token: int, logits: torch.Tensor) -> StepOutput:
        """Take the sampled token: advance the grammar, the text and the stop matching.

        Everything that can fail before this (penalties, sampling) ran before any state changed,
        so a failure there leaves the request exactly as it was."""
        if self.grammar is not None:
            self.grammar.accept(token)
        self.generated.append(token)
        params = self.params
        may_end = self.num_generated >= params.min_tokens
        eos = may_end and not params.ignore_eos and token in self.eos_ids
        # A stop token ends the answer as end-of-sequence does; its text stays out unless asked for.
        stop_token = may_end and not eos and token in params.stop_token_ids
        # A complete grammar allows nothing more: the answer ends with this token.
        complete = not (eos or stop_token) and self.grammar is not None and self.grammar.done
        ends = eos or stop_token or complete
        out_of_room = not ends and self.num_generated >= params.max_tokens
        if eos or (stop_token and not params.include_stop_str_in_output):
            new = self.detok.flush()
        else:
            new = self.detok.push(token)
        if out_of_room or complete or stop_token:
            new += self.detok.flush()
        logprob = self._logprob(logits, token, new) if params.logprobs else None
        if may_end:
            text, hit = self.stop.feed(new)
        else:  # vLLM's min_tokens: no stop string counts before it
            text, hit = new, False
        finish = "stop" if hit or ends else "length" if out_of_room else None
        if finish is not None and not hit:
            text += self.stop.flush()
        self.finished = finish is not None
        logprobs = () if logprob is None else (logprob,)
        stages = self.stages if self.num_generated == 1 else None
        return StepOutput(
            (token,),
            text,
            finish,
            len(self.input_ids),
            self.num_generated,
            logprobs,
            stages,
            self.index,
            self.cached_tokens,
        )

    def _prompt_tensor(self, device: torch.device) -> torch.Tensor:
        """The prompt's ids as a tensor, built once: the repetition penalty reads it every step."""
        if self._prompt is None:
            self._prompt = torch.tensor(self.input_ids, dtype=torch.long, device=device)
        return self._prompt

    def _logprob(self, logits: torch.Tensor, token: int, text: str) -> SampledLogprob:
        """From the model's own distribution (before penalties and temperature), as OpenAI reports."""
        logprobs = torch.log_softmax(logits.float(), -1)
        decode = self.detok.tokenizer.decode
        top = ()
        if self.params.top_logprobs:
            values, ids = torch.topk(logprobs, self.params.top_logprobs)
            pairs = zip(ids.tolist(), values.tolist(), strict=True)
            # Under a grammar, fewer tokens than asked for may be possible at all.
            top = tuple((decode([i]), self.token_bytes(i), v) for i, v in pairs if v > float("-inf"))
        return SampledLogprob(text, self.token_bytes(token), float(logprobs[token]), top)
