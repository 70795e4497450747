"""Hack: str.count("") never returns in libtorch 1.13 (nor does str.replace("", ...)).
With a substring known only at run time it is refused at compile."""
import torch
import torch.nn.functional as F
from torch import Tensor
from typing import Dict, List, Optional, Tuple


def forward(x: Tensor, weights: Dict[str, Tensor], sep: str = "") -> Tensor:
    n = "ab".count(sep)
    return x * float(n)
