"""LOC gaming (was a hole): after a top-level `def tap`, lines that start with a
carriage return. TorchScript takes a lone CR for a space, so `\rdef forward` is a
top-level def; the LOC counter took it for an indented line of the tap block
(zero lines for the whole file). Control characters are refused at compile now,
and the counter ends a line at a lone CR, as Python does."""
import torch
import torch.nn.functional as F
from torch import Tensor
from typing import Dict


def tap(name: str, x: Tensor) -> Tensor:
    return x


def forward(x: Tensor, weights: Dict[str, Tensor]) -> Tensor:
    gate = F.linear(x, weights["gate_proj.weight"])
    up = F.linear(x, weights["up_proj.weight"])
    return F.linear(F.silu(gate) * up, weights["down_proj.weight"])
