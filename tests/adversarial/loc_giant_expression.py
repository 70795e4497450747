"""LOC gaming: one giant return expression. A statement counts once per 48
tokens started, so this costs ceil(tokens / 48) lines, not 1."""
import torch
import torch.nn.functional as F
from torch import Tensor
from typing import Dict, List, Optional, Tuple


def forward(x: Tensor, weights: Dict[str, Tensor]) -> Tensor:
    return F.linear(F.silu(F.linear(x, weights["gate_proj.weight"])) * F.linear(x, weights["up_proj.weight"]), weights["down_proj.weight"]) + 0.0 * (F.linear(F.silu(F.linear(x, weights["gate_proj.weight"])) * F.linear(x, weights["up_proj.weight"]), weights["down_proj.weight"]) - F.linear(F.silu(F.linear(x, weights["gate_proj.weight"])) * F.linear(x, weights["up_proj.weight"]), weights["down_proj.weight"]))
