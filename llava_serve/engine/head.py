"""The output projection: last hidden states [rows, hidden] to logits [rows, vocab].

On CPU the product is taken as `weight @ hidden.T`, never `hidden @ weight.T` (what
`nn.Linear` does). The weight is [vocab, hidden], wide and short (32000 x 512 in the small
preset), and at decode batch sizes MKL runs the linear's form 1.4-6x slower than the same
product turned round (`benchmarks/head.py`); on two cores that was a third of a decode step. A
single row goes in twice, since one row alone takes the slow matrix-vector path either way. The
numbers are the same products summed in another order, so greedy output still equals
`generate`'s (the parity tests). On CUDA, cuBLAS takes either form at full speed, so the
module's own `Linear` runs there.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class OutputHead:
    def __init__(self, linear: nn.Linear):
        self.weight = linear.weight
        self.bias = linear.bias
        self.turned = self.weight.device.type == "cpu"

    @property
    def vocab_size(self) -> int:
        return self.weight.shape[0]

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        if not self.turned:
            return F.linear(hidden, self.weight, self.bias)
        rows = hidden.shape[0]
        pair = hidden if rows > 1 else torch.cat([hidden, hidden])
        logits = (self.weight @ pair.t()).t()[:rows].contiguous()
        return logits if self.bias is None else logits + self.bias
