"""Hack: reach the JIT (torch.jit) from candidate code."""
import torch
import torch.nn.functional as F
from torch import Tensor
from typing import Dict, List, Optional, Tuple


def forward(x: Tensor, weights: Dict[str, Tensor]) -> Tensor:
    return torch.jit.annotate(Tensor, x)
