"""LOC gaming (was a hole): a constant `__name__ = "__main__"` makes a NESTED
`if __name__ == "__main__":` run, and the counter skipped such blocks at any
indentation (0 lines for the whole body). Only top-level ones count zero now
(the engine drops only those)."""
import torch
import torch.nn.functional as F
from torch import Tensor
from typing import Dict, List, Optional, Tuple


__name__ = "__main__"


def forward(x: Tensor, weights: Dict[str, Tensor]) -> Tensor:
    if __name__ == "__main__":
        gate = F.linear(x, weights["gate_proj.weight"])
        up = F.linear(x, weights["up_proj.weight"])
        return F.linear(F.silu(gate) * up, weights["down_proj.weight"])
    return x
