"""The decoder's RMS norms as one op each: every norm of the LLaVA family's language models is
replaced, and computes what transformers' own module computes."""

import copy

import pytest
import torch
from transformers import LlamaConfig, LlamaModel, MistralConfig, MistralModel, Qwen2Config, Qwen2Model

from llava_serve.engine.norms import FusedRMSNorm, fuse_norms

SIZES = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
}


@pytest.mark.parametrize(
    ("config", "model"), [(LlamaConfig, LlamaModel), (MistralConfig, MistralModel), (Qwen2Config, Qwen2Model)]
)
def test_every_rms_norm_is_replaced_and_computes_transformers_own(config, model):
    torch.manual_seed(0)
    decoder = model(config(vocab_size=128, rms_norm_eps=1e-5, **SIZES)).eval()
    for module in decoder.modules():  # norms as trained: weights away from their initial ones
        if hasattr(module, "variance_epsilon"):
            module.weight.data.uniform_(0.5, 1.5)
    reference = copy.deepcopy(decoder)
    assert fuse_norms(decoder) == 2 * SIZES["num_hidden_layers"] + 1
    assert isinstance(decoder.norm, FusedRMSNorm)
    assert not any(hasattr(m, "variance_epsilon") for m in decoder.modules())
    x = torch.randn(2, 5, SIZES["hidden_size"]) * 3
    for fused, own in [
        (decoder.norm, reference.norm),
        (decoder.layers[1].input_layernorm, reference.layers[1].input_layernorm),
    ]:
        torch.testing.assert_close(fused(x), own(x), rtol=1e-6, atol=1e-6)
    with torch.inference_mode():
        got = decoder(inputs_embeds=x).last_hidden_state
        expected = reference(inputs_embeds=x).last_hidden_state
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_a_bfloat16_model_keeps_transformers_norms():
    """Transformers computes a bf16 model's norm in float32 and rounds before the weight; the
    fused op rounds once, so a reduced-precision model is left as it is."""
    decoder = LlamaModel(LlamaConfig(vocab_size=128, **SIZES)).to(torch.bfloat16)
    assert fuse_norms(decoder) == 0
