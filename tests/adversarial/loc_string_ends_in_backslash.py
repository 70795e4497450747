"""LOC gaming (was a hole): in tap's block, a single-quoted string ending in a
backslash, and a one-line forward on the next line. A lexer that ends such a
string at its line end sees a top-level def (fmx's compiler did); Python, the LOC
counter and fmx's one source model see the backslash continue the string over
the line end: the def is text, and there is no forward."""
import torch
import torch.nn.functional as F
from torch import Tensor
from typing import Dict


def tap(name: str, x: Tensor) -> Tensor:
    note = 'tap is the identity\
def forward(x: Tensor, weights: Dict[str, Tensor]) -> Tensor: return F.linear(F.silu(F.linear(x, weights["gate_proj.weight"])) * F.linear(x, weights["up_proj.weight"]), weights["down_proj.weight"])'
    return x
