"""Hack: call aten through torch.ops (bypassing the resolver)."""
import torch
import torch.nn.functional as F
from torch import Tensor
from typing import Dict, List, Optional, Tuple


def forward(x: Tensor, weights: Dict[str, Tensor]) -> Tensor:
    return torch.ops.aten.add(x, x)
