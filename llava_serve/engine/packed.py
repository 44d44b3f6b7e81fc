"""The model's linear layers on CPU: oneDNN with each weight reordered once, and the decoder's
projections that read the same input fused.

A decode step with a few rows streams every weight from memory and does little arithmetic per
byte; with 16-32 rows it is a set of skinny matrix products. MKL's `nn.Linear` runs both poorly
(a matrix-vector path at 1-4 rows, and a general product tuned for large matrices after). oneDNN
with the weight reordered once into its blocked layout (`torch.ops.mkldnn._reorder_linear_weight`,
`_linear_pointwise`, the kernels inductor's CPU backend emits for frozen linears) reads it in the
order its kernel wants, at every row count: `benchmarks/decode_step.py` measures the whole step.

The vision tower and the projector are packed as they are (`pack_vision`): an image's patches
are a few hundred rows, where the kernel's choice matters as much: MKL picks its code by CPU
vendor and runs AVX2 on AMD's AVX-512 cores, where oneDNN's runs ~2.2x faster at 256-577 rows.
Where the engine's own kernels below are built, they run the image path (on an Intel AMX machine,
a CLIP-L/14 image at 336 px in 0.86x oneDNN's time in float32 and 0.89-0.91x in bfloat16;
`benchmarks/micro/vision_pack.py`).

Projections of the same input become one product: q, k and v of each attention layer, and the
gate and up projections of each MLP. The model's own modules still call `q_proj(x)`, `k_proj(x)`,
`v_proj(x)` in turn; each is a `Part` of one `Fused` product, which is computed on the first
call for an input and sliced for the others.

With the engine's ops built for this CPU (`kernels`), the decoder's products and the output head
run on the engine's own kernels instead, the weight laid out once for them and kept on 2 MB pages
(`memory`): float32 on AVX-512 as panels of 16 outputs (`kernels/products.cpp`), bfloat16 on AMX
as panels of whole weight tiles (`kernels/tiles.cpp`). Both stream the weights faster than oneDNN
at decode row counts (`benchmarks/decode_step.py`), and the tiles run prompt chunks faster too.

The packed weight replaces the layer's own (the memory is not held twice), so a model packed here
belongs to its engine: its arithmetic is the packed kernel's for every caller. Results are the
same products summed in another order, equal to float rounding; greedy parity with `generate` (on
an unpacked copy) is what the engine tests check.
"""

from __future__ import annotations

import torch
from torch import nn

from llava_serve.engine import memory
from llava_serve.engine.modules import replace_modules

# The row count the reorder is tuned for; any count runs on the packed weight.
ROWS_HINT = 16


def available(module: nn.Module) -> bool:
    """oneDNN is there and the weights are float32 or bfloat16 on the CPU."""
    weight = next(module.parameters(), None)
    return (
        weight is not None
        and torch.backends.mkldnn.is_available()
        and weight.device.type == "cpu"
        and weight.dtype in (torch.float32, torch.bfloat16)
    )


def kernel(ops, weight: torch.Tensor) -> str | None:
    """Which of the engine's ops (`kernels.load()`, or None) run products of this weight on the
    CPU: "panels" (float32, AVX-512), "tiles" (bfloat16, AMX), or None (oneDNN's)."""
    if ops is None or weight.device.type != "cpu":
        return None
    if weight.dtype == torch.float32 and ops.panel_width() > 0:
        return "panels"
    if weight.dtype == torch.bfloat16 and ops.tile_ready():
        return "tiles"
    return None


class PackedLinear(nn.Module):
    """`F.linear(x, weight, bias)` on a copy of `weight` laid out once for its kernel: the engine's
    (`ops` given: float32 panels on AVX-512, bfloat16 tiles on AMX), else oneDNN's reorder."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, ops=None):
        super().__init__()
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]
        self.dtype = weight.dtype
        self.kernel = kernel(ops, weight)
        self.ops = ops if self.kernel is not None else None
        if self.kernel == "panels":
            self.packed = memory.copy(ops.panel_pack(weight.detach()))
        elif self.kernel == "tiles":
            self.packed = memory.copy(ops.tile_pack(weight.detach()))
        else:
            self.packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), ROWS_HINT)
        self.bias = None if bias is None else bias.detach().clone()

    @classmethod
    def of(cls, *linears: nn.Linear, ops=None) -> PackedLinear:
        """One layer computing every one of `linears` (same input width) side by side."""
        weight = torch.cat([m.weight for m in linears])
        biases = [m.bias for m in linears]
        if all(b is None for b in biases):
            bias = None
        else:
            bias = torch.cat(
                [
                    b if b is not None else m.weight.new_zeros(m.out_features)
                    for m, b in zip(linears, biases, strict=True)
                ]
            )
        return cls(weight, bias, ops)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features)
        if self.kernel == "panels":
            out = self.ops.panel_linear(flat.contiguous(), self.packed, self.bias, self.out_features)
        elif self.kernel == "tiles":
            out = self.ops.tile_linear(flat.contiguous(), self.packed, self.bias, self.out_features)
        else:
            out = torch.ops.mkldnn._linear_pointwise(flat, self.packed, self.bias, "none", [], "")
        return out.reshape(*x.shape[:-1], self.out_features)


class Fused:
    """One product of several projections of the same input, handed out part by part."""

    def __init__(self, linear: PackedLinear, sizes: list[int]):
        self.linear, self.sizes = linear, sizes
        self._input: torch.Tensor | None = None  # held, so its identity cannot be reused
        self._parts: tuple[torch.Tensor, ...] = ()
        self._left = 0

    def part(self, x: torch.Tensor, index: int) -> torch.Tensor:
        if self._input is not x:
            self._parts, self._input, self._left = self.linear(x).split(self.sizes, -1), x, len(self.sizes)
        out = self._parts[index]
        self._left -= 1
        if self._left == 0:  # every part handed out: hold no activations
            self._input, self._parts = None, ()
        return out


class Part(nn.Module):
    """Stands where one of a `Fused` product's projections stood."""

    def __init__(self, fused: Fused, index: int, linear: nn.Linear):
        super().__init__()
        self.fused, self.index = fused, index
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fused.part(x, self.index)


# Groups of projections that read the same input, by the attribute names Llama, Mistral and
# Qwen2 use (the LLaVA family's language models).
GROUPS = (("self_attn", ("q_proj", "k_proj", "v_proj")), ("mlp", ("gate_proj", "up_proj")))


# The LLaVA family's image path, by the attribute names of its `*Model` (`model.model`).
VISION_PARTS = ("vision_tower", "multi_modal_projector")


def pack_linears(module: nn.Module, ops=None) -> int:
    """Pack every plain linear of `module` (for the engine's ops too, if given); returns how many."""
    if not available(module):
        return 0
    return replace_modules(
        module, lambda m: type(m) is nn.Linear, lambda m: PackedLinear(m.weight, m.bias, ops)
    )


def pack_vision(model: nn.Module, ops=None) -> int:
    """Pack the linears of a LLaVA-family model's vision tower and projector, for the engine's ops
    (`kernels.load()`) where given; returns how many."""
    parts = (getattr(model.model, name, None) for name in VISION_PARTS)
    return sum(pack_linears(part, ops) for part in parts if part is not None)


def pack_decoder(decoder: nn.Module, ops=None) -> int:
    """Fuse and pack every decoder layer's projections, and pack its other plain linears, for the
    engine's ops (`kernels.load()`) where given; returns how many products a layer's forward now
    runs (0: nothing was packed)."""
    if not available(decoder):
        return 0
    for layer in getattr(decoder, "layers", []):
        for owner_name, names in GROUPS:
            owner = getattr(layer, owner_name, None)
            linears = [getattr(owner, n, None) for n in names]
            if owner is None or not all(type(m) is nn.Linear for m in linears):
                continue
            fused = Fused(PackedLinear.of(*linears, ops=ops), [m.out_features for m in linears])
            setattr(owner, "fused_" + "_".join(names), fused.linear)  # a submodule, for .modules()
            for i, (name, linear) in enumerate(zip(names, linears, strict=True)):
                setattr(owner, name, Part(fused, i, linear))
    pack_linears(decoder, ops)
    layers = getattr(decoder, "layers", [])
    return sum(isinstance(m, PackedLinear) for m in layers[0].modules()) if len(layers) else 0
