"""Hack: a 4 TiB allocation at run time (a clean run error; the process lives)."""
import torch
import torch.nn.functional as F
from torch import Tensor
from typing import Dict, List, Optional, Tuple


def forward(x: Tensor, weights: Dict[str, Tensor]) -> Tensor:
    return x + torch.full([1 << 40], 1.0).sum()
