"""One request's state inside the engine: what it asked for and what it has produced so far."""

from __future__ import annotations

import asyncio
import itertools
import time
from dataclasses import dataclass, field

import torch

from llava_serve.detok import IncrementalDetokenizer, StopMatcher
from llava_serve.images import PreparedImage
from llava_serve.sampling import SamplingParams, apply_penalties, make_generator, sample_row

_ids = itertools.count()


@dataclass(frozen=True)
class SampledLogprob:
    """A sampled token's log-probability under the model, and the most likely alternatives."""

    token: str
    logprob: float
    top: tuple[tuple[str, float], ...] = ()


@dataclass(frozen=True)
class StepOutput:
    """What one decode step produced for one request; `text` may be empty while held back."""

    token_id: int
    text: str
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int
    logprob: SampledLogprob | None = None


@dataclass(eq=False)
class Sequence:
    input_ids: list[int]
    images: list[PreparedImage]
    params: SamplingParams
    eos_ids: frozenset[int]
    detok: IncrementalDetokenizer
    generator: torch.Generator | None
    outputs: asyncio.Queue = field(default_factory=asyncio.Queue)
    seq_id: int = field(default_factory=lambda: next(_ids))
    generated: list[int] = field(default_factory=list)
    created_at: float = field(default_factory=time.monotonic)
    finished: bool = False
    cancelled: bool = False
    stop: StopMatcher = field(init=False)
    _prompt: torch.Tensor | None = field(default=None, init=False, repr=False)

    def __post_init__(self):
        self.stop = StopMatcher(self.params.stop)

    @classmethod
    def create(cls, input_ids, images, params, tokenizer, eos_ids, device) -> Sequence:
        return cls(
            input_ids=list(input_ids),
            images=list(images),
            params=params,
            eos_ids=frozenset(eos_ids),
            detok=IncrementalDetokenizer.after_prompt(tokenizer, input_ids),
            generator=make_generator(params, device),
        )

    @property
    def kv_budget(self) -> int:
        """Tokens this request may hold in the KV cache at its longest."""
        return len(self.input_ids) + self.params.max_tokens

    @property
    def num_generated(self) -> int:
        return len(self.generated)

    def advance(self, logits: torch.Tensor) -> StepOutput:
        """Sample the next token from this row's logits and turn it into text."""
        scores = logits
        if self.params.penalized:
            scores = apply_penalties(logits, self.params, self._prompt_tensor(logits.device), self.generated)
        token = sample_row(scores, self.params, self.generator)
        self.generated.append(token)
        logprob = self._logprob(logits, token) if self.params.logprobs else None
        eos = token in self.eos_ids
        out_of_room = not eos and self.num_generated >= self.params.max_tokens
        new = self.detok.flush() if eos else self.detok.push(token)
        if out_of_room:
            new += self.detok.flush()
        text, hit = self.stop.feed(new)
        finish = "stop" if hit or eos else "length" if out_of_room else None
        if finish is not None and not hit:
            text += self.stop.flush()
        self.finished = finish is not None
        return StepOutput(token, text, finish, len(self.input_ids), self.num_generated, logprob)

    def _prompt_tensor(self, device: torch.device) -> torch.Tensor:
        """The prompt's ids as a tensor, built once: the repetition penalty reads it every step."""
        if self._prompt is None:
            self._prompt = torch.tensor(self.input_ids, dtype=torch.long, device=device)
        return self._prompt

    def _logprob(self, logits: torch.Tensor, token: int) -> SampledLogprob:
        """From the model's own distribution (before penalties and temperature), as OpenAI reports."""
        logprobs = torch.log_softmax(logits.float(), -1)
        decode = self.detok.tokenizer.decode
        top = ()
        if self.params.top_logprobs:
            values, ids = torch.topk(logprobs, self.params.top_logprobs)
            top = tuple((decode([i]), v) for i, v in zip(ids.tolist(), values.tolist(), strict=True))
        return SampledLogprob(decode([token]), float(logprobs[token]), top)
