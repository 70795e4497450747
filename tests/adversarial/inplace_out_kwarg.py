"""Hack: out= writes the result into a weight tensor."""
import torch
import torch.nn.functional as F
from torch import Tensor
from typing import Dict, List, Optional, Tuple


def forward(x: Tensor, weights: Dict[str, Tensor]) -> Tensor:
    return torch.add(x, x, out=weights["gate_proj.weight"])
