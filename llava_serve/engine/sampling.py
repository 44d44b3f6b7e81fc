"""Per-request sampling parameters and the sampler that applies them row by row in a batch."""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import torch

from llava_serve.config import GenerationConfig
from llava_serve.errors import InvalidRequest
from llava_serve.protocol import GREEDY_BELOW
from llava_serve.structured.spec import OutputFormat


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = field(default_factory=tuple)
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logprobs: bool = False
    top_logprobs: int = 0
    logit_bias: tuple[tuple[int, float], ...] = ()
    # The format the answer must match (a JSON schema, a tool call), enforced by a grammar.
    output: OutputFormat | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW

    @property
    def penalized(self) -> bool:
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1.0)

    @classmethod
    def resolve(
        cls,
        defaults: GenerationConfig,
        *,
        max_tokens: int | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        top_k: int | None = None,
        seed: int | None = None,
        stop: list[str] | tuple[str, ...] = (),
        presence_penalty: float | None = None,
        frequency_penalty: float | None = None,
        repetition_penalty: float | None = None,
        logprobs: bool | None = None,
        top_logprobs: int | None = None,
        logit_bias: dict[str, float] | None = None,
        output: OutputFormat | None = None,
    ) -> SamplingParams:
        """Fill what the request left out from config defaults, and enforce the ceilings."""
        max_tokens = defaults.max_tokens if max_tokens is None else max_tokens
        if max_tokens > defaults.max_tokens_limit:
            raise InvalidRequest(
                f"max_tokens is {max_tokens}, over this server's limit of {defaults.max_tokens_limit}",
                "max_tokens",
            )
        return cls(
            max_tokens=max_tokens,
            temperature=defaults.temperature if temperature is None else temperature,
            top_p=defaults.top_p if top_p is None else top_p,
            top_k=defaults.top_k if top_k is None else top_k,
            seed=seed,
            stop=tuple(stop),
            presence_penalty=presence_penalty or 0.0,
            frequency_penalty=frequency_penalty or 0.0,
            repetition_penalty=1.0 if repetition_penalty is None else repetition_penalty,
            logprobs=bool(logprobs),
            top_logprobs=top_logprobs or 0,
            logit_bias=tuple((int(k), float(v)) for k, v in (logit_bias or {}).items()),
            output=output,
        )


def make_generator(params: SamplingParams, device: torch.device) -> torch.Generator | None:
    """A private RNG per request, so a seeded request samples the same whatever shares its batch."""
    if params.greedy:
        return None
    g = torch.Generator(device=device)
    g.manual_seed(params.seed if params.seed is not None else random.getrandbits(63))
    return g


def apply_penalties(
    logits: torch.Tensor, params: SamplingParams, prompt_ids: torch.Tensor, generated: list[int]
) -> torch.Tensor:
    """One row of logits with the repetition (HF: prompt and output, multiplicative) and the
    presence/frequency (OpenAI: output only, additive) penalties applied."""
    logits = logits.float().clone()
    out = torch.tensor(generated, dtype=torch.long, device=logits.device)
    if params.repetition_penalty != 1.0:
        seen = torch.cat([prompt_ids, out]).unique()
        scores = logits[seen]
        penalty = params.repetition_penalty
        logits[seen] = torch.where(scores < 0, scores * penalty, scores / penalty)
    if (params.presence_penalty or params.frequency_penalty) and generated:
        ids, counts = out.unique(return_counts=True)
        logits[ids] -= params.frequency_penalty * counts + params.presence_penalty
    return logits


def apply_logit_bias(logits: torch.Tensor, bias: tuple[tuple[int, float], ...]) -> torch.Tensor:
    """One row of logits with OpenAI's `logit_bias` added (a token a grammar forbids stays -inf)."""
    ids = torch.tensor([i for i, _ in bias], dtype=torch.long, device=logits.device)
    values = torch.tensor([b for _, b in bias], dtype=torch.float32, device=logits.device)
    return logits.float().index_add(0, ids, values)


def sample_row(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    """Pick the next token from one row of logits ([vocab]), as HF's warpers would."""
    if params.greedy:
        return int(torch.argmax(logits))
    logits = logits.float() / params.temperature
    if params.top_k > 0:
        kth = torch.topk(logits, min(params.top_k, logits.numel())).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        # Drop tokens once the mass before them already reaches top_p; the first always stays
        # (a top_p that rounds to 0 in float32 would otherwise drop it too).
        drop = cumulative - sorted_logits.softmax(-1) >= params.top_p
        drop[0] = False
        logits = logits.scatter(0, order, sorted_logits.masked_fill(drop, float("-inf")))
    probs = logits.softmax(-1)
    return int(torch.multinomial(probs, 1, generator=generator))
