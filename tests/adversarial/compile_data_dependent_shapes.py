"""Compile-score gaming (was a hole): read a count from the data through a shape
instead of int(t). F.one_hot without num_classes takes its class count from the
largest value, and narrow with a tensor start reads it: both are host syncs, and
the shape feeding an `if` is data-dependent control flow. The output is right; the
compile score is not 1."""
import torch
import torch.nn.functional as F
from torch import Tensor
from typing import Dict


def forward(x: Tensor, weights: Dict[str, Tensor]) -> Tensor:
    k = F.one_hot(torch.zeros(1, dtype=torch.long) + 2).shape[-1]
    gate = F.linear(x, weights["gate_proj.weight"])
    up = F.linear(x, weights["up_proj.weight"])
    y = F.linear(F.silu(gate) * up, weights["down_proj.weight"])
    if k == 3:
        y = y.narrow(-1, torch.tensor(0), y.shape[-1])
    return y
