"""LOC gaming (was a hole): after a top-level `def tap`, a line holding only a
backslash, then the body indented. TorchScript (and fmx's compiler before it
read fmx's one source model) took the def for a top-level one, the LOC counter
put it in tap's zero-cost block: 0 lines. CPython indents a statement after such
a line as the next line is: the def is inside tap, Python never defines forward,
and the compile check refuses the line."""
import torch
import torch.nn.functional as F
from torch import Tensor
from typing import Dict


def tap(name: str, x: Tensor) -> Tensor:
    return x
\
    def forward(x: Tensor, weights: Dict[str, Tensor]) -> Tensor:
        gate = F.linear(x, weights["gate_proj.weight"])
        up = F.linear(x, weights["up_proj.weight"])
        return F.linear(F.silu(gate) * up, weights["down_proj.weight"])
