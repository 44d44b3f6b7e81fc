"""The vision cache: the recently used kept within its bytes."""

import torch

from llava_serve.engine.vision import VisionCache


def test_the_vision_cache_keeps_the_recently_used_within_its_bytes():
    cache = VisionCache(max_bytes=100)  # ten float32s are 40 bytes: two fit
    for key in "ab":
        cache.put(key, torch.zeros(10))
    assert cache.get("a") is not None  # a is now the more recently used
    cache.put("c", torch.zeros(10))
    assert (cache.get("b"), cache.bytes, sorted(cache.entries)) == (None, 80, ["a", "c"])
    cache.put("d", torch.zeros(30))  # larger than the whole budget: not kept, nothing evicted
    assert sorted(cache.entries) == ["a", "c"] and (cache.hits, cache.misses) == (1, 1)
