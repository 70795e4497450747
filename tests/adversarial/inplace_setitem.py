"""Hack: item assignment into the input (aten::copy_/index_put_ in the graph)."""
import torch
import torch.nn.functional as F
from torch import Tensor
from typing import Dict, List, Optional, Tuple


def forward(x: Tensor, weights: Dict[str, Tensor]) -> Tensor:
    x[0] = 0.0
    return x
