"""The KV manager: preallocated per-layer slots, a slot table, and the prefix index.

Each layer holds keys and values `[slots, kv_heads, max_len, head_dim]`, allocated once. A
request takes a free slot (the lowest, so the slots in use stay packed low and a decode step's
view over them has few holes) when it starts, and gives it back when it retires. Nothing moves
when a row leaves: rows are addressed by their slot, and a decode step reads the slots below the
highest one decoding as a view. The padding rows of a decode step (slots in that range that are
not decoding) write nothing.

Each slot's length (positions written) lives on the host, so sizing a step never reads the
device. Finished requests' KV is kept in the prefix index (`PrefixCache`), keyed by token ids and
full image hashes, and copied into a new request's slot when its prompt starts the same.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from llava_serve.engine import memory
from llava_serve.engine.prefix import Entry, PrefixCache
from llava_serve.errors import EngineError


@dataclass
class WritePlan:
    """Where one forward pass's new keys and values go: the pass's token `tokens[i]` (token i
    when `tokens` is None: every token writes) lands in slot `slot[i]` at position `position[i]`."""

    slot: torch.Tensor
    position: torch.Tensor
    tokens: torch.Tensor | None = None


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


def _kv_shape(config) -> tuple[int, int, int]:
    text = config.get_text_config()
    heads = getattr(text, "num_key_value_heads", None) or text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    return text.num_hidden_layers, heads, head_dim


class KVManager:
    def __init__(
        self,
        config,
        slots: int,
        max_len: int,
        dtype: torch.dtype,
        device: torch.device,
    ):
        layers, heads, head_dim = _kv_shape(config)
        shape = (slots, heads, max_len, head_dim)
        self.slots, self.max_len = slots, max_len
        # Every decode step streams the running slots: on the host, on 2 MB pages (`memory`).
        self.keys = [memory.zeros(shape, dtype, device) for _ in range(layers)]
        self.values = [memory.zeros(shape, dtype, device) for _ in range(layers)]
        self.lengths = [0] * slots  # positions written per slot, on the host
        self._free = list(range(slots))  # a heap: the lowest free slot first
        self.prefixes = PrefixCache(0)  # none until the engine sizes it (`keep_prefixes`)
        self.plan: WritePlan | None = None
        self._cache = Cache(layers=[SlotLayer(self, i) for i in range(layers)])

    @staticmethod
    def bytes_per_token(config, dtype: torch.dtype) -> int:
        layers, heads, head_dim = _kv_shape(config)
        return 2 * layers * heads * head_dim * torch.finfo(dtype).bits // 8

    @property
    def nbytes(self) -> int:
        """The slots' storage."""
        return sum(t.numel() * t.element_size() for t in self.keys + self.values)

    @property
    def capacity(self) -> int:
        return self.slots * self.max_len

    @property
    def free_slots(self) -> int:
        return len(self._free)

    # -- the slot table --------------------------------------------------------------------

    def allocate(self) -> int:
        if not self._free:
            raise EngineError(f"all {self.slots} KV slots are in use")
        slot = heapq.heappop(self._free)
        self.lengths[slot] = 0
        return slot

    def release(self, slot: int) -> None:
        self.lengths[slot] = 0
        heapq.heappush(self._free, slot)

    def reset(self) -> None:
        """Every slot free again."""
        self._free = list(range(self.slots))
        self.lengths = [0] * self.slots

    def copy(self, source: int, target: int, length: int) -> None:
        """A slot's first `length` positions into another (a choice sharing its request's prompt)."""
        for keys, values in zip(self.keys, self.values, strict=True):
            keys[target, :, :length] = keys[source, :, :length]
            values[target, :, :length] = values[source, :, :length]
        self.lengths[target] = length

    # -- the prefix index ------------------------------------------------------------------

    def keep_prefixes(self, max_bytes: int) -> None:
        """Keep finished requests' KV for reuse, up to `max_bytes` (`engine.prefix_cache_bytes`)."""
        self.prefixes = PrefixCache(max_bytes)

    def load_prefix(self, slot: int, entry: Entry, length: int) -> None:
        """A cached prefix's first `length` positions into a freshly allocated slot."""
        for layer, (k, v) in enumerate(zip(entry.keys, entry.values, strict=True)):
            self.keys[layer][slot, :, :length] = k[:, :length]
            self.values[layer][slot, :, :length] = v[:, :length]
        self.lengths[slot] = length

    def keep(self, slot: int, key: tuple, route_blocks: tuple[int, ...]) -> None:
        """A retiring slot's KV into the prefix index, under the key of what it holds."""
        length = self.lengths[slot]
        if not self.prefixes.enabled or length == 0:
            return
        keys = [k[slot, :, :length].clone() for k in self.keys]
        values = [v[slot, :, :length].clone() for v in self.values]
        self.prefixes.put(key[:length], keys, values, route_blocks)

    # -- one forward pass's writes -----------------------------------------------------------

    def cache(self, plan: WritePlan) -> Cache:
        """The transformers `Cache` for one forward pass that writes by `plan`."""
        self.plan = plan
        return self._cache

    def write(
        self, layer: int, keys: torch.Tensor, values: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write the pass's new keys and values ([1, heads, tokens, dim]) where the plan says; the
        attention (`engine.attention`) reads the whole storage by the step's layout."""
        p = self.plan
        keys, values = keys[0].transpose(0, 1), values[0].transpose(0, 1)  # [tokens, heads, dim]
        if p.tokens is not None:
            keys, values = keys[p.tokens], values[p.tokens]
        self.keys[layer][p.slot, :, p.position] = keys
        self.values[layer][p.slot, :, p.position] = values
        return self.keys[layer], self.values[layer]


class SlotLayer(CacheLayerMixin):
    """One layer's view of the `KVManager`, in the shape transformers' attention calls."""

    def __init__(self, kv: KVManager, index: int):
        super().__init__()
        self.kv, self.index = kv, index
        self.is_initialized = True

    def lazy_initialization(self, key_states, value_states) -> None:  # allocated up front
        return None

    def update(self, key_states, value_states, *args, **kwargs):
        return self.kv.write(self.index, key_states, value_states)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.kv.max_len, 0

    def get_seq_length(self) -> int:
        return 0  # positions are always passed explicitly, per token

    def get_max_length(self) -> int:
        return self.kv.max_len
