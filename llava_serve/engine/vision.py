"""Projected vision-tower outputs kept for reuse: the same image in a later request (a follow-up
turn, a retry) skips the tower."""

from __future__ import annotations

import torch
from cachetools import LRUCache


class VisionCache:
    """LRU of projected vision-tower outputs, keyed by the preprocessor's content hash, bounded in bytes."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.entries: LRUCache[str, torch.Tensor] = LRUCache(maxsize=max_bytes, getsizeof=lambda t: t.nbytes)
        self.hits = 0
        self.misses = 0

    @property
    def bytes(self) -> int:
        return int(self.entries.currsize)

    def get(self, key: str) -> torch.Tensor | None:
        value = self.entries.get(key)
        if value is None:
            self.misses += 1
            return None
        self.hits += 1
        return value

    def put(self, key: str, value: torch.Tensor) -> None:
        if value.nbytes > self.max_bytes or key in self.entries:
            return
        self.entries[key] = value  # evicts the least recently used until it fits
