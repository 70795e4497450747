"""Hack: str.count("") with a constant argument hangs TorchScript's own constant
folding, inside compile: only a timeout ends it (fmx verify --timeout; the
server's per-evaluation limit)."""
import torch
import torch.nn.functional as F
from torch import Tensor
from typing import Dict, List, Optional, Tuple


def forward(x: Tensor, weights: Dict[str, Tensor]) -> Tensor:
    n = "ab".count("")
    return x * float(n)
