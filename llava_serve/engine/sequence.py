"""One request's state inside the engine: what it asked for and the tokens it has produced.

This is the token-level state the model thread keeps: the grammar, the generated ids and whether
the answer ended by a token (end-of-sequence, a stop token, a complete grammar, `max_tokens`).
Text, stop strings and logprob formatting are the output processor's (`engine.output`), on its
own thread.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from dataclasses import dataclass, field

import torch

from llava_serve.engine.prefix import Entry
from llava_serve.engine.sampling import SamplingParams, apply_logit_bias, apply_penalties, make_generator
from llava_serve.structured.grammar import Grammar
from llava_serve.types import PreparedImage

_ids = itertools.count()


@dataclass(frozen=True)
class TokenEvent:
    """One sampled token of one request, as the model thread leaves it for the output processor."""

    token: int
    # Why the answer ends with this token, if it does: "eos", "stop_token", "complete" (the
    # grammar allows nothing more) or "length".
    end: str | None
    may_end: bool  # past min_tokens: stop strings count from here
    completion_tokens: int
    logprob: object | None = None  # `sampler.RowLogprobs` when asked for
    stages: dict[str, float] | None = None  # on the first token only
    cached_tokens: int = 0


@dataclass(eq=False)
class Sequence:
    input_ids: list[int]
    images: list[PreparedImage]
    params: SamplingParams
    eos_ids: frozenset[int]
    generator: torch.Generator | None
    outputs: asyncio.Queue = field(default_factory=asyncio.Queue)
    seq_id: int = field(default_factory=lambda: next(_ids))
    generated: list[int] = field(default_factory=list)
    created_at: float = field(default_factory=time.monotonic)
    finished: bool = False  # by a token, a stop string (the output processor), or a failure
    failed: bool = False
    cancelled: bool = False
    stages: dict[str, float] = field(default_factory=dict)
    # Present when the answer must match a format; the sampler masks this row's logits with it.
    grammar: Grammar | None = None
    # The KV slot it holds once started, the prompt's embeddings while it is written (computed
    # once, chunks are slices of them) and how many positions the slot holds so far.
    slot: int | None = None
    embeds: torch.Tensor | None = field(default=None, repr=False)
    prefilled: int = 0
    joined: bool = False  # its prompt is whole and it decodes with the batch
    prefix_key: tuple | None = field(default=None, repr=False)  # see `engine.prefix`
    # The prefix cache's longest match for its prompt, found before it starts (None: a miss).
    hit: tuple[Entry, int] | None = field(default=None, repr=False)
    matched: bool = False
    route_blocks: tuple[int, ...] = field(default=(), repr=False)  # its prompt's, for the router
    cached_tokens: int = 0  # prompt positions copied from the prefix cache
    # A request for `n` answers is `n` sequences: the first computes the prompt, and when its
    # prompt is whole each other one (`forks`) copies its KV and samples from the same logits.
    index: int = 0
    forks: list[Sequence] = field(default_factory=list, repr=False)
    fork_of: Sequence | None = field(default=None, repr=False)
    text: object = field(default=None, repr=False)  # `output.RequestText`, the output thread's
    _prompt: torch.Tensor | None = field(default=None, init=False, repr=False)

    @classmethod
    def create(
        cls, input_ids, images, params, eos_ids, device, grammar: Grammar | None = None, index: int = 0
    ) -> Sequence:
        return cls(
            input_ids=list(input_ids),
            images=list(images),
            params=params,
            eos_ids=frozenset(eos_ids),
            generator=make_generator(params, device),
            grammar=grammar,
            index=index,
        )

    def fork(self, index: int, device) -> Sequence:
        """Choice `index` of this request: the same prompt, its own seed and grammar state."""
        fork = Sequence.create(
            self.input_ids,
            self.images,
            self.params.for_choice(index),
            self.eos_ids,
            device,
            None if self.grammar is None else self.grammar.copy(),
            index,
        )
        fork.fork_of = self
        fork.outputs = self.outputs  # one stream carries every choice
        return fork

    # -- what the scheduler reads (`scheduler.Request`) ---------------------------------------

    @property
    def started(self) -> bool:
        return self.slot is not None

    @property
    def is_choice(self) -> bool:
        return self.fork_of is not None

    @property
    def group(self) -> list[Sequence]:
        """This request's sequences: itself and its forks."""
        return [self, *self.forks]

    @property
    def rows(self) -> int:
        return len(self.group)

    @property
    def kv_budget(self) -> int:
        """Tokens this request may hold in the KV cache at its longest."""
        return len(self.input_ids) + self.params.max_tokens

    @property
    def prompt_left(self) -> int:
        """Prompt positions not yet in its KV slot (before it starts: past its cached prefix)."""
        done = self.prefilled if self.started or self.hit is None else self.hit[1]
        return len(self.input_ids) - done

    @property
    def tiles(self) -> int:
        """Tiles (or video frames) its images send through the vision tower."""
        return sum(image.pixel_values.shape[0] for image in self.images)

    @property
    def num_generated(self) -> int:
        return len(self.generated)

    # -- sampling ----------------------------------------------------------------------------

    @property
    def adjusts(self) -> bool:
        """Its logits are changed before sampling (penalties, logit bias, min_tokens)."""
        p = self.params
        return p.penalized or bool(p.logit_bias) or self.num_generated < p.min_tokens

    def scores(self, logits: torch.Tensor) -> torch.Tensor:
        """This row's logits with its penalties and logit bias applied, and its end tokens held
        off before min_tokens. A constrained row's logits come already masked by its grammar."""
        scores = logits.float()
        if self.params.penalized:
            scores = apply_penalties(scores, self.params, self._prompt_tensor(logits.device), self.generated)
        if self.params.logit_bias:
            scores = apply_logit_bias(scores, self.params.logit_bias)
        if self.num_generated < self.params.min_tokens:  # nothing may end the answer yet
            ends = [*self.eos_ids, *self.params.stop_token_ids]
            scores = scores.index_fill(
                0, torch.tensor(ends, dtype=torch.long, device=scores.device), float("-inf")
            )
        return scores

    def accept(self, token: int, logprob=None) -> TokenEvent:
        """Take the sampled token: advance the grammar and see whether the answer ends with it.

        Everything that can fail before this (masks, penalties, sampling) ran before any state
        changed, so a failure there leaves the request exactly as it was."""
        if self.grammar is not None:
            self.grammar.accept(token)
        self.generated.append(token)
        params = self.params
        may_end = self.num_generated >= params.min_tokens
        end = None
        if may_end and not params.ignore_eos and token in self.eos_ids:
            end = "eos"
        elif may_end and token in params.stop_token_ids:
            end = "stop_token"
        elif self.grammar is not None and self.grammar.done:
            end = "complete"
        elif self.num_generated >= params.max_tokens:
            end = "length"
        self.finished = end is not None
        first = self.num_generated == 1
        return TokenEvent(
            token,
            end,
            may_end,
            self.num_generated,
            logprob,
            dict(self.stages) if first else None,
            self.cached_tokens,
        )

    def _prompt_tensor(self, device: torch.device) -> torch.Tensor:
        """The prompt's ids as a tensor, built once: the repetition penalty reads it every step."""
        if self._prompt is None:
            self._prompt = torch.tensor(self.input_ids, dtype=torch.long, device=device)
        return self._prompt
