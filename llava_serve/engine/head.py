"""The output projection: last hidden states [rows, hidden] to logits [rows, vocab].

On CPU the product is always taken turned round (`llava_serve.engine.linear.turned`): the weight
is [vocab, hidden], wide and short (32000 x 512 in the small preset), and MKL runs `nn.Linear`'s
form 1.2-6x slower at every decode batch size (`benchmarks/micro/head.py`); on two cores that was a
third of a decode step. On CUDA, cuBLAS takes either form at full speed, so the module's own
`Linear` runs there.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from llava_serve.engine.linear import turned


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
        return turned(hidden, self.weight, self.bias)
