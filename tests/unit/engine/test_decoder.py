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


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_rotary_table_holds_what_the_model_s_rotary_module_computes_at_each_position(dtype):
    """Rows of the table, at positions in any order and batch, equal the module's own cos and sin
    computed for just those positions, bit for bit."""
    reference = LlamaModel(LlamaConfig(**SIZES)).eval().to(dtype)
    step = StepDecoder.of(_engine_copy(reference), kernels.load())
    assert step is not None and step.rope_table
    x = torch.randn(5, SIZES["hidden_size"]).to(dtype)
    for positions in (torch.tensor([0, 7, 3, 200, 511]), torch.tensor([42]), torch.arange(5)):
        cos, sin = step.rotation(x[: len(positions)], positions, 512)
        own_cos, own_sin = reference.rotary_emb(x[None, : len(positions)], positions[None])
        assert cos.dtype == dtype and torch.equal(cos, own_cos[0]) and torch.equal(sin, own_sin[0])
    assert step._table[0].shape[0] == 512


def test_a_dynamic_rope_runs_the_rotary_module_at_each_step():
    config = LlamaConfig(**SIZES, rope_scaling={"rope_type": "dynamic", "factor": 2.0})
    reference = LlamaModel(config).eval()
    step = StepDecoder.of(_engine_copy(reference), kernels.load())
    assert step is not None and not step.rope_table
    x, positions = torch.randn(2, SIZES["hidden_size"]), torch.tensor([3, 9])
    cos, _ = step.rotation(x, positions, 512)
    assert torch.equal(cos, reference.rotary_emb(x[None], positions[None])[0][0])
    assert step._table is None
