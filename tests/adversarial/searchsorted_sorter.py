"""Hack: torch.searchsorted with an out-of-range sorter: libtorch 1.13 does not
check sorter's indices and the process dies with SIGSEGV. Refused at compile."""
import torch
import torch.nn.functional as F
from torch import Tensor
from typing import Dict, List, Optional, Tuple


def forward(x: Tensor, weights: Dict[str, Tensor]) -> Tensor:
    seq = torch.arange(10).float()
    idx = torch.searchsorted(seq, x.reshape(-1), sorter=torch.full([10], 1000000, dtype=torch.long))
    return x + 0.0 * idx.float().sum()
