"""The sampler and penalties, row by row, against transformers' own processors."""

import pytest
import torch
from transformers import RepetitionPenaltyLogitsProcessor, TopKLogitsWarper, TopPLogitsWarper

from llava_serve.config import GenerationConfig
from llava_serve.engine.sampling import SamplingParams, apply_penalties, make_generator, sample_row
from llava_serve.errors import InvalidRequest
from llava_serve.types import GREEDY_BELOW

VOCAB = 200


@pytest.fixture
def logits() -> torch.Tensor:
    return torch.randn(VOCAB, generator=torch.Generator().manual_seed(0)) * 3


def draws(logits: torch.Tensor, params: SamplingParams, n: int = 300) -> set[int]:
    generator = make_generator(params, torch.device("cpu"))
    return {sample_row(logits, params, generator) for _ in range(n)}


def test_greedy_picks_the_argmax_and_needs_no_generator(logits):
    for temperature in (0.0, GREEDY_BELOW / 2):
        params = SamplingParams(max_tokens=1, temperature=temperature)
        assert params.greedy and make_generator(params, torch.device("cpu")) is None
        assert sample_row(logits, params, None) == int(logits.argmax())


@pytest.mark.parametrize("top_k", [1, 5, 40])
def test_top_k_samples_only_what_transformers_keeps(logits, top_k):
    kept = TopKLogitsWarper(top_k)(None, logits[None].clone())[0].isfinite().nonzero().flatten().tolist()
    got = draws(logits, SamplingParams(max_tokens=1, temperature=1.5, top_k=top_k, seed=1))
    assert got <= set(kept) and len(got) >= min(top_k, 3)


@pytest.mark.parametrize("top_p", [5e-324, 1e-9, 0.3, 0.9])
def test_top_p_samples_only_what_transformers_keeps(logits, top_p):
    kept = TopPLogitsWarper(top_p)(None, logits[None].clone())[0].isfinite().nonzero().flatten().tolist()
    got = draws(logits, SamplingParams(max_tokens=1, temperature=1.0, top_p=top_p, seed=2))
    assert got <= set(kept)
    assert got == set(kept) if len(kept) <= 3 else len(got) > 1


def test_a_seed_reproduces_the_draws_and_another_seed_does_not(logits):
    def run(seed: int) -> list[int]:
        params = SamplingParams(max_tokens=1, temperature=1.0, seed=seed)
        generator = make_generator(params, torch.device("cpu"))
        return [sample_row(logits, params, generator) for _ in range(32)]

    assert run(7) == run(7)
    assert run(7) != run(8)


@pytest.mark.parametrize("seed", [0, 2**64 - 1, -(2**63)])
def test_seeds_at_the_limits_the_api_accepts_work(logits, seed):
    params = SamplingParams(max_tokens=1, temperature=1.0, seed=seed)
    assert 0 <= sample_row(logits, params, make_generator(params, torch.device("cpu"))) < VOCAB


def test_repetition_penalty_equals_transformers(logits):
    prompt, generated = torch.tensor([3, 4, 5, 4]), [7, 3, 9]
    params = SamplingParams(max_tokens=1, repetition_penalty=1.7)
    expected = RepetitionPenaltyLogitsProcessor(1.7)(
        torch.cat([prompt, torch.tensor(generated)])[None], logits[None].clone()
    )[0]
    assert torch.allclose(apply_penalties(logits, params, prompt, generated), expected)


def test_presence_and_frequency_penalties_follow_openai(logits):
    generated = [7, 7, 9, 7]
    params = SamplingParams(max_tokens=1, presence_penalty=0.5, frequency_penalty=0.25)
    got = apply_penalties(logits, params, torch.tensor([7, 8]), generated)
    expected = logits.clone()
    expected[7] -= 3 * 0.25 + 0.5
    expected[9] -= 1 * 0.25 + 0.5
    assert torch.allclose(got, expected)  # the prompt (token 8) is not penalised


def test_resolve_fills_defaults_and_enforces_the_ceiling():
    defaults = GenerationConfig(max_tokens=20, max_tokens_limit=100, temperature=0.7, top_k=5)
    params = SamplingParams.resolve(defaults, temperature=None, stop=["x"])
    assert (params.max_tokens, params.temperature, params.top_k, params.stop) == (20, 0.7, 5, ("x",))
    with pytest.raises(InvalidRequest, match="limit of 100") as info:
        SamplingParams.resolve(defaults, max_tokens=101)
    assert info.value.param == "max_tokens"


def test_a_batch_samples_each_row_as_it_would_alone():
    """Greedy, top-k, top-p and plain rows with their own seeds in one batch: each row's draws
    equal the same row sampled alone with a generator of the same seed."""
    from llava_serve.engine.sampling import sample_batch

    rows = torch.randn(4, VOCAB, generator=torch.Generator().manual_seed(1)) * 3
    params = [
        SamplingParams(8, temperature=0.0),
        SamplingParams(8, temperature=0.8, top_k=5, seed=11),
        SamplingParams(8, temperature=1.2, top_p=0.5, seed=12),
        SamplingParams(8, temperature=1.0, seed=13),
    ]
    batch_gens = [make_generator(p, torch.device("cpu")) for p in params]
    solo_gens = [make_generator(p, torch.device("cpu")) for p in params]
    for _ in range(20):
        together = sample_batch(rows, params, batch_gens).tolist()
        alone = [sample_row(r, p, g) for r, p, g in zip(rows, params, solo_gens, strict=True)]
        assert together == alone
    assert together[0] == int(rows[0].argmax())


def test_the_gumbel_draw_follows_the_softmax():
    """20 000 draws over 4 tokens: each token's frequency within 0.02 of its probability."""
    from llava_serve.engine.sampling import sample_batch

    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    params = [SamplingParams(1, temperature=1.0, seed=5)]
    generator = [make_generator(params[0], torch.device("cpu"))]
    counts = torch.bincount(
        torch.tensor([int(sample_batch(logits, params, generator)[0]) for _ in range(20000)]), minlength=4
    )
    assert torch.allclose(counts / 20000, logits[0].softmax(-1), atol=0.02)


@pytest.mark.parametrize("min_p", [0.05, 0.3])
def test_min_p_samples_only_what_transformers_keeps(logits, min_p):
    from transformers import MinPLogitsWarper

    warped = MinPLogitsWarper(min_p)(None, (logits / 1.5)[None].clone())[0]
    kept = set(warped.isfinite().nonzero().flatten().tolist())
    got = draws(logits, SamplingParams(max_tokens=1, temperature=1.5, min_p=min_p, seed=2))
    assert got <= kept and len(got) >= min(len(kept), 2)


def test_min_tokens_past_max_tokens_is_refused_naming_it():
    with pytest.raises(InvalidRequest) as info:
        SamplingParams.resolve(GenerationConfig(), max_tokens=4, min_tokens=5)
    assert info.value.param == "min_tokens"
