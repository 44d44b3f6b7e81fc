"""The KV manager: the slot table, copies between slots, and the prefix index it keeps."""

import pytest
import torch

from llava_serve.engine.kv import KVManager
from llava_serve.errors import EngineError


@pytest.fixture
def kv(hf_model):
    manager = KVManager(hf_model.config, slots=3, max_len=16, dtype=torch.float32, device=torch.device("cpu"))
    manager.keep_prefixes(1 << 20)
    return manager


def fill(kv: KVManager, slot: int, length: int, value: float) -> None:
    for t in kv.keys + kv.values:
        t[slot, :, :length] = value
    kv.lengths[slot] = length


def test_slots_are_taken_lowest_first_and_a_released_one_is_reused_first(kv):
    assert [kv.allocate() for _ in range(3)] == [0, 1, 2] and kv.free_slots == 0
    with pytest.raises(EngineError, match="all 3 KV slots"):
        kv.allocate()
    kv.release(1)
    kv.release(0)
    assert kv.lengths[:2] == [0, 0] and kv.allocate() == 0 and kv.allocate() == 1


def test_a_copy_holds_the_source_s_positions_and_leaves_the_source_alone(kv):
    a, b = kv.allocate(), kv.allocate()
    fill(kv, a, 10, 3.0)
    kv.copy(a, b, 6)
    assert kv.lengths[b] == 6 and kv.lengths[a] == 10
    for t in kv.keys + kv.values:
        assert torch.equal(t[b, :, :6], t[a, :, :6]) and not t[b, :, 6:].any()


def test_a_retiring_slot_is_kept_under_the_key_of_what_it_holds_and_loads_into_another(kv):
    a = kv.allocate()
    fill(kv, a, 5, 2.0)
    kv.keep(a, (1, 2, 3, 4, 5, 6, 7), route_blocks=(42,))  # the last token sampled was never computed
    fill(kv, a, 5, 0.0)  # the slot is reused: the entry is a copy
    entry, length = kv.prefixes.match((1, 2, 3, 4, 9))
    assert entry.key == (1, 2, 3, 4, 5) and length == 4 and kv.prefixes.route_blocks() == {42}
    b = kv.allocate()
    kv.load_prefix(b, entry, length)
    assert kv.lengths[b] == 4
    assert all(torch.equal(t[b, :, :4], torch.full_like(t[b, :, :4], 2.0)) for t in kv.keys + kv.values)
