"""The runner: the installed transformers takes what it passes, rows join and leave correctly,
and image features must fit their slots."""

import inspect

import pytest
import torch
from transformers import LlavaForConditionalGeneration

from llava_serve import images
from llava_serve.config import ImageConfig
from llava_serve.errors import InvalidRequest
from llava_serve.runner import ModelRunner
from tests.conftest import encode, random_image

# Every keyword the runner passes to the model's forward.
FORWARD_ARGS = {"input_ids", "inputs_embeds", "attention_mask", "position_ids", "cache", "logits_to_keep"}


def test_installed_transformers_forward_takes_what_the_runner_passes():
    params = set(inspect.signature(LlavaForConditionalGeneration.forward).parameters)
    missing = FORWARD_ARGS - params
    assert not missing, f"transformers' LlavaForConditionalGeneration.forward lacks {missing}: check the pin"


@pytest.fixture
def runner(hf_model):
    return ModelRunner(hf_model, 1 << 20)


def prefill(runner, seq_ids: list[int], lengths: list[int]) -> torch.Tensor:
    prompts = [(list(range(10, 10 + n)), []) for n in lengths]
    logits = runner.prefill(seq_ids, prompts)
    runner.commit(logits.argmax(-1).tolist())
    return logits


def solo_logits(runner, length: int, steps: int) -> list[torch.Tensor]:
    """Logits of `steps` greedy decode steps of one prompt, run alone."""
    alone = ModelRunner(runner.model, 0)
    out = [prefill(alone, [0], [length])[0]]
    for _ in range(steps):
        logits = alone.decode()
        alone.set_last_tokens(logits.argmax(-1).tolist())
        out.append(logits[0])
    return out


def test_rows_joining_a_running_batch_compute_what_they_would_alone(runner):
    prefill(runner, [1, 2], [5, 9])
    runner.decode()  # the first rows are a step ahead of the newcomer
    runner.set_last_tokens(runner.batch.last_tokens.tolist())
    prefill(runner, [3], [3])
    assert runner.batch.seq_ids == [1, 2, 3]
    assert runner.batch.mask.shape == (3, 10)  # the longest row: 9 prompt + 1 decoded
    assert runner.batch.mask.sum(-1).tolist() == [6, 10, 3]
    logits = runner.decode()
    expected = solo_logits(runner, 3, 1)[1]
    assert torch.allclose(logits[2], expected, atol=1e-4)


def test_keep_drops_rows_and_trims_padding_no_row_needs(runner):
    prefill(runner, [1, 2, 3], [4, 12, 6])
    before = runner.batch.cache.layers[0].keys
    runner.keep({1, 2, 3})
    assert runner.batch.cache.layers[0].keys is before  # nothing leaves: no copy
    runner.keep({1, 3})
    assert runner.batch.seq_ids == [1, 3]
    assert runner.batch.mask.shape == (2, 6)  # row 2's columns are gone
    assert runner.batch.cache.layers[0].keys.shape[0] == 2 and runner.batch.cache.layers[0].keys.shape[2] == 6
    runner.keep(set())
    assert runner.batch is None and runner.num_rows == 0


def test_a_failed_merge_leaves_the_batch_as_it_was(runner):
    prefill(runner, [1], [4])
    runner.prefill([2], [(list(range(10, 16)), [])])
    runner._staged.cache.layers.pop()  # a staged batch that cannot be merged
    with pytest.raises(ValueError):
        runner.commit([5])
    assert runner.batch.seq_ids == [1] and runner.batch.mask.shape == (1, 4)
    assert all(layer.keys.shape[2] == 4 for layer in runner.batch.cache.layers)


def test_image_features_must_fill_the_image_slots_exactly(runner, adapter):
    image = images.prepare(encode(random_image(1)), adapter, ImageConfig())
    slot = runner.image_token_id
    with pytest.raises(InvalidRequest, match="image positions"):
        runner.prefill([1], [([3, slot, slot, 4], [image])])
    with pytest.raises(InvalidRequest, match="0 feature rows"):
        runner.prefill([1], [([3, slot, 4], [])])
