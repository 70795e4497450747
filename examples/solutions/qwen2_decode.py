"""Qwen2ForCausalLM (examples/models/qwen2.py, tiny default config) with a KV cache:
fmx's reference solution for the pack's decode task, in the candidate language.

The flat cache convention (docs/pack-format.md, "Generation"): `forward` takes
the new tokens `input_ids` (B, T), their `positions` (B, T), the `attention_mask`
(B, past + T) keep flags of every token so far, and per layer one key and one
value tensor (B, kv_heads, past, head_dim) in the lists `past_keys` and
`past_values` (length 0 on the prefill); it returns the logits (B, T, vocab) and
the updated lists. A decode step is the same layer code as the full forward
(examples/solutions/qwen2.py) with the cache appended after the rotary
embedding. Greedy generation: call it on the prompt, then on each argmax token
with positions + 1, the mask extended by a one and the cache it returned.
Qwen2.5-0.5B: N_LAYERS = 24, N_HEADS = 14, ROPE_THETA = 1000000.0.
"""
import torch
import torch.nn.functional as F
from torch import Tensor
from typing import Dict, List, Tuple

N_LAYERS = 2
N_HEADS = 4
N_KV_HEADS = 2
EPS = 1e-6
ROPE_THETA = 10000.0
WINDOW = 0  # the config's sliding_window (0: none): a layer attends to and keeps its last WINDOW


def tap(name: str, x: Tensor) -> Tensor:
    return x


def linear(x: Tensor, weights: Dict[str, Tensor], prefix: str) -> Tensor:
    return F.linear(x, weights[prefix + "weight"], weights.get(prefix + "bias"))


def rms_norm(hidden_states: Tensor, weights: Dict[str, Tensor], prefix: str) -> Tensor:
    x = hidden_states.float()
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + EPS)
    return weights[prefix + "weight"] * x.to(hidden_states.dtype)


def rotary(x: Tensor, positions: Tensor) -> Tuple[Tensor, Tensor]:
    # (B, D/2, 1) @ (B, 1, T) -> (B, T, D) angles in float32, then cos/sin in x's dtype
    D = x.shape[-1] // N_HEADS
    inv_freq = 1.0 / (ROPE_THETA ** (torch.arange(0, D, 2).float() / D))
    inv_freq = inv_freq.to(x.dtype).float().to(x.device)[None, :, None]
    freqs = inv_freq.expand(positions.shape[0], -1, 1) @ positions[:, None, :].float()
    emb = torch.cat((freqs, freqs), dim=1).transpose(1, 2)
    return emb.cos().to(x.dtype), emb.sin().to(x.dtype)


def rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin


def attention(x: Tensor, cos: Tensor, sin: Tensor, query: Tensor, pad: Tensor, past_k: Tensor,
              past_v: Tensor, weights: Dict[str, Tensor], prefix: str) -> Tuple[Tensor, Tensor, Tensor]:
    B, T, C = x.shape
    D = C // N_HEADS
    q = linear(x, weights, prefix + "q_proj.").view(B, T, -1, D).transpose(1, 2)
    k = linear(x, weights, prefix + "k_proj.").view(B, T, -1, D).transpose(1, 2)
    v = linear(x, weights, prefix + "v_proj.").view(B, T, -1, D).transpose(1, 2)
    q, k = rope(q, cos[:, None], sin[:, None]), rope(k, cos[:, None], sin[:, None])
    # the cache holds rotated keys: (B, kv_heads, past + T, D)
    k, v = torch.cat((past_k, k), dim=2), torch.cat((past_v, v), dim=2)
    # (B, 1, T, K) additive mask over the K cached keys, the last K of the L tokens so far
    K, L = k.shape[2], pad.shape[-1]
    key = torch.arange(L - K, L, device=x.device)[None, :]
    keep = (key <= query) & pad[..., L - K:]
    if WINDOW:
        keep = keep & (key > query - WINDOW)
    mask = torch.where(keep, 0.0, float("-inf")).to(x.dtype).nan_to_num()
    rep = N_HEADS // N_KV_HEADS
    scores = torch.matmul(q, k.repeat_interleave(rep, dim=1).transpose(2, 3)) * D**-0.5 + mask
    probs = F.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    out = torch.matmul(probs, v.repeat_interleave(rep, dim=1))
    if WINDOW:  # a sliding-window layer keeps only its window
        k, v = k[:, :, -WINDOW:], v[:, :, -WINDOW:]
    return linear(out.transpose(1, 2).reshape(B, T, C), weights, prefix + "o_proj."), k, v


def forward(input_ids: Tensor, positions: Tensor, attention_mask: Tensor, past_keys: List[Tensor],
            past_values: List[Tensor], weights: Dict[str, Tensor]):
    h = F.embedding(input_ids, weights["model.embed_tokens.weight"])
    T, L = input_ids.shape[1], attention_mask.shape[1]
    cos, sin = rotary(h, positions)
    # new token t is token L - T + t of the sequence; pad: (B, 1, 1, L) real tokens so far
    query = torch.arange(L - T, L, device=h.device)[:, None]
    pad = attention_mask[:, None, None, :] != 0
    keys, values = [], []
    for i in range(N_LAYERS):
        p = "model.layers.{}.".format(i)
        a, k, v = attention(rms_norm(h, weights, p + "input_layernorm."), cos, sin, query, pad,
                            past_keys[i], past_values[i], weights, p + "self_attn.")
        h = h + a
        x = rms_norm(h, weights, p + "post_attention_layernorm.")
        gate = F.silu(linear(x, weights, p + "mlp.gate_proj."))
        h = h + linear(gate * linear(x, weights, p + "mlp.up_proj."), weights, p + "mlp.down_proj.")
        h = tap("model.layers.{}".format(i), h)
        keys.append(k)
        values.append(v)
    logits = linear(rms_norm(h, weights, "model.norm."), weights, "lm_head.")
    return logits, keys, values
