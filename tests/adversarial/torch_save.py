"""Hack: write the inputs to disk (exfiltration)."""
import torch
import torch.nn.functional as F
from torch import Tensor
from typing import Dict, List, Optional, Tuple


def forward(x: Tensor, weights: Dict[str, Tensor]) -> Tensor:
    torch.save(x, "/tmp/fmx-leak.pt")
    return x
