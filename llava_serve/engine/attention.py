"""Attention over the KV slots, for a step that decodes and writes prompt chunks in one pass.

A step's tokens are one flattened sequence: first a decode token for each slot below the highest
one decoding (`StepLayout.rows`; slots in that range that are not decoding are padding rows), then
each prompt chunk. The linear layers run over all of them at once, reading the weights once per
step. Attention is where they part ways, each token attending to its own slot only:

- the decode rows as one batched query against a view of slots `0..rows-1`, each row seeing its
  own `lengths[i]` positions;
- each chunk against its slot's earlier positions and its own, causal.

The interface is per-row lengths, not a mask: a CUDA backend fills it with
`flash_attn_with_kvcache` (which takes `cache_seqlens`) or FlexAttention. On CPU, decode rows
(float32 or bfloat16 slots) run on the engine's decode attention (`kernels/attention.cpp`, from
the step decoder), which reads each row's own length and no further: at 16 rows of lengths 40-300
a float32 layer takes 0.20 ms against SDPA's 0.36 with the mask, and 0.23 against 0.31 at equal
lengths. Elsewhere SDPA runs, with a
boolean mask built from the lengths once per step (`StepLayout.decode_mask`), not once per layer.
Registered with transformers as `ATTENTION`; a call without a layout (e.g. `generate` on the same
model) is plain SDPA.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

ATTENTION = "llava_slots"
# The slot dtypes the engine's decode attention reads (its arithmetic is float32 either way), and
# its head sizes: multiples of 16 floats up to 512 (`kernels/attention.cpp`).
DECODE_DTYPES = (torch.float32, torch.bfloat16)
DECODE_MAX_DIM = 512


@dataclass
class Segment:
    """A prompt chunk: step tokens `offset..offset+length` go to `slot` from position `start`."""

    slot: int
    start: int
    length: int
    offset: int


@dataclass
class StepLayout:
    rows: int  # decode rows: step tokens 0..rows-1 query slots 0..rows-1
    lengths: torch.Tensor  # [rows] positions each decode row sees, its new one included (>= 1)
    kv_len: int  # the longest of them, known on the host
    segments: list[Segment]
    ragged: bool = True  # whether the rows' lengths differ (known on the host)
    _mask: torch.Tensor | None = field(default=None, repr=False)

    def decode_mask(self) -> torch.Tensor | None:
        """[rows, 1, 1, kv_len] boolean: what each decode row sees (the CPU backend's form); None
        when every row sees all `kv_len` positions (one row, say), which SDPA then reads unmasked:
        a mask of all true adds zero to every score, so the result is the same."""
        if self._mask is None and self.ragged:
            positions = torch.arange(self.kv_len, device=self.lengths.device)
            self._mask = (positions[None, :] < self.lengths[:, None])[:, None, None]
        return self._mask


def slot_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    layout: StepLayout | None = kwargs.pop("step_layout", None)
    if layout is None:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs
        )
    return attend(query, key, value, layout, scaling), None


def attend(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    layout: StepLayout,
    scaling: float | None,
    ops=None,
) -> torch.Tensor:
    """The step's attention: `query` [1, heads, tokens, dim] against a layer's whole storage
    (`key`, `value`: [slots, kv_heads, max_len, dim]) by `layout`; returns [1, tokens, heads, dim].
    With the engine's ops (`kernels.load()`), decode rows run on its decode attention."""
    out = query.new_empty(query.shape[2], query.shape[1], query.shape[3])  # [tokens, heads, dim]
    n = layout.rows
    dim = query.shape[3]
    decode = ops is not None and query.dtype in DECODE_DTYPES and key.dtype == query.dtype
    if n and decode and dim % 16 == 0 and dim <= DECODE_MAX_DIM:
        # Each row over its own length, read once (`kernels/attention.cpp`): no mask, no padding
        # to the longest row.
        q = query[0, :, :n].transpose(0, 1).contiguous()  # [rows, heads, dim]
        scale = dim**-0.5 if scaling is None else scaling  # SDPA's default
        out[:n] = ops.decode_attention(q, key, value, layout.lengths, scale)
    elif n:
        # The query heads that share a key head (transformers' `repeat_kv` order) as that head's
        # queries, [rows, kv_heads, group, dim]: they sit at the same position and see the same
        # keys, and SDPA reads each key once instead of expanding them per query head (17-25% less
        # attention time at 16 rows under `torch.profiler`; docs/performance.md).
        kv_heads = key.shape[1]
        q = query[0, :, :n].transpose(0, 1).reshape(n, kv_heads, -1, query.shape[3])
        k, v = key[:n, :, : layout.kv_len], value[:n, :, : layout.kv_len]
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=layout.decode_mask(), scale=scaling)
        out[:n] = o.reshape(n, query.shape[1], query.shape[3])
    for s in layout.segments:
        q = query[:, :, s.offset : s.offset + s.length]  # [1, heads, length, dim]
        end = s.start + s.length
        k, v = key[s.slot : s.slot + 1, :, :end], value[s.slot : s.slot + 1, :, :end]
        if s.start == 0:
            # SDPA's own causal form: its kernels skip the blocks above the diagonal, half of a
            # fresh prompt's scores (`is_causal` aligns top-left, so only a chunk from position 0).
            masking = {"is_causal": True}
        else:
            # Query i sits at position start + i and sees every position up to its own.
            sees = torch.arange(end, device=query.device)[None, :] <= (
                s.start + torch.arange(s.length, device=query.device)[:, None]
            )
            masking = {"attn_mask": sees}
        o = F.scaled_dot_product_attention(q, k, v, scale=scaling, enable_gqa=True, **masking)
        out[s.offset : s.offset + s.length] = o[0].transpose(0, 1)
    return out[None]


# A step passes this as its `attention_mask`: transformers hands a 4D mask through untouched instead
# of building one over the flattened step, and the layout does the masking.
PASS_THROUGH = torch.ones(1, 1, 1, 1, dtype=torch.bool)

AttentionInterface.register(ATTENTION, slot_attention)
AttentionMaskInterface.register(ATTENTION, sdpa_mask)
