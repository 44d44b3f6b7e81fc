"""The running batch's KV cache: preallocated slots written in place, never copied whole.

Each layer holds keys and values `[slots, kv_heads, max_len, head_dim]`, allocated once. A
request takes the next free slot when it joins (its prefill writes its prompt there) and gives it
back when it leaves; the last running slot moves into the hole, one row's valid tokens, so the
running rows stay slots `0..n-1` and attention reads them as a view, `[:n, :, :longest]`. A decode
step writes one token per row at that row's own length: nothing is concatenated, nothing padded.

Attention gets a 4D mask built from the rows' lengths (transformers passes a 4D mask through
untouched), so each row sees exactly its own tokens, as if it ran alone.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.cache_utils import Cache, CacheLayerMixin


@dataclass
class WritePlan:
    """Where one forward pass's new keys and values go: token t of the pass (batch row
    `batch[t]`, query position `query[t]`) lands in slot `slot[t]` at position `position[t]`;
    attention then reads slots `rows` (batch row i is `rows[i]`) up to `kv_len`: a view when
    they are consecutive (every decode step), a gather of those rows otherwise."""

    rows: slice | torch.Tensor
    kv_len: int
    batch: torch.Tensor
    query: torch.Tensor
    slot: torch.Tensor
    position: torch.Tensor


def slot_length(budget_bytes: int | None, slots: int, per_token: int, context: int) -> int:
    """Positions each slot holds: `budget_bytes` shared evenly by the slots, at most the model's
    context (no budget: the whole context). A budget without room for one position per slot is a
    configuration error, raised at startup rather than as an out-of-memory later."""
    if budget_bytes is None:
        return context
    length = budget_bytes // (slots * per_token)
    if length < 1:
        raise ValueError(
            f"a KV budget of {budget_bytes} bytes cannot give {slots} slots one position each "
            f"({per_token} bytes a position): raise engine.kv_cache_bytes (or, on a GPU, "
            "engine.gpu_memory_utilization) or lower engine.max_batch_size"
        )
    return min(length, context)


def gpu_kv_budget(free: int, total: int, utilization: float, caches: int = 0) -> int:
    """Bytes the KV slots may take on a GPU once the weights are loaded (`free` and `total` as
    `torch.cuda.mem_get_info` reports them): what keeps the device's use, other processes'
    included, within `utilization` of its memory once the caches that fill later (prefix and
    vision caches, `caches` bytes at most) are full; the rest is headroom for activations."""
    return max(0, free - (total - int(total * utilization)) - caches)


class SlotKV:
    def __init__(self, config, slots: int, max_len: int, dtype: torch.dtype, device: torch.device):
        text = config.get_text_config()
        heads = getattr(text, "num_key_value_heads", None) or text.num_attention_heads
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
        shape = (slots, heads, max_len, head_dim)
        self.slots, self.max_len = slots, max_len
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(text.num_hidden_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(text.num_hidden_layers)]
        self.plan: WritePlan | None = None
        self._cache = Cache(layers=[SlotLayer(self, i) for i in range(text.num_hidden_layers)])

    @staticmethod
    def bytes_per_token(config, dtype: torch.dtype) -> int:
        text = config.get_text_config()
        heads = getattr(text, "num_key_value_heads", None) or text.num_attention_heads
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
        return 2 * text.num_hidden_layers * heads * head_dim * torch.finfo(dtype).bits // 8

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.keys + self.values)

    def cache(self, plan: WritePlan) -> Cache:
        """The transformers `Cache` for one forward pass that writes by `plan`."""
        self.plan = plan
        return self._cache

    def write(
        self, layer: int, keys: torch.Tensor, values: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        p = self.plan
        # [rows, heads, queries, dim] -> one [heads, dim] vector per new token, in the plan's order
        self.keys[layer][p.slot, :, p.position] = keys.transpose(1, 2)[p.batch, p.query]
        self.values[layer][p.slot, :, p.position] = values.transpose(1, 2)[p.batch, p.query]
        return self.keys[layer][p.rows, :, : p.kv_len], self.values[layer][p.rows, :, : p.kv_len]

    def move(self, source: int, target: int, length: int) -> None:
        """Copy one slot's first `length` positions into another (a leaving row's hole)."""
        for keys, values in zip(self.keys, self.values, strict=True):
            keys[target, :, :length] = keys[source, :, :length]
            values[target, :, :length] = values[source, :, :length]

    def swap(self, a: int, b: int, length: int) -> None:
        """Exchange two slots' first `length` positions."""
        for keys, values in zip(self.keys, self.values, strict=True):
            keys[[a, b], :, :length] = keys[[b, a], :, :length]
            values[[a, b], :, :length] = values[[b, a], :, :length]


class SlotLayer(CacheLayerMixin):
    """One layer's view of `SlotKV`, in the shape transformers' attention calls."""

    def __init__(self, kv: SlotKV, index: int):
        super().__init__()
        self.kv, self.index = kv, index
        self.is_initialized = True

    def lazy_initialization(self, key_states, value_states) -> None:  # allocated up front
        return None

    def update(self, key_states, value_states, *args, **kwargs):
        return self.kv.write(self.index, key_states, value_states)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.kv.plan.kv_len, 0

    def get_seq_length(self) -> int:
        return 0  # positions are always passed explicitly, per row

    def get_max_length(self) -> int:
        return self.kv.max_len
