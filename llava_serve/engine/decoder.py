"""A step's pass through the text decoder: transformers' arithmetic, in a few ops a layer.

A decode step of the LLaVA family's language models is ~50 small ops a layer around the four
products, and at a few rows each costs more than its arithmetic: its dispatch, transformers'
module calls and output-recording hooks around it, and the cache misses of running the framework's
code right after a product has streamed megabytes of weights through the core's caches (a
512-wide add takes ~1 us alone and ~18 us after one layer's MLP product). `StepDecoder` runs the
same layers as straight-line code over the step's flattened tokens: the packed products
(`packed.py`) and the engine's slot attention as before, and between them the engine's own ops
(`kernels/step_ops.cpp`): a residual add with the next RMS norm, rotary q and k with the key and
value written to their slots, and SiLU times up, each computed as transformers computes it. The
rotary cos and sin are rows of a table the model's own rotary module computed once for every
position a slot holds, where its frequencies never change (each entry is one product and a cos or
sin of it, so equal to the module's at any batch shape); dynamic and long-context RoPE types run
the module each step.

It takes the Llama-shaped decoder layer that Llama, Mistral and Qwen2 share (the LLaVA family's
language models): pre-norm attention with rotary q and k, then a gated SiLU MLP, each added to the
residual. Another shape, projections left unpacked (no oneDNN, or a GPU), or no compiler for the
ops, and the step runs transformers' forward (`StepDecoder.of` returns None).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from llava_serve.engine.attention import StepLayout, attend
from llava_serve.engine.kv import KVManager

# Decoder layers whose forward is the one below (transformers' `LlamaDecoderLayer.forward`, which
# Mistral and Qwen2 repeat; their attention and MLP forwards differ only in what the engine's slot
# attention does not read: Mistral's and Qwen2's `sliding_window` keyword).
LAYERS = frozenset({"LlamaDecoderLayer", "MistralDecoderLayer", "Qwen2DecoderLayer"})
# RoPE types whose frequencies change with the positions seen (transformers' `dynamic_rope_update`).
ROPE_PER_STEP = ("dynamic", "longrope")
# Norms computing `weight * (x * rsqrt(mean(x^2) + eps))` (`norms.FusedRMSNorm` is Llama's as one op).
NORMS = frozenset({"LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "FusedRMSNorm"})


@dataclass
class Norm:
    weight: torch.Tensor
    eps: float

    @classmethod
    def of(cls, module: nn.Module) -> Norm | None:
        if type(module).__name__ not in NORMS:
            return None
        return cls(module.weight.detach(), getattr(module, "eps", getattr(module, "variance_epsilon", 0.0)))


@dataclass
class Layer:
    input_norm: Norm
    qkv: nn.Module  # q, k and v as one packed product
    o_proj: nn.Module
    post_norm: Norm
    gate_up: nn.Module  # the gate and up projections as one packed product
    down: nn.Module
    index: int


class StepDecoder:
    def __init__(
        self, decoder: nn.Module, layers: list[Layer], heads: int, kv_heads: int, head_dim: int, ops
    ):
        self.rotary = decoder.rotary_emb
        self.norm = Norm.of(decoder.norm)
        self.layers = layers
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, head_dim
        self.scaling = head_dim**-0.5
        self.q_width = heads * head_dim
        self.ops = ops
        rope_type = getattr(self.rotary, "rope_type", "default")
        self.rope_table = isinstance(rope_type, str) and not any(t in rope_type for t in ROPE_PER_STEP)
        self._table: tuple[torch.Tensor, torch.Tensor] | None = None  # cos, sin [positions, head_dim]

    def rotation(
        self, x: torch.Tensor, positions: torch.Tensor, length: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The rotary cos and sin [tokens, head_dim] at `positions` (all below `length`), in x's dtype."""
        if not self.rope_table:
            cos, sin = self.rotary(x[None], positions[None])
            return cos[0], sin[0]
        table = self._table
        stale = table is None or table[0].shape[0] < length
        if stale or table[0].dtype != x.dtype or table[0].device != x.device:
            every = torch.arange(length, device=x.device)
            cos, sin = self.rotary(x[None, :1], every[None])
            table = self._table = (cos[0], sin[0])
        return table[0][positions], table[1][positions]

    @classmethod
    def of(cls, decoder: nn.Module, ops) -> StepDecoder | None:
        """The step decoder over a packed (`packed.pack_decoder`) Llama-shaped decoder, with the
        step ops (`kernels.load()`; None: not built here), else None."""
        if ops is None:
            return None
        text = decoder.config
        found = list(getattr(decoder, "layers", []))[: text.num_hidden_layers]
        if not found or not hasattr(decoder, "rotary_emb") or Norm.of(getattr(decoder, "norm", None)) is None:
            return None
        layers = []
        for i, layer in enumerate(found):
            attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
            qkv = getattr(attn, "fused_q_proj_k_proj_v_proj", None)
            gate_up = getattr(mlp, "fused_gate_proj_up_proj", None)
            norms = Norm.of(layer.input_layernorm), Norm.of(layer.post_attention_layernorm)
            if type(layer).__name__ not in LAYERS or qkv is None or gate_up is None or None in norms:
                return None
            if attn.scaling != attn.head_dim**-0.5 or type(mlp.act_fn).__name__ != "SiLUActivation":
                return None
            layers.append(Layer(norms[0], qkv, attn.o_proj, norms[1], gate_up, mlp.down_proj, i))
        head_dim = found[0].self_attn.head_dim
        return cls(decoder, layers, text.num_attention_heads, text.num_key_value_heads, head_dim, ops)

    def __call__(
        self, x: torch.Tensor, positions: torch.Tensor, kv: KVManager, layout: StepLayout
    ) -> torch.Tensor:
        """The last hidden states [tokens, hidden] of the step's tokens `x` [tokens, hidden] at
        `positions` [tokens], each writing its key and value where `kv.plan` says."""
        ops, tokens = self.ops, x.shape[0]
        cos, sin = self.rotation(x, positions, kv.max_len)  # [tokens, head_dim]
        plan = kv.plan
        slots = plan.slot
        if plan.tokens is not None:  # padding rows write nothing: slot -1
            slots = torch.full_like(positions, -1).index_copy_(0, plan.tokens, plan.slot)
        delta = None
        for layer in self.layers:
            norm = layer.input_norm
            if delta is None:
                h = ops.rms_norm(x, norm.weight, norm.eps)
            else:
                x, h = ops.add_rms_norm(x, delta, norm.weight, norm.eps)
            keys, values = kv.keys[layer.index], kv.values[layer.index]
            q = ops.rotate_write(
                layer.qkv(h), cos, sin, self.heads, self.kv_heads, keys, values, slots, positions
            )
            attended = attend(q.transpose(0, 1)[None], keys, values, layout, self.scaling, ops)
            norm = layer.post_norm
            x, h = ops.add_rms_norm(
                x, layer.o_proj(attended.reshape(tokens, self.q_width)), norm.weight, norm.eps
            )
            delta = layer.down(ops.silu_mul(layer.gate_up(h)))
        _, out = ops.add_rms_norm(x, delta, self.norm.weight, self.norm.eps)
        return out
