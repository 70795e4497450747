"""Hack: unbounded recursion (TorchScript refuses recursive functions at compile)."""
import torch
import torch.nn.functional as F
from torch import Tensor
from typing import Dict, List, Optional, Tuple


def f(x: Tensor, n: int) -> Tensor:
    return f(x, n + 1)


def forward(x: Tensor, weights: Dict[str, Tensor]) -> Tensor:
    return f(x, 0)
