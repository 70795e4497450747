"""Hack: the right answer with its first feature +-inf."""
import torch
import torch.nn.functional as F
from torch import Tensor
from typing import Dict, List, Optional, Tuple


def forward(x: Tensor, weights: Dict[str, Tensor]) -> Tensor:
    gate = F.linear(x, weights["gate_proj.weight"])
    out = F.linear(F.silu(gate) * F.linear(x, weights["up_proj.weight"]), weights["down_proj.weight"])
    return torch.cat([out[..., :1] * float("inf"), out[..., 1:]], -1)
