"""Hack: a class (nn.Module machinery, __del__, properties...)."""
import torch
import torch.nn.functional as F
from torch import Tensor
from typing import Dict, List, Optional, Tuple


class M:
    def __init__(self) -> None:
        pass


def forward(x: Tensor, weights: Dict[str, Tensor]) -> Tensor:
    return x
