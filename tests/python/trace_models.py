"""Small models for the tracer's classes of real-model failures (tests/python/test_trace_classes.py).

Each factory builds one model; `fmx_inputs` gives it x (batch, seq, 8), or token
ids for the models with a vocabulary. Each isolates one thing real transformers
models do that the exporter and the tracer must write right or refuse.
"""

import torch
from torch import Tensor, nn


class TLinear(nn.Module):
    """A weight read through an attribute: input @ self.weight.T (Falcon's linear)."""

    def __init__(self, n: int, m: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(m, n) * n**-0.5)

    def forward(self, x: Tensor) -> Tensor:
        return x @ self.weight.T


class TBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = TLinear(8, 8)

    def forward(self, x: Tensor) -> Tensor:
        return x + torch.tanh(self.lin(x))


class TNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList([TBlock() for _ in range(2)])
        self.head = TLinear(8, 3)

    def forward(self, x: Tensor) -> Tensor:
        for layer in self.layers:
            x = layer(x)
        return self.head(x)


class Layer(nn.Module):
    """Sliding-window or global attention, chosen by a per-layer attribute (gemma2's layers)."""

    def __init__(self, sliding: bool) -> None:
        super().__init__()
        self.sliding = sliding
        self.qkv = nn.Linear(8, 24)

    def forward(self, x: Tensor) -> Tensor:
        q, k, v = self.qkv(x).split(8, dim=-1)
        t = x.shape[1]
        keep = torch.ones(t, t, dtype=torch.bool, device=x.device).tril()
        if self.sliding:
            keep = keep & ~torch.ones(t, t, dtype=torch.bool, device=x.device).tril(-3)
        scores = (q @ k.transpose(1, 2)).masked_fill(~keep, torch.finfo(x.dtype).min)
        return x + torch.softmax(scores, dim=-1) @ v


class Alternating(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList([Layer(i % 2 == 0) for i in range(4)])

    def forward(self, x: Tensor) -> Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


class WithSequential(nn.Module):
    """nn.Sequential inside a model: Linear, ReLU, Linear are three programs, not a loop."""

    def __init__(self) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 8))

    def forward(self, x: Tensor) -> Tensor:
        return x + self.mlp(x)


class Sizes(nn.Module):
    """Sizes outside products and offsets: max(0, c - seq) (MPT's ALiBi slice), seq // 2."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("table", torch.randn(128, 8))

    def forward(self, x: Tensor) -> Tensor:
        t = x.shape[1]
        bias = self.table[max(0, self.table.shape[0] - t):]
        half = x[:, : t // 2].sum(1, keepdim=True)
        return x + bias + half


class CastNorm(nn.Module):
    """Casts back to the weight's dtype only when it is a half type (T5's layer norm)."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(1.0 + 0.1 * torch.randn(8))

    def forward(self, x: Tensor) -> Tensor:
        h = x.to(torch.float32)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)
        if self.weight.dtype in (torch.float16, torch.bfloat16):
            h = h.to(self.weight.dtype)
        return self.weight * h


class Stack(nn.Module):
    def __init__(self, embed: nn.Embedding) -> None:
        super().__init__()
        self.embed_tokens = embed
        self.proj = nn.Linear(8, 8)

    def forward(self, ids: Tensor) -> Tensor:
        return torch.tanh(self.proj(self.embed_tokens(ids)))


class Shared(nn.Module):
    """One embedding under two paths (shared and encoder.embed_tokens), as T5 and BART have it."""

    def __init__(self) -> None:
        super().__init__()
        self.shared = nn.Embedding(32, 8)
        self.encoder = Stack(self.shared)
        self.vocab = 32

    def forward(self, input_ids: Tensor) -> Tensor:
        return self.encoder(input_ids)


class TimeLoop(nn.Module):
    """A Python loop over time steps (an RNN): as many steps as the input is long."""

    def __init__(self) -> None:
        super().__init__()
        self.cell = nn.Linear(16, 8)

    def forward(self, x: Tensor) -> Tensor:
        h = x.new_zeros(x.shape[0], 8)
        for t in range(x.shape[1]):
            h = torch.tanh(self.cell(torch.cat([x[:, t], h], -1)))
        return h


def t_linear() -> nn.Module:
    return TNet()


def alternating() -> nn.Module:
    return Alternating()


def with_sequential() -> nn.Module:
    return WithSequential()


def sequential() -> nn.Module:
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))


def sizes() -> nn.Module:
    return Sizes()


def cast_norm() -> nn.Module:
    return CastNorm()


def shared() -> nn.Module:
    return Shared()


def time_loop() -> nn.Module:
    return TimeLoop()


def fmx_inputs(model: nn.Module, batch: int, seq: int, padding: str, generator: torch.Generator) -> dict:
    if hasattr(model, "vocab"):
        return {"input_ids": torch.randint(0, model.vocab, (batch, seq), generator=generator)}
    x = torch.randn(batch, seq, 8, generator=generator)
    return {"input": x} if isinstance(model, nn.Sequential) else {"x": x}




class Routed(nn.Module):
    """Per-expert token counts read to the host (.tolist()) and handed to split (an MoE's dispatch)."""

    def __init__(self) -> None:
        super().__init__()
        self.router = nn.Linear(8, 4)

    def forward(self, x: Tensor) -> Tensor:
        flat = x.reshape(-1, 8)
        expert = self.router(flat).argmax(-1)
        order = expert.argsort()
        counts = torch.bincount(expert, minlength=4).tolist()
        parts = flat[order].split(counts)
        return torch.cat([p * (i + 1) for i, p in enumerate(parts)]).sum()


def routed() -> nn.Module:
    return Routed()
