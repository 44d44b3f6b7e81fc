"""The prefix cache: keys that tell images apart, the longest match, LRU under a byte budget."""

import numpy as np
import torch

from llava_serve.engine.prefix import PrefixCache, prefix_key
from llava_serve.types import PreparedImage

IMG = 99


def picture(content_hash: str, tokens: int) -> PreparedImage:
    return PreparedImage(np.zeros((1, 3, 2, 2), np.float32), content_hash, num_tokens=tokens)


def kv(length: int, layers: int = 2) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    return [torch.randn(1, length, 4) for _ in range(layers)], [
        torch.randn(1, length, 4) for _ in range(layers)
    ]


def test_image_positions_are_keyed_by_the_full_content_hash():
    ids = [1, IMG, IMG, 5, IMG, 6]
    a = prefix_key(ids, [picture("a" * 64, 2), picture("b" * 64, 1)], IMG, None)
    assert a == (1, "a" * 64, "a" * 64, 5, "b" * 64, 6)
    other = prefix_key(ids, [picture("a" * 64, 2), picture("c" * 64, 1)], IMG, None)
    assert [x == y for x, y in zip(a, other, strict=True)] == [True] * 4 + [False, True]


def test_a_slot_no_image_accounts_for_matches_nothing():
    ids = [1, IMG, IMG]
    short = prefix_key(ids, [picture("a", 1)], IMG, None)
    assert short[:2] == (1, "a") and short[2] != prefix_key(ids, [picture("a", 1)], IMG, None)[2]


def test_lookup_finds_the_longest_shared_prefix_and_leaves_one_position():
    cache = PrefixCache(1 << 20)
    cache.put((1, 2, 3, 4), *kv(4))
    cache.put((1, 2, 9), *kv(3))
    entry, length = cache.lookup((1, 2, 3, 4, 5, 6))
    assert entry.key == (1, 2, 3, 4) and length == 4
    _, length = cache.lookup((1, 2, 3, 4))  # the whole prompt cached: its last position is computed
    assert length == 3
    assert cache.lookup((7, 8)) is None
    assert (cache.hits, cache.misses, cache.hit_tokens) == (2, 1, 7)


def test_an_entry_that_extends_another_replaces_it():
    cache = PrefixCache(1 << 20)
    cache.put((1, 2), *kv(2))
    cache.put((1, 2, 3), *kv(3))
    assert [e.key for e in cache.entries.values()] == [(1, 2, 3)]


def test_least_recently_used_entries_go_first_under_the_byte_budget():
    keys, values = kv(10)
    one = sum(t.numel() * t.element_size() for t in keys + values)
    cache = PrefixCache(2 * one)
    cache.put(tuple(range(10)), *kv(10))
    cache.put(tuple(range(100, 110)), *kv(10))
    cache.lookup(tuple(range(11)))  # the first is used again
    cache.put(tuple(range(200, 210)), *kv(10))
    assert [e.key[0] for e in cache.entries.values()] == [0, 200]
    assert cache.bytes == 2 * one
    cache.put(tuple(range(300, 330)), *kv(30))  # larger than the whole budget: not kept
    assert cache.bytes == 2 * one
