"""Per-request sampling parameters and the sampler that applies them row by row in a batch."""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass, field, replace

import torch

from llava_serve.config import GenerationConfig
from llava_serve.errors import InvalidRequest
from llava_serve.structured.spec import OutputFormat
from llava_serve.types import GREEDY_BELOW


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
    # vLLM's extensions, with vLLM's meanings.
    min_p: float = 0.0  # drop tokens less likely than min_p x the most likely one
    ignore_eos: bool = False  # end-of-sequence does not end the answer; it runs to max_tokens
    min_tokens: int = 0  # neither end-of-sequence, stop_token_ids nor stop strings end it sooner
    stop_token_ids: tuple[int, ...] = ()  # these tokens end the answer as end-of-sequence does
    include_stop_str_in_output: bool = False  # the stop string or token that ended it stays in the text
    skip_special_tokens: bool = True  # special tokens the model writes are left out of the text
    n: int = 1  # answers to the same prompt, sharing its prefill

    def for_choice(self, index: int) -> SamplingParams:
        """The parameters of choice `index` of `n`: its own seed, derived from the request's, so a
        seeded request's choices differ from each other and each repeats run to run."""
        if index == 0 or self.seed is None:
            return self
        digest = hashlib.blake2b(f"{self.seed}:{index}".encode(), digest_size=8).digest()
        return replace(self, seed=int.from_bytes(digest) >> 1)

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
        min_p: float | None = None,
        ignore_eos: bool | None = None,
        min_tokens: int | None = None,
        stop_token_ids: list[int] | tuple[int, ...] = (),
        include_stop_str_in_output: bool | None = None,
        skip_special_tokens: bool | None = None,
        n: int | None = None,
    ) -> SamplingParams:
        """Fill what the request left out from config defaults, and enforce the ceilings."""
        max_tokens = defaults.max_tokens if max_tokens is None else max_tokens
        if max_tokens > defaults.max_tokens_limit:
            raise InvalidRequest(
                f"max_tokens is {max_tokens}, over this server's limit of {defaults.max_tokens_limit}",
                "max_tokens",
            )
        if (min_tokens or 0) > max_tokens:
            raise InvalidRequest(
                f"min_tokens ({min_tokens}) is more than max_tokens ({max_tokens})", "min_tokens"
            )
        n = n or 1
        if n > defaults.max_n:
            raise InvalidRequest(
                f"n is {n}, over this server's limit of {defaults.max_n} (generation.max_n)", "n"
            )
        return cls(
            n=n,
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
            min_p=min_p or 0.0,
            ignore_eos=bool(ignore_eos),
            min_tokens=min_tokens or 0,
            stop_token_ids=tuple(stop_token_ids),
            include_stop_str_in_output=bool(include_stop_str_in_output),
            skip_special_tokens=True if skip_special_tokens is None else skip_special_tokens,
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
    """Pick the next token from one row of logits ([vocab]); refuses NaN (no distribution)."""
    if torch.isnan(logits).any():
        raise RuntimeError("cannot sample from NaN logits")
    return int(sample_batch(logits[None], [params], [generator])[0])


def sample_batch(
    logits: torch.Tensor,
    params: list[SamplingParams],
    generators: list[torch.Generator | None],
    greedy: torch.Tensor | None = None,
) -> torch.Tensor:
    """The next token of every row of `logits` [rows, vocab], as HF's warpers would pick them
    (temperature, then top-k, top-p and min-p), in a few batched operations; stays on the device, so
    a step reads all its tokens back in one copy.

    Sampled rows draw with the Gumbel-max trick, argmax(probs / E) with E ~ Exp(1) drawn from the
    row's own generator: the same distribution as `multinomial`, but one batched argmax for all
    rows, and a seeded row draws the same whatever shares its batch. `greedy`: `logits.argmax(-1)`
    when the caller has it already."""
    tokens = logits.argmax(-1) if greedy is None else greedy
    sampled = [i for i, p in enumerate(params) if not p.greedy]
    if not sampled:
        return tokens
    device = logits.device
    chosen = [params[i] for i in sampled]
    index = torch.tensor(sampled, device=device)
    temperature = torch.tensor([p.temperature for p in chosen], device=device)
    x = logits[index].float() / temperature[:, None]
    vocab = x.shape[-1]
    if any(p.top_k > 0 for p in chosen):
        k = torch.tensor([min(p.top_k, vocab) if p.top_k > 0 else vocab for p in chosen], device=device)
        kth = torch.topk(x, int(k.max()), dim=-1).values.gather(-1, (k - 1)[:, None])
        x = x.masked_fill(x < kth, float("-inf"))
    if any(p.top_p < 1.0 for p in chosen):
        top_p = torch.tensor([p.top_p for p in chosen], device=device)
        ordered, order = torch.sort(x, descending=True)
        probs = ordered.softmax(-1)
        # Drop tokens once the mass before them already reaches top_p; the first always stays
        # (a top_p that rounds to 0 in float32 would otherwise drop it too).
        drop = probs.cumsum(-1) - probs >= top_p[:, None]
        drop[:, 0] = False
        x = x.scatter(-1, order, ordered.masked_fill(drop, float("-inf")))
    if any(p.min_p > 0.0 for p in chosen):  # as transformers' MinPLogitsWarper, after top-p
        min_p = torch.tensor([p.min_p for p in chosen], device=device)
        probs = x.softmax(-1)
        x = x.masked_fill(probs < min_p[:, None] * probs.max(-1, keepdim=True).values, float("-inf"))
    noise = torch.stack(
        [torch.empty(vocab, device=device).exponential_(generator=generators[i]) for i in sampled]
    )
    tokens[index] = (x.softmax(-1) / noise).argmax(-1)
    return tokens
