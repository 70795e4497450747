"""Hack: the right values tiled 512 times along the batch: a big output of the wrong shape."""
import torch
import torch.nn.functional as F
from torch import Tensor
from typing import Dict, List, Optional, Tuple


def forward(x: Tensor, weights: Dict[str, Tensor]) -> Tensor:
    gate = F.linear(x, weights["gate_proj.weight"])
    out = F.linear(F.silu(gate) * F.linear(x, weights["up_proj.weight"]), weights["down_proj.weight"])
    return out.repeat(512, 1, 1)
