"""KV of finished requests kept for reuse: a prompt that starts with what a cached request held (a
follow-up turn about the same image, a shared system prompt) copies that KV into its slot and
computes only the rest.

A cached entry is keyed by what produced each position: the token id, or for an image (or video)
position the full content hash of its image, so two prompts that differ only in their pictures
share nothing past the first picture. Entries are evicted least recently used first, under a
byte budget (`engine.prefix_cache_bytes`).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable, Sequence
from dataclasses import dataclass

import torch

from llava_serve.types import PreparedImage

# A lookup compares the new prompt with every entry, position by position until they differ.
MAX_ENTRIES = 256


def prefix_key(
    input_ids: Sequence[int], images: Sequence[PreparedImage], image_token: int, video_token: int | None
) -> tuple[Hashable, ...]:
    """One hashable per prompt position: its token id, or its image's content hash."""
    owners = {
        kind: iter([im.content_hash for im in images if im.kind == kind for _ in range(im.num_tokens)])
        for kind in ("image", "video")
    }
    key: list[Hashable] = []
    for token in input_ids:
        kind = "image" if token == image_token else "video" if token == video_token else None
        # A slot no image accounts for (the prompt fails at embedding anyway) matches nothing.
        key.append(next(owners[kind], object()) if kind else token)
    return tuple(key)


@dataclass
class Entry:
    key: tuple[Hashable, ...]
    keys: list[torch.Tensor]  # per layer [kv_heads, length, head_dim]
    values: list[torch.Tensor]
    nbytes: int


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

    def lookup(self, key: tuple[Hashable, ...]) -> tuple[Entry, int] | None:
        """The entry sharing the longest prefix with `key`, and that length; at least one position
        of `key` is left over (its logits come from computing it). None on a miss."""
        best, best_len = None, 0
        for entry_id, entry in self.entries.items():
            n = min(common_length(entry.key, key), len(key) - 1)
            if n > best_len:
                best, best_len = entry_id, n
        if best is None:
            self.misses += 1
            return None
        self.hits += 1
        self.hit_tokens += best_len
        self.entries.move_to_end(best)
        return self.entries[best], best_len

    def put(self, key: tuple[Hashable, ...], keys: list[torch.Tensor], values: list[torch.Tensor]) -> None:
        """Keep a finished request's KV; entries it extends are dropped (it serves them too)."""
        nbytes = sum(t.numel() * t.element_size() for t in keys + values)
        if nbytes > self.max_bytes or not key:
            return
        for entry_id in [i for i, e in self.entries.items() if key[: len(e.key)] == e.key]:
            self._drop(entry_id)
        self._ids += 1
        self.entries[self._ids] = Entry(key, keys, values, nbytes)
        self.bytes += nbytes
        while self.bytes > self.max_bytes or len(self.entries) > MAX_ENTRIES:
            self._drop(next(iter(self.entries)))

    def _drop(self, entry_id: int) -> None:
        self.bytes -= self.entries.pop(entry_id).nbytes
