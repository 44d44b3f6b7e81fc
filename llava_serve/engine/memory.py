"""Host memory for what every decode step streams (the packed weights, the KV slots), backed by
2 MB pages where the kernel allows it.

A decode step on CPU reads every weight of the model and every running row's keys and values
once, front to back: hundreds of megabytes, at whatever rate the memory gives. On 4 KB pages that
is a page walk every 4 KB, and the hardware prefetcher stops at each page's edge; the same sweep
over 2 MB pages reads ~25% faster on two Sapphire Rapids cores (23-25 GB/s -> 29-32,
`benchmarks/micro/step_kernels.py`). Linux backs an anonymous private mapping with huge pages
when it is advised to (`MADV_HUGEPAGE`), also where transparent huge pages are set to `madvise`,
the common default; torch's allocator never asks. Tensors here live in such a mapping, each its
own, aligned to 2 MB. Elsewhere (no `madvise`, huge pages set to `never`, a tensor under 2 MB)
they are ordinary memory, and only the speed differs.
"""

from __future__ import annotations

import math
import mmap

import torch

HUGE_PAGE = 2 << 20


def empty(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """An uninitialized CPU tensor, in memory advised for 2 MB pages where that can help."""
    nbytes = math.prod(shape) * dtype.itemsize
    advice = getattr(mmap, "MADV_HUGEPAGE", None)
    if nbytes < HUGE_PAGE or advice is None:
        return torch.empty(shape, dtype=dtype)
    # One page more than needed, so the tensor can start on a 2 MB boundary; advised before the
    # first touch, so the pages are huge from their first fault. The tensor holds the mapping.
    mapping = mmap.mmap(-1, nbytes + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    mapping.madvise(advice)
    raw = torch.frombuffer(mapping, dtype=torch.uint8)
    start = -raw.data_ptr() % HUGE_PAGE
    return raw[start : start + nbytes].view(dtype).view(shape)


def zeros(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device | str = "cpu") -> torch.Tensor:
    """Zeros, in memory advised for 2 MB pages on the host; on another device, torch's own."""
    if torch.device(device).type != "cpu":
        return torch.zeros(shape, dtype=dtype, device=device)
    return empty(shape, dtype).zero_()


def copy(tensor: torch.Tensor) -> torch.Tensor:
    """A contiguous copy of a CPU tensor, in memory advised for 2 MB pages."""
    return empty(tuple(tensor.shape), tensor.dtype).copy_(tensor)
