"""The decoder's RMS norms as one op each (`torch.rms_norm`), on this engine's model only.

Transformers writes the LLaVA family's RMS norm as six ops (a cast, a square, a mean, an add, a
reciprocal square root, two products). A decode step runs two a layer and one at the end, each on
a few rows: the arithmetic is nothing and the dispatch is the cost, so one fused op a norm is
what a step saves. The module is replaced on this engine's model (as `packed.py` replaces the
linears), never patched in transformers, so a reference `generate` on another copy is untouched.
Equal to transformers' to float rounding: the same products, reduced in the kernel's order.
"""

from __future__ import annotations

import torch
from torch import nn

from llava_serve.engine.modules import replace_modules

# Norms computing `weight * (x * rsqrt(mean(x^2) + eps))`, in float32 for a float32 model: Llama's,
# Mistral's and Qwen2's (the LLaVA family's language models). Gemma's `1 + weight` form is not one.
RMS_NORMS = frozenset({"LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm"})


class FusedRMSNorm(nn.Module):
    def __init__(self, norm: nn.Module):
        super().__init__()
        self.weight = norm.weight
        self.eps = norm.variance_epsilon
        self.shape = tuple(norm.weight.shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.rms_norm(x, self.shape, self.weight, self.eps)


def fuse_norms(decoder: nn.Module) -> int:
    """Replace the decoder's RMS norms of a known form, for float32 weights (where transformers'
    float32 arithmetic is the model's own dtype); returns how many were replaced."""
    return replace_modules(
        decoder,
        lambda m: type(m).__name__ in RMS_NORMS and m.weight.dtype == torch.float32,
        FusedRMSNorm,
    )
