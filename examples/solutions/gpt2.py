"""GPT2LMHeadModel (examples/models/gpt2.py, tiny default config) as flat
functional PyTorch: fmx's reference solution, written in the candidate language.

Every entry takes its module's forward inputs by name plus `weights` keyed
relative to that module's path (entries listed in gpt2.entries.json). The
trailing `prefix` (default "") lets a parent hand its own dict to a child:
`layer_norm(h, weights, "transformer.ln_f.")`. It matches the model in float32
and in bfloat16 on the same torch build: Conv1D is addmm with the (in, out)
weight, gelu_new is the tanh formula written out, softmax runs in the
activation dtype, masks use finfo(dtype).min. Dropout is the identity (eval).
Under TorchScript, run with graph-executor optimizations off: its DecomposeOps
pass splits addmm into mm + add, which rounds twice (~6e-2 off in bfloat16).
"""
import math
import torch
import torch.nn.functional as F
from torch import Tensor
from typing import Dict

N_LAYERS = 2
N_HEADS = 4
EPS = 1e-5


def tap(name: str, x: Tensor) -> Tensor:
    return x


def linear(input: Tensor, weights: Dict[str, Tensor]) -> Tensor:
    return F.linear(input, weights["weight"], weights.get("bias"))


def embedding(input: Tensor, weights: Dict[str, Tensor]) -> Tensor:
    return F.embedding(input, weights["weight"])


def dropout(input: Tensor) -> Tensor:
    return input


def layer_norm(input: Tensor, weights: Dict[str, Tensor], prefix: str = "") -> Tensor:
    return F.layer_norm(input, [input.shape[-1]], weights[prefix + "weight"],
                        weights[prefix + "bias"], EPS)


def conv1d(x: Tensor, weights: Dict[str, Tensor], prefix: str = "") -> Tensor:
    # y = x @ W + b with W stored (in, out); addmm rounds once, as the model's does
    x2d = x.reshape(-1, x.shape[-1])
    y = torch.addmm(weights[prefix + "bias"], x2d, weights[prefix + "weight"])
    return y.unflatten(0, x.shape[:-1])


def gelu_new(input: Tensor) -> Tensor:
    inner = math.sqrt(2.0 / math.pi) * (input + 0.044715 * torch.pow(input, 3.0))
    return 0.5 * input * (1.0 + torch.tanh(inner))


def mlp(hidden_states: Tensor, weights: Dict[str, Tensor], prefix: str = "") -> Tensor:
    x = gelu_new(conv1d(hidden_states, weights, prefix + "c_fc."))
    return conv1d(x, weights, prefix + "c_proj.")


def finfo_min(x: Tensor) -> Tensor:
    # torch.finfo(x.dtype).min as a 0-d tensor (TorchScript has no torch.finfo)
    return torch.full([], float("-inf"), dtype=x.dtype, device=x.device).nan_to_num()


def attention(hidden_states: Tensor, attention_mask: Tensor, weights: Dict[str, Tensor],
              prefix: str = "") -> Tensor:
    B, T, C = hidden_states.shape
    # fused projection -> q, k, v each (B, heads, T, head_dim)
    q, k, v = conv1d(hidden_states, weights, prefix + "c_attn.").split(C, dim=2)
    q = q.view(B, T, N_HEADS, -1).permute(0, 2, 1, 3)
    k = k.view(B, T, N_HEADS, -1).permute(0, 2, 1, 3)
    v = v.view(B, T, N_HEADS, -1).permute(0, 2, 1, 3)
    scores = torch.matmul(q, k.transpose(-1, -2))
    scores = scores / torch.full([], v.shape[-1] ** 0.5, dtype=q.dtype, device=q.device)
    # causal: the bool `bias` buffer; padding: the additive (B, 1, 1, T) attention_mask
    scores = torch.where(weights[prefix + "bias"][:, :, :T, :T], scores, finfo_min(scores))
    probs = F.softmax(scores + attention_mask, dim=-1)
    out = torch.matmul(probs, v).permute(0, 2, 1, 3).reshape(B, T, C)
    return conv1d(out, weights, prefix + "c_proj.")


def block(hidden_states: Tensor, attention_mask: Tensor, weights: Dict[str, Tensor],
          prefix: str = "") -> Tensor:
    x = layer_norm(hidden_states, weights, prefix + "ln_1.")
    h = attention(x, attention_mask, weights, prefix + "attn.") + hidden_states
    return h + mlp(layer_norm(h, weights, prefix + "ln_2."), weights, prefix + "mlp.")


def transformer(input_ids: Tensor, attention_mask: Tensor, weights: Dict[str, Tensor],
                prefix: str = "") -> Tensor:
    pos = torch.arange(input_ids.shape[1], device=input_ids.device)[None, :]
    h = F.embedding(input_ids, weights[prefix + "wte.weight"])
    h = h + F.embedding(pos, weights[prefix + "wpe.weight"])
    # (B, T) keep flags -> additive (B, 1, 1, T): 0 keep, finfo(dtype).min padding
    mask = (1.0 - attention_mask[:, None, None, :].to(h.dtype)) * finfo_min(h)
    for i in range(N_LAYERS):
        h = block(h, mask, weights, prefix + "h.{}.".format(i))
        h = tap("transformer.h.{}".format(i), h)
    return layer_norm(h, weights, prefix + "ln_f.")


def forward(input_ids: Tensor, attention_mask: Tensor, weights: Dict[str, Tensor]) -> Tensor:
    h = transformer(input_ids, attention_mask, weights, "transformer.")
    return F.linear(h, weights["lm_head.weight"])
