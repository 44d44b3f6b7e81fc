"""Linear layers at decode batch sizes on CPU: `weight @ x.T` instead of `x @ weight.T`.

A decode step with a few rows streams every weight from memory once and does little else, so
its speed is the bandwidth a matrix product reaches. On CPU, MKL runs `nn.Linear`'s form
(`x @ weight.T`) for 1-4 rows on a matrix-vector path at ~10 GB/s here, while the same product
turned round (`(weight @ x.T).T`, with a lone row doubled so it is a matrix) takes its general
product at 24-29 GB/s, on one thread or two (weights streamed from memory, as in a step). The results
are the same products summed in another order (equal to float rounding), so greedy output still
equals `generate`'s (the parity tests). Past ~8 rows the product is compute-bound and the two
forms run level, so the layer falls back to its own `forward`; on CUDA, cuBLAS takes either
form at full speed and nothing is wrapped.

The wrappers turn only inside `turned_linears()`, which the runner enters around its own
forward passes: any other caller of the same model (e.g. `generate` in the parity tests) gets
the layers' own arithmetic, bit for bit.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

import torch
from torch import nn

# Rows up to which the turned form runs. A decode step of the small preset on two cores
# (`benchmarks/micro/head.py`): 1.4-1.8x faster at 1-4 rows, 1.04-1.17x at 5-8, slower from 12.
MAX_TURNED_ROWS = 8

_state = threading.local()


def turned(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`F.linear(x, weight, bias)` for x [rows, in], computed as `(weight @ x.T).T`."""
    rows = x.shape[0]
    pair = x if rows > 1 else torch.cat([x, x])  # one row alone takes the matrix-vector path again
    out = (weight @ pair.t()).t()[:rows].contiguous()
    return out if bias is None else out + bias


@contextlib.contextmanager
def turned_linears() -> Iterator[None]:
    """Within this block, on this thread, wrapped layers given few rows run turned round."""
    _state.on = True
    try:
        yield
    finally:
        _state.on = False


class RowsFirstLinear(nn.Module):
    """An `nn.Linear` that runs turned round for few rows inside `turned_linears()`."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.linear = linear

    # Read by code that inspects a layer (its dtype, whether it has a bias).
    @property
    def weight(self) -> torch.Tensor:
        return self.linear.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        width = x.shape[-1]
        if not getattr(_state, "on", False) or x.numel() > MAX_TURNED_ROWS * width:
            return self.linear(x)
        out = turned(x.reshape(-1, width), self.linear.weight, self.linear.bias)
        return out.reshape(*x.shape[:-1], out.shape[-1])


def wrap_linears(module: nn.Module) -> int:
    """Wrap every plain CPU `nn.Linear` under `module` (once; wrapping again is a no-op); returns
    how many layers are wrapped. Subclasses (quantized layers) are left alone."""
    wrapped = {f"{name}.linear" for name, m in module.named_modules() if isinstance(m, RowsFirstLinear)}
    targets = [
        (name, child)
        for name, child in module.named_modules()
        if type(child) is nn.Linear and child.weight.device.type == "cpu" and name not in wrapped
    ]
    for name, child in targets:
        parent, _, attr = name.rpartition(".")
        setattr(module.get_submodule(parent), attr, RowsFirstLinear(child))
    return sum(isinstance(m, RowsFirstLinear) for m in module.modules())
