"""The output projection: last hidden states [rows, hidden] to logits [rows, vocab].

On CPU the weight is [vocab, hidden], wide and short (32000 x 512 in the small preset), and MKL
runs `nn.Linear`'s form on it several times slower than oneDNN on a prepacked copy of the weight
(`engine.packed`) at decode batch sizes (`benchmarks/decode_step.py` measures the whole step). The
original weight stays: it may be tied to the input embeddings. On CUDA, and where oneDNN cannot
take the weight, the module's own `Linear` runs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from llava_serve.engine import packed


class OutputHead:
    def __init__(self, linear: nn.Linear, ops=None):
        self.weight = linear.weight
        self.bias = linear.bias
        usable = packed.available(linear) or packed.kernel(ops, linear.weight) is not None
        self.packed = packed.PackedLinear(linear.weight, linear.bias, ops) if usable else None

    @property
    def vocab_size(self) -> int:
        return self.weight.shape[0]

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.packed is not None:
            return self.packed(hidden)
        return F.linear(hidden, self.weight, self.bias)
