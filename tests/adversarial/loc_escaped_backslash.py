"""LOC gaming guard: a string ending in an escaped backslash (it ends there) and
a line holding only a backslash before a top-level def (CPython: top level, the
next line is at column 0). The def is code and counts; the compile check refuses
the backslash line (TorchScript can indent what follows differently)."""
import torch
import torch.nn.functional as F
from torch import Tensor
from typing import Dict


def tap(name: str, x: Tensor) -> Tensor:
    return x


SEP = 'ends in a backslash \\'
\
def forward(x: Tensor, weights: Dict[str, Tensor]) -> Tensor:
    gate = F.linear(x, weights["gate_proj.weight"])
    up = F.linear(x, weights["up_proj.weight"])
    return F.linear(F.silu(gate) * up, weights["down_proj.weight"])
