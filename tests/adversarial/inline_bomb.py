"""Hack: 25 helpers, each calling the next twice: 30 lines that inline to 2^25
copies (the op allowlist walks the inlined graph: minutes and gigabytes at
compile). Refused: a function may inline to at most 200,000 operations."""
import torch
import torch.nn.functional as F
from torch import Tensor
from typing import Dict, List, Optional, Tuple


def f0(x: Tensor) -> Tensor:
    return x + 1.0


def f1(x: Tensor) -> Tensor:
    return f0(f0(x))


def f2(x: Tensor) -> Tensor:
    return f1(f1(x))


def f3(x: Tensor) -> Tensor:
    return f2(f2(x))


def f4(x: Tensor) -> Tensor:
    return f3(f3(x))


def f5(x: Tensor) -> Tensor:
    return f4(f4(x))


def f6(x: Tensor) -> Tensor:
    return f5(f5(x))


def f7(x: Tensor) -> Tensor:
    return f6(f6(x))


def f8(x: Tensor) -> Tensor:
    return f7(f7(x))


def f9(x: Tensor) -> Tensor:
    return f8(f8(x))


def f10(x: Tensor) -> Tensor:
    return f9(f9(x))


def f11(x: Tensor) -> Tensor:
    return f10(f10(x))


def f12(x: Tensor) -> Tensor:
    return f11(f11(x))


def f13(x: Tensor) -> Tensor:
    return f12(f12(x))


def f14(x: Tensor) -> Tensor:
    return f13(f13(x))


def f15(x: Tensor) -> Tensor:
    return f14(f14(x))


def f16(x: Tensor) -> Tensor:
    return f15(f15(x))


def f17(x: Tensor) -> Tensor:
    return f16(f16(x))


def f18(x: Tensor) -> Tensor:
    return f17(f17(x))


def f19(x: Tensor) -> Tensor:
    return f18(f18(x))


def f20(x: Tensor) -> Tensor:
    return f19(f19(x))


def f21(x: Tensor) -> Tensor:
    return f20(f20(x))


def f22(x: Tensor) -> Tensor:
    return f21(f21(x))


def f23(x: Tensor) -> Tensor:
    return f22(f22(x))


def f24(x: Tensor) -> Tensor:
    return f23(f23(x))


def f25(x: Tensor) -> Tensor:
    return f24(f24(x))


def forward(x: Tensor, weights: Dict[str, Tensor]) -> Tensor:
    return f25(x)
