"""Hack: NaN everywhere (NaN never passes, whatever the tolerance)."""
import torch
import torch.nn.functional as F
from torch import Tensor
from typing import Dict, List, Optional, Tuple


def forward(x: Tensor, weights: Dict[str, Tensor]) -> Tensor:
    return torch.full_like(x, float("nan"))
