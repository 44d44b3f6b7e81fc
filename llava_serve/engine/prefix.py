"""KV of finished requests kept for reuse: a prompt that starts with what a cached request held (a
follow-up turn about the same image, a shared system prompt) copies that KV into its slot and
computes only the rest.

A cached entry is keyed by what produced each position (`llava_serve.routing.key.position_key`):
the token id, or for an image (or video) position the full content hash of its image, so two
prompts that differ only in their pictures share nothing past the first picture. Each entry also
keeps the routing digests its request came with, so the replica can tell the router what it
holds. Entries are evicted least recently used first, under a byte budget
(`engine.prefix_cache_bytes`).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable
from dataclasses import dataclass

import torch

# A lookup compares the new prompt with every entry, position by position until they differ.
MAX_ENTRIES = 256


@dataclass
class Entry:
    key: tuple[Hashable, ...]
    keys: list[torch.Tensor]  # per layer [kv_heads, length, head_dim]
    values: list[torch.Tensor]
    nbytes: int
    route_blocks: tuple[int, ...] = ()
    id: int = 0


def common_length(a: tuple, b: tuple) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


class PrefixCache:
    """The entries in least-recently-used order, under a byte and an entry bound. An ordered dict
    rather than cachetools' LRUCache: a lookup reads every entry to find the longest shared
    prefix, and LRUCache's reads each count as a use, so the scan would reorder them all."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.entries: OrderedDict[int, Entry] = OrderedDict()
        self.bytes = 0
        self.hits = 0
        self.misses = 0
        self.hit_tokens = 0
        self._ids = 0

    @property
    def enabled(self) -> bool:
        return self.max_bytes > 0

    def match(self, key: tuple[Hashable, ...]) -> tuple[Entry, int] | None:
        """The entry sharing the longest prefix with `key`, and that length; at least one position
        of `key` is left over (its logits come from computing it). None on a miss. Changes
        nothing: the scheduler sizes a starting prompt's chunk by it, and `use` counts it when the
        prompt starts (the entry stays valid even if it is evicted in between)."""
        best, best_len = None, 0
        for entry in self.entries.values():
            n = min(common_length(entry.key, key), len(key) - 1)
            if n > best_len:
                best, best_len = entry, n
        return None if best is None else (best, best_len)

    def use(self, hit: tuple[Entry, int] | None) -> None:
        """Count a starting prompt's match (or miss), and make its entry the most recently used."""
        if hit is None:
            self.misses += 1
            return
        entry, length = hit
        self.hits += 1
        self.hit_tokens += length
        if entry.id in self.entries:
            self.entries.move_to_end(entry.id)

    def put(
        self,
        key: tuple[Hashable, ...],
        keys: list[torch.Tensor],
        values: list[torch.Tensor],
        route_blocks: tuple[int, ...] = (),
    ) -> None:
        """Keep a finished request's KV; entries it extends are dropped (it serves them too)."""
        nbytes = sum(t.numel() * t.element_size() for t in keys + values)
        if nbytes > self.max_bytes or not key:
            return
        for entry_id in [i for i, e in self.entries.items() if key[: len(e.key)] == e.key]:
            self._drop(entry_id)
        self._ids += 1
        self.entries[self._ids] = Entry(key, keys, values, nbytes, route_blocks, self._ids)
        self.bytes += nbytes
        while self.bytes > self.max_bytes or len(self.entries) > MAX_ENTRIES:
            self._drop(next(iter(self.entries)))

    def route_blocks(self) -> set[int]:
        """The routing digests of every entry. Safe from another thread than the one that puts:
        the entries are copied in one step first."""
        return {digest for entry in list(self.entries.values()) for digest in entry.route_blocks}

    def _drop(self, entry_id: int) -> None:
        self.bytes -= self.entries.pop(entry_id).nbytes
