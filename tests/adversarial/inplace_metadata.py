"""Hack: in-place metadata change (unsqueeze_) of a weight."""
import torch
import torch.nn.functional as F
from torch import Tensor
from typing import Dict, List, Optional, Tuple


def forward(x: Tensor, weights: Dict[str, Tensor]) -> Tensor:
    weights["up_proj.weight"].unsqueeze_(0)
    return x
