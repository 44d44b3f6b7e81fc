"""Attention for a step that decodes and prefills in one forward pass.

The step's tokens are one flattened sequence: a token for each decoding row (slots `0..n-1`),
then each joining prompt's chunk. The linear layers run over all of them at once, reading the
weights once per step rather than once for the decode and again for the prefill. Attention is
where the tokens part ways: each attends to its own slot only. The slot cache hands this function
its whole storage and the step's `StepLayout`, and it runs one SDPA over the decoding rows (a
query each, against a view of their slots, masked by their lengths) and one per chunk (against
its slot's earlier positions and its own, causal), writing each segment's output in place.

Registered with transformers as `ATTENTION`; a call without a layout (e.g. `generate` on the same
model) is plain SDPA.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

ATTENTION = "llava_slots"


@dataclass
class Segment:
    """A joining prompt's chunk: step tokens `offset..offset+length` go to `slot` from `start`."""

    slot: int
    start: int
    length: int
    offset: int


@dataclass
class StepLayout:
    rows: int  # decoding rows: step tokens 0..rows-1, slots 0..rows-1
    decode_len: int  # positions the decoding rows attend over (longest + 1)
    decode_mask: torch.Tensor | None  # additive [rows, 1, 1, decode_len]
    segments: list[Segment]


def slot_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    layout: StepLayout | None = kwargs.pop("step_layout", None)
    if layout is None:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs
        )
    # query [1, heads, tokens, dim]; key/value: the layer's whole storage [slots, kv_heads, max_len, dim]
    out = query.new_empty(query.shape[2], query.shape[1], query.shape[3])  # [tokens, heads, dim]
    n = layout.rows
    if n:
        q = query[0, :, :n].transpose(0, 1)[:, :, None]  # [rows, heads, 1, dim]
        k, v = key[:n, :, : layout.decode_len], value[:n, :, : layout.decode_len]
        o = F.scaled_dot_product_attention(
            q, k, v, attn_mask=layout.decode_mask, scale=scaling, enable_gqa=True
        )
        out[:n] = o[:, :, 0]
    for s in layout.segments:
        q = query[:, :, s.offset : s.offset + s.length]  # [1, heads, length, dim]
        end = s.start + s.length
        k, v = key[s.slot : s.slot + 1, :, :end], value[s.slot : s.slot + 1, :, :end]
        # Query i sits at position start + i and sees every position up to its own.
        sees = torch.arange(end, device=query.device)[None, :] <= (
            s.start + torch.arange(s.length, device=query.device)[:, None]
        )
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=sees, scale=scaling, enable_gqa=True)
        out[s.offset : s.offset + s.length] = o[0].transpose(0, 1)
    return out[None], None


AttentionInterface.register(ATTENTION, slot_attention)
AttentionMaskInterface.register(ATTENTION, sdpa_mask)
