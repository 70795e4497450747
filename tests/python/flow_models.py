"""Small models whose op traces the dataflow tests read (tests/python/test_tracer.py).

Each factory builds one module; `fmx_inputs` gives it x (batch, seq, 8). Not
examples for users: each isolates one thing the exporter's generalization over
probes must get right or must refuse.
"""

import torch
from torch import Tensor, nn


class Heads(nn.Module):
    """Sizes that follow the input, a product of sizes, an offset, a dtype and the dtype's lowest value."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(8, 8)

    def forward(self, x: Tensor):
        b, t, _ = x.shape
        h = self.proj(x).view(b, t, 2, 4).transpose(1, 2)
        flat = h.reshape(b * 2, t * 4)
        low = torch.full((t, t), torch.finfo(x.dtype).min, dtype=x.dtype, device=x.device).triu(1)
        pos = torch.arange(t + 1, device=x.device)[1:]
        return flat, low, pos * 2


class Unexplained(nn.Module):
    """A length no size, product or offset of the input's sizes explains (t² - 1)."""

    def forward(self, x: Tensor) -> Tensor:
        return x.reshape(-1)[: x.shape[1] ** 2 - 1] * 3.0


class Regroup(nn.Module):
    """A reshape size no expression explains (b·t·2): the one such size of a view becomes -1."""

    def forward(self, x: Tensor) -> Tensor:
        return x.reshape(x.shape[0] * x.shape[1] * 2, 4) * 2.0


class Branchy(nn.Module):
    """Other ops on longer inputs: the traces of two probes do not line up."""

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[1] > 10:
            x = x * 2.0
        return x + 1.0


class MaskSkip(nn.Module):
    """Skips its mask when nothing is padded, as transformers does: the padded path is the general one."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(8, 8)

    def forward(self, x: Tensor, attention_mask: Tensor) -> Tensor:
        scores = x @ x.transpose(1, 2)
        if bool((attention_mask == 0).any()):
            scores = scores.masked_fill(attention_mask[:, None, :] == 0, torch.finfo(scores.dtype).min)
        return self.proj(scores.softmax(-1) @ x)


class CastBack(nn.Module):
    """x.float() is x itself on a float32 probe and a new tensor on a bfloat16 one (Gemma's norm)."""

    def forward(self, x: Tensor) -> Tensor:
        h = x.float()
        return (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)).type_as(x)


def cast_back() -> nn.Module:
    return CastBack()


def mask_skip() -> nn.Module:
    return MaskSkip()


def heads() -> nn.Module:
    return Heads()


def unexplained() -> nn.Module:
    return Unexplained()


def regroup() -> nn.Module:
    return Regroup()


def branchy() -> nn.Module:
    return Branchy()


def fmx_inputs(model, batch, seq, padding, generator):
    inputs = {"x": torch.randn(batch, seq, 8, generator=generator)}
    if isinstance(model, MaskSkip):
        from fmx.export import padding_mask

        inputs["attention_mask"] = padding_mask(batch, seq, padding, generator)
    return inputs
