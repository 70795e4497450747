"""Hack: try the hidden code first, and if fmx refuses it, fall back to
the honest one: the refusal must fail the evaluation even when caught."""
import torch
import torch.nn.functional as F


def forward(x, weights):
    try:
        torch.__builtins__["exec"]("y = 1")
    except Exception:
        pass
    g = F.linear(x, weights["gate_proj.weight"])
    u = F.linear(x, weights["up_proj.weight"])
    return F.linear(F.silu(g) * u, weights["down_proj.weight"])
