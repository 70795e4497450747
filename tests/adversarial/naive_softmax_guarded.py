"""KNOWN LIMITATION (expected to MATCH): the naive softmax of naive_softmax.py
with a guard against 0/0. No probe drives attention scores anywhere near
exp's float32 overflow (~88), so it is within 2e-6 of the stable softmax on
every probe, hidden ones included: the packs cannot tell it from a correct
program. A probe with huge activations would (exporter, not verify).

(The rest is examples/solutions/qwen2.py.)"""
import torch
import torch.nn.functional as F
from torch import Tensor
from typing import Dict, Tuple

N_LAYERS = 2
N_HEADS = 4
N_KV_HEADS = 2
EPS = 1e-6
ROPE_THETA = 10000.0


def tap(name: str, x: Tensor) -> Tensor:
    return x


def linear(input: Tensor, weights: Dict[str, Tensor], prefix: str = "") -> Tensor:
    return F.linear(input, weights[prefix + "weight"], weights.get(prefix + "bias"))


def embedding(input: Tensor, weights: Dict[str, Tensor]) -> Tensor:
    return F.embedding(input, weights["weight"])


def silu(input: Tensor) -> Tensor:
    return F.silu(input)


def rms_norm(hidden_states: Tensor, weights: Dict[str, Tensor], prefix: str = "") -> Tensor:
    x = hidden_states.float()
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + EPS)
    return weights[prefix + "weight"] * x.to(hidden_states.dtype)


def rotary_emb(x: Tensor, position_ids: Tensor) -> Tuple[Tensor, Tensor]:
    # inv_freq as the model computes it (float32, on the CPU), rounded to x's dtype as
    # the model's buffer is; (B, D/2, 1) @ (B, 1, T) -> (B, T, D/2) angles in float32
    D = x.shape[-1] // N_HEADS
    inv_freq = 1.0 / (ROPE_THETA ** (torch.arange(0, D, 2).float() / D))
    inv_freq = inv_freq.to(x.dtype).float().to(x.device)[None, :, None]
    freqs = inv_freq.expand(position_ids.shape[0], -1, 1) @ position_ids[:, None, :].float()
    emb = torch.cat((freqs, freqs), dim=1).transpose(1, 2)
    return emb.cos().to(x.dtype), emb.sin().to(x.dtype)


def mlp(x: Tensor, weights: Dict[str, Tensor], prefix: str = "") -> Tensor:
    gate = F.silu(linear(x, weights, prefix + "gate_proj."))
    return linear(gate * linear(x, weights, prefix + "up_proj."), weights, prefix + "down_proj.")


def rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin


def attention(hidden_states: Tensor, position_embeddings_0: Tensor, position_embeddings_1: Tensor,
              attention_mask: Tensor, weights: Dict[str, Tensor], prefix: str = "") -> Tensor:
    B, T, C = hidden_states.shape
    D = C // N_HEADS
    # (B, T, heads * D) -> (B, heads, T, D); kv heads repeated to match query heads
    q = linear(hidden_states, weights, prefix + "q_proj.").view(B, T, -1, D).transpose(1, 2)
    k = linear(hidden_states, weights, prefix + "k_proj.").view(B, T, -1, D).transpose(1, 2)
    v = linear(hidden_states, weights, prefix + "v_proj.").view(B, T, -1, D).transpose(1, 2)
    cos, sin = position_embeddings_0.unsqueeze(1), position_embeddings_1.unsqueeze(1)
    q, k = rope(q, cos, sin), rope(k, cos, sin).repeat_interleave(N_HEADS // N_KV_HEADS, dim=1)
    scores = torch.matmul(q, k.transpose(2, 3)) * D**-0.5 + attention_mask
    e = torch.exp(scores.float())
    probs = (e / e.sum(-1, keepdim=True).clamp_min(1e-30)).to(q.dtype)
    out = torch.matmul(probs, v.repeat_interleave(N_HEADS // N_KV_HEADS, dim=1))
    return linear(out.transpose(1, 2).reshape(B, T, C), weights, prefix + "o_proj.")


def decoder_layer(hidden_states: Tensor, attention_mask: Tensor, position_embeddings_0: Tensor,
                  position_embeddings_1: Tensor, weights: Dict[str, Tensor],
                  prefix: str = "") -> Tensor:
    x = rms_norm(hidden_states, weights, prefix + "input_layernorm.")
    h = hidden_states + attention(x, position_embeddings_0, position_embeddings_1,
                                  attention_mask, weights, prefix + "self_attn.")
    x = rms_norm(h, weights, prefix + "post_attention_layernorm.")
    return h + mlp(x, weights, prefix + "mlp.")


def model(input_ids: Tensor, attention_mask: Tensor, weights: Dict[str, Tensor],
          prefix: str = "") -> Tensor:
    h = F.embedding(input_ids, weights[prefix + "embed_tokens.weight"])
    pos = torch.arange(input_ids.shape[1], device=input_ids.device)
    cos, sin = rotary_emb(h, pos[None, :])
    # (B, 1, T, T) additive mask: 0 = attend, finfo(dtype).min = future or padding key
    keep = (pos[None, :] <= pos[:, None]) & (attention_mask[:, None, None, :] != 0)
    mask = torch.where(keep, 0.0, float("-inf")).to(h.dtype).nan_to_num()
    for i in range(N_LAYERS):
        h = decoder_layer(h, mask, cos, sin, weights, prefix + "layers.{}.".format(i))
        h = tap("model.layers.{}".format(i), h)
    return rms_norm(h, weights, prefix + "norm.")


def forward(input_ids: Tensor, attention_mask: Tensor, weights: Dict[str, Tensor]) -> Tensor:
    return linear(model(input_ids, attention_mask, weights, "model."), weights, "lm_head.")
