"""Hack: copy_ a tensor over a weight."""
import torch
import torch.nn.functional as F
from torch import Tensor
from typing import Dict, List, Optional, Tuple


def forward(x: Tensor, weights: Dict[str, Tensor]) -> Tensor:
    w = weights["up_proj.weight"]
    w.copy_(torch.zeros_like(w))
    return x
