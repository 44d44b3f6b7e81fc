"""The prefix cache: the longest match, LRU under a byte budget, the routing digests it keeps."""

import functools
import operator

import torch

from llava_serve.engine.prefix import PrefixCache


def kv(length: int, layers: int = 2) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    return [torch.randn(1, length, 4) for _ in range(layers)], [
        torch.randn(1, length, 4) for _ in range(layers)
    ]


def test_a_match_is_the_longest_shared_prefix_less_one_position_and_counts_only_when_used():
    cache = PrefixCache(1 << 20)
    cache.put((1, 2, 3, 4), *kv(4))
    cache.put((1, 2, 9), *kv(3))
    entry, length = cache.match((1, 2, 3, 4, 5, 6))
    assert entry.key == (1, 2, 3, 4) and length == 4
    _, length = cache.match((1, 2, 3, 4))  # the whole prompt cached: its last position is computed
    assert length == 3
    assert cache.match((7, 8)) is None
    assert (cache.hits, cache.misses, cache.hit_tokens) == (0, 0, 0)  # matching changes nothing
    for key in ((1, 2, 3, 4, 5, 6), (1, 2, 3, 4), (7, 8)):
        cache.use(cache.match(key))
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
    cache.use(cache.match(tuple(range(11))))  # the first is used again
    cache.put(tuple(range(200, 210)), *kv(10))
    assert [e.key[0] for e in cache.entries.values()] == [0, 200]
    assert cache.bytes == 2 * one
    cache.put(tuple(range(300, 330)), *kv(30))  # larger than the whole budget: not kept
    assert cache.bytes == 2 * one


def test_entries_keep_their_routing_digests_until_evicted():
    cache = PrefixCache(2 * sum(t.numel() * 4 for t in functools.reduce(operator.iadd, kv(4), [])))
    cache.put((1, 2, 3, 4), *kv(4), route_blocks=(11, 12))
    cache.put((5, 6, 7, 8), *kv(4), route_blocks=(21,))
    assert cache.route_blocks() == {11, 12, 21}
    cache.put((9, 9, 9, 9), *kv(4), route_blocks=(31,))  # over budget: the oldest goes
    assert cache.route_blocks() == {21, 31}
