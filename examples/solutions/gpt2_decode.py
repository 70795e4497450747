"""GPT2LMHeadModel (examples/models/gpt2.py, tiny default config) with a KV cache:
fmx's reference solution for the pack's decode task, in the candidate language.

The flat cache convention (docs/pack-format.md, "Generation"): `forward` takes
the new tokens `input_ids` (B, T), their `positions` (B, T), the `attention_mask`
(B, past + T) keep flags of every token so far, and per layer one key and one
value tensor (B, heads, past, head_dim) in the lists `past_keys` and
`past_values` (length 0 on the prefill); it returns the logits (B, T, vocab) and
the updated lists. A decode step is the full forward's layer code
(examples/solutions/gpt2.py) with the new keys and values appended to the cache;
learned position embeddings are looked up at `positions`.
"""
import math
import torch
import torch.nn.functional as F
from torch import Tensor
from typing import Dict, List, Tuple

N_LAYERS = 2
N_HEADS = 4
EPS = 1e-5


def tap(name: str, x: Tensor) -> Tensor:
    return x


def layer_norm(x: Tensor, weights: Dict[str, Tensor], prefix: str) -> Tensor:
    return F.layer_norm(x, [x.shape[-1]], weights[prefix + "weight"], weights[prefix + "bias"], EPS)


def conv1d(x: Tensor, weights: Dict[str, Tensor], prefix: str) -> Tensor:
    # y = x @ W + b with W stored (in, out); addmm rounds once, as the model's does
    y = torch.addmm(weights[prefix + "bias"], x.reshape(-1, x.shape[-1]), weights[prefix + "weight"])
    return y.unflatten(0, x.shape[:-1])


def gelu_new(x: Tensor) -> Tensor:
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


def finfo_min(x: Tensor) -> Tensor:
    return torch.full([], float("-inf"), dtype=x.dtype, device=x.device).nan_to_num()


def attention(x: Tensor, mask: Tensor, past_k: Tensor, past_v: Tensor, weights: Dict[str, Tensor],
              prefix: str) -> Tuple[Tensor, Tensor, Tensor]:
    B, T, C = x.shape
    q, k, v = conv1d(x, weights, prefix + "c_attn.").split(C, dim=2)
    q = q.view(B, T, N_HEADS, -1).permute(0, 2, 1, 3)
    # the cache: (B, heads, past + T, head_dim)
    k = torch.cat((past_k, k.view(B, T, N_HEADS, -1).permute(0, 2, 1, 3)), dim=2)
    v = torch.cat((past_v, v.view(B, T, N_HEADS, -1).permute(0, 2, 1, 3)), dim=2)
    L = k.shape[2]
    scores = torch.matmul(q, k.transpose(-1, -2))
    scores = scores / torch.full([], v.shape[-1] ** 0.5, dtype=q.dtype, device=q.device)
    # causal: query t sits at L - T + t (the bool `bias` buffer, offset by the past)
    scores = torch.where(weights[prefix + "bias"][:, :, L - T:L, :L], scores, finfo_min(scores))
    probs = F.softmax(scores + mask, dim=-1)
    out = torch.matmul(probs, v).permute(0, 2, 1, 3).reshape(B, T, C)
    return conv1d(out, weights, prefix + "c_proj."), k, v


def forward(input_ids: Tensor, positions: Tensor, attention_mask: Tensor, past_keys: List[Tensor],
            past_values: List[Tensor], weights: Dict[str, Tensor]):
    h = F.embedding(input_ids, weights["transformer.wte.weight"])
    h = h + F.embedding(positions, weights["transformer.wpe.weight"])
    # (B, past + T) keep flags -> additive (B, 1, 1, past + T): 0 keep, finfo(dtype).min padding
    mask = (1.0 - attention_mask[:, None, None, :].to(h.dtype)) * finfo_min(h)
    keys, values = [], []
    for i in range(N_LAYERS):
        p = "transformer.h.{}.".format(i)
        a, k, v = attention(layer_norm(h, weights, p + "ln_1."), mask, past_keys[i], past_values[i],
                            weights, p + "attn.")
        h = a + h
        x = gelu_new(conv1d(layer_norm(h, weights, p + "ln_2."), weights, p + "mlp.c_fc."))
        h = h + conv1d(x, weights, p + "mlp.c_proj.")
        h = tap("transformer.h.{}".format(i), h)
        keys.append(k)
        values.append(v)
    h = layer_norm(h, weights, "transformer.ln_f.")
    return F.linear(h, weights["lm_head.weight"]), keys, values
