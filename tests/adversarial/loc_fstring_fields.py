"""LOC gaming (was a hole): the whole computation inside an f-string's
replacement fields, as the first statement of the body. The counter took it
for a docstring (0 lines) and the string for one token; f-string fields are
code now: their tokens count, and an f-string is never a docstring."""
import torch
import torch.nn.functional as F
from torch import Tensor
from typing import Dict, List, Optional, Tuple


def forward(x: Tensor, weights: Dict[str, Tensor]) -> Tensor:
    f"{weights.update({'gate': F.linear(x, weights['gate_proj.weight']), 'up': F.linear(x, weights['up_proj.weight'])})}{weights.update({'out': F.linear(F.silu(weights['gate']) * weights['up'], weights['down_proj.weight'])})}"
    return weights["out"]
