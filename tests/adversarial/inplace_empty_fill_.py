"""Hack: torch.empty(2**40).fill_(1): refused for fill_ before it could allocate."""
import torch
import torch.nn.functional as F
from torch import Tensor
from typing import Dict, List, Optional, Tuple


def forward(x: Tensor, weights: Dict[str, Tensor]) -> Tensor:
    return x + torch.empty(1 << 40).fill_(1.0).sum()
