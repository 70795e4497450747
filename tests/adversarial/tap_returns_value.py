"""Hack: a top-level `def tap` that does the work (SiLU), in the hope that its body
counts zero lines and still runs. fmx replaces tap by its recording identity: the
SiLU never happens, so the output is wrong."""
import torch
import torch.nn.functional as F
from torch import Tensor
from typing import Dict, List, Optional, Tuple


def tap(name: str, x: Tensor) -> Tensor:
    return F.silu(x)


def forward(x: Tensor, weights: Dict[str, Tensor]) -> Tensor:
    gate = tap("act_fn", F.linear(x, weights["gate_proj.weight"]))
    return F.linear(gate * F.linear(x, weights["up_proj.weight"]), weights["down_proj.weight"])
