"""The step decoder: the LLaVA family's language models through it compute what transformers'
own forward computes, a prompt chunk and then a decode row; other decoders are left to
transformers."""

import copy

import pytest
import torch
from transformers import (
    GemmaConfig,
    GemmaModel,
    LlamaConfig,
    LlamaModel,
    MistralConfig,
    MistralModel,
    Qwen2Config,
    Qwen2Model,
)

from llava_serve.engine import kernels
from llava_serve.engine.attention import Segment, StepLayout
from llava_serve.engine.decoder import StepDecoder
from llava_serve.engine.kv import KVManager, WritePlan
from llava_serve.engine.norms import fuse_norms
from llava_serve.engine.packed import pack_decoder

SIZES = {
    "vocab_size": 128,
    "hidden_size": 64,
    "intermediate_size": 96,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
}
FAMILY = [(LlamaConfig, LlamaModel), (MistralConfig, MistralModel), (Qwen2Config, Qwen2Model)]


def _engine_copy(decoder):
    """Packed as the engine packs it: on this CPU's kernels (float32 panels, bfloat16 tiles) where
    it has them."""
    mine = copy.deepcopy(decoder)
    pack_decoder(mine, kernels.load())
    fuse_norms(mine)
    return mine


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("config", "model"), FAMILY)
def test_a_chunk_and_a_decode_row_compute_transformers_forward(config, model, dtype):
    torch.manual_seed(0)
    reference = model(config(**SIZES)).eval().to(dtype)
    step = StepDecoder.of(_engine_copy(reference), kernels.load())
    assert step is not None
    kv = KVManager(reference.config, 2, 16, dtype, torch.device("cpu"))
    slot = kv.allocate()
    x = torch.randn(8, SIZES["hidden_size"]).to(dtype)
    with torch.inference_mode():
        expected = reference(inputs_embeds=x[None]).last_hidden_state[0]
        # The first 7 tokens as one prompt chunk, then the 8th as a decode row of that slot.
        positions = torch.arange(7)
        kv.cache(WritePlan(torch.full((7,), slot), positions))
        prompt = step(x[:7], positions, kv, StepLayout(0, torch.zeros(0), 0, [Segment(slot, 0, 7, 0)]))
        positions = torch.tensor([7])
        kv.cache(WritePlan(torch.tensor([slot]), positions))
        row = step(x[7:], positions, kv, StepLayout(1, torch.tensor([8]), 8, [], ragged=False))
    tolerance = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 0.02, "atol": 0.02}
    torch.testing.assert_close(prompt, expected[:7], **tolerance)
    torch.testing.assert_close(row, expected[7:], **tolerance)


def test_decoders_of_another_shape_or_left_unpacked_run_transformers_forward():
    gemma = GemmaModel(GemmaConfig(**SIZES, head_dim=16)).eval()
    assert StepDecoder.of(_engine_copy(gemma), kernels.load()) is None  # its norm is `1 + weight`
    assert StepDecoder.of(LlamaModel(LlamaConfig(**SIZES)).eval(), kernels.load()) is None  # not packed
    assert StepDecoder.of(_engine_copy(LlamaModel(LlamaConfig(**SIZES)).eval()), None) is None  # no ops
