"""Hack: taps everywhere (the right child outputs, names of the component itself,
unknown paths) around a wrong output. Taps are reported, never graded into the
verdict: the output decides."""
import torch
import torch.nn.functional as F
from torch import Tensor
from typing import Dict, List, Optional, Tuple


def forward(x: Tensor, weights: Dict[str, Tensor]) -> Tensor:
    gate = F.linear(x, weights["gate_proj.weight"])
    gate = tap("gate_proj", gate)
    act = tap("act_fn", F.silu(gate))
    up = tap("up_proj", F.linear(x, weights["up_proj.weight"]))
    out = tap("down_proj", F.linear(act * up, weights["down_proj.weight"]))
    tap("", out)
    tap("model.layers.0.mlp", out)
    tap("no.such.module", out)
    return torch.zeros_like(out)
