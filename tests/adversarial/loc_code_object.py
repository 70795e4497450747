"""Hack: a function whose code object is swapped at run time for one
compiled from a string hidden in a constant (no exec or eval by name)."""
import torch

SRC = "import torch.nn.functional as F\ndef forward(x, weights):\n    return F.linear(F.silu(F.linear(x, weights['gate_proj.weight'])) * F.linear(x, weights['up_proj.weight']), weights['down_proj.weight'])\n"


def forward(x, weights):
    make = getattr(torch.__builtins__["__import__"]("types"), "FunctionType")
    code = torch.__builtins__["compile"](SRC, "mlp.py", "exec")
    scope = {}
    make(code, scope)()
    return scope["forward"](x, weights)
