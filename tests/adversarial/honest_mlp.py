"""The honest Qwen2MLP, one statement per step: the LOC baseline of the MLP cases."""
import torch
import torch.nn.functional as F
from torch import Tensor
from typing import Dict, List, Optional, Tuple


def forward(x: Tensor, weights: Dict[str, Tensor]) -> Tensor:
    gate = F.linear(x, weights["gate_proj.weight"])
    up = F.linear(x, weights["up_proj.weight"])
    return F.linear(F.silu(gate) * up, weights["down_proj.weight"])
