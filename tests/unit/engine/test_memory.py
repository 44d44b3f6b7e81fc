"""What a decode step streams lives in mappings advised for 2 MB pages (`engine/memory.py`): read
back from the kernel's own account of the process's mappings (`/proc/self/smaps`)."""

import gc
import sys
from pathlib import Path

import pytest
import torch

from llava_serve.engine import kernels, memory
from llava_serve.engine.kv import KVManager
from llava_serve.engine.packed import PackedLinear

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="huge-page advice is Linux's")


def _advised(tensor: torch.Tensor) -> bool:
    """Whether the mapping holding `tensor`'s first byte is advised for huge pages ("hg")."""
    address, inside = tensor.data_ptr(), False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        first = line.split()[0]
        if "-" in first and not first.endswith(":"):
            start, end = (int(part, 16) for part in first.split("-"))
            inside = start <= address < end
        elif inside and first == "VmFlags:":
            return "hg" in line.split()[1:]
    raise AssertionError("no mapping holds the tensor")


def test_a_large_tensor_starts_on_a_huge_page_in_an_advised_mapping():
    t = memory.zeros((3, 1000, 1000), torch.float32)
    assert t.shape == (3, 1000, 1000) and t.dtype == torch.float32 and t.is_contiguous()
    assert t.data_ptr() % memory.HUGE_PAGE == 0
    assert _advised(t)
    assert t.abs().sum().item() == 0.0


def test_the_tensor_keeps_its_mapping_alive():
    t = memory.empty((1 << 20,), torch.float32)
    t.fill_(2.5)
    gc.collect()
    view = t[10:20]
    del t
    gc.collect()
    assert view.tolist() == [2.5] * 10


def _advised_mappings() -> int:
    return sum(
        1
        for line in Path("/proc/self/smaps").read_text().splitlines()
        if line.startswith("VmFlags:") and " hg" in line
    )


def test_a_freed_tensor_gives_its_mapping_back():
    before = _advised_mappings()
    for _ in range(20):
        t = memory.zeros((16, 1024, 1024), torch.float32)
        del t
    gc.collect()
    assert _advised_mappings() <= before


def test_a_copy_holds_the_same_values_and_small_tensors_stay_ordinary():
    source = torch.randn(700, 1024)
    copied = memory.copy(source.t())
    assert copied.is_contiguous() and torch.equal(copied, source.t())
    assert _advised(copied)
    small = memory.empty((16, 16), torch.float32)
    assert small.shape == (16, 16) and not _advised(small)


def test_the_kv_slots_on_the_host_are_advised(hf_model):
    per_token = (
        KVManager.bytes_per_token(hf_model.config, torch.float32)
        // hf_model.config.text_config.num_hidden_layers
    )
    max_len = 2 * (2 * memory.HUGE_PAGE) // (4 * per_token)  # each layer's keys ~4 MB over 4 slots
    kv = KVManager(hf_model.config, slots=4, max_len=max_len, dtype=torch.float32, device=torch.device("cpu"))
    assert all(_advised(t) for t in kv.keys + kv.values)
    assert all(t.abs().sum().item() == 0.0 for t in kv.keys[:1] + kv.values[:1])


def test_the_panels_a_packed_product_streams_are_advised():
    ops = kernels.load()
    if ops is None or ops.panel_width() == 0:
        pytest.skip("the panels need the engine's ops on an AVX-512 CPU")
    weight = torch.randn(1024, 1024)
    product = PackedLinear(weight, None, ops)
    assert _advised(product.packed)
    x = torch.randn(3, 1024)
    torch.testing.assert_close(product(x), x @ weight.t(), rtol=1e-5, atol=1e-4)


def test_the_tiles_a_bfloat16_product_streams_are_advised():
    ops = kernels.load()
    if ops is None or not ops.tile_ready():
        pytest.skip("the tiles need the engine's ops on an AMX CPU")
    weight = torch.randn(1024, 1024).bfloat16()
    product = PackedLinear(weight, None, ops)
    assert product.kernel == "tiles"
    assert _advised(product.packed)
    x = torch.randn(3, 1024).bfloat16()
    torch.testing.assert_close(product(x), x @ weight.t(), rtol=2**-7, atol=1e-4)
