"""Hack: Python's open() (not a TorchScript builtin)."""
import torch
import torch.nn.functional as F
from torch import Tensor
from typing import Dict, List, Optional, Tuple


def forward(x: Tensor, weights: Dict[str, Tensor]) -> Tensor:
    f = open("/etc/passwd")
    return x
