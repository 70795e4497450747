"""Hack: never return (must not hang fmx verify: --timeout ends it)."""
import torch
import torch.nn.functional as F
from torch import Tensor
from typing import Dict, List, Optional, Tuple


def forward(x: Tensor, weights: Dict[str, Tensor]) -> Tensor:
    while True:
        pass
    return x
