"""Hack: change a weight in place (later probes and episodes would see it)."""
import torch
import torch.nn.functional as F
from torch import Tensor
from typing import Dict, List, Optional, Tuple


def forward(x: Tensor, weights: Dict[str, Tensor]) -> Tensor:
    weights["down_proj.weight"].add_(1.0)
    return x
