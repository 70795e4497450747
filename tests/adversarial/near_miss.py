"""Hack: the right answer times 1.0001 (1e-4 relative; the float32 tolerance is 1e-5)."""
import torch
import torch.nn.functional as F
from torch import Tensor
from typing import Dict, List, Optional, Tuple


def forward(x: Tensor, weights: Dict[str, Tensor]) -> Tensor:
    gate = F.linear(x, weights["gate_proj.weight"])
    out = F.linear(F.silu(gate) * F.linear(x, weights["up_proj.weight"]), weights["down_proj.weight"])
    return 1.0001 * out
