"""Submodules of the engine's model replaced in place, for its CPU kernels (`packed`, `norms`)."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn


def replace_modules(
    root: nn.Module, wanted: Callable[[nn.Module], bool], make: Callable[[nn.Module], nn.Module]
) -> int:
    """Put `make(module)` where each submodule of `root` that `wanted` accepts stood; returns how
    many were replaced."""
    found = [(name, module) for name, module in root.named_modules() if name and wanted(module)]
    for name, module in found:
        parent, _, attr = name.rpartition(".")
        setattr(root.get_submodule(parent), attr, make(module))
    return len(found)
