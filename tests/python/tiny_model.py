"""A tiny HF-style causal LM that the exporter tests run against.

It has what the exporter must cope with in real transformers models: a config
dataclass with `config_class`, a pre-trained base class, a dataclass output with
`logits` first and None fields, a tuple input (`position_embeddings=(cos, sin)`),
a cache object and a legacy tuple-of-tuples cache, `**kwargs` inputs, a tied
weight, a non-persistent buffer, a module called twice per call, and branches that
never run. It is a test fixture, not an example for users.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass
class TinyConfig:
    vocab_size: int = 97
    hidden_size: int = 32
    intermediate_size: int = 48
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    max_position_embeddings: int = 40
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6
    use_cache: bool = True
    output_attentions: bool = False
    pad_token_id: Optional[int] = None
    extra: List[int] = field(default_factory=lambda: [1, 2])


@dataclass
class TinyBaseOutput:
    last_hidden_state: Tensor
    past_key_values: Optional[Tuple[Tuple[Tensor, Tensor], ...]] = None
    hidden_states: Optional[Tuple[Tensor, ...]] = None


@dataclass
class TinyCausalLMOutput:
    logits: Tensor
    past_key_values: Optional["TinyCache"] = None
    hidden_states: Optional[Tuple[Tensor, ...]] = None


class TinyCache:
    def __init__(self) -> None:
        self.layers: List[Tuple[Tensor, Tensor]] = []

    def update(self, k: Tensor, v: Tensor, layer_idx: int) -> Tuple[Tensor, Tensor]:
        self.layers.append((k, v))
        return k, v

    def to_legacy(self) -> Tuple[Tuple[Tensor, Tensor], ...]:
        return tuple(self.layers)


def rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def causal_mask(attention_mask: Optional[Tensor], batch: int, seq: int, dtype: torch.dtype) -> Tensor:
    keep = torch.ones(seq, seq, dtype=torch.bool).tril()[None, None]
    if attention_mask is not None:
        keep = keep & attention_mask[:, None, None, :].bool()
    return torch.zeros(keep.shape, dtype=dtype).masked_fill(~keep, torch.finfo(dtype).min)


class TinyPreTrainedModel(nn.Module):
    config_class = TinyConfig

    def __init__(self, config: TinyConfig) -> None:
        super().__init__()
        self.config = config

    def init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, TinyRMSNorm):
                nn.init.uniform_(m.weight, 0.5, 1.5)


class TinyRMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, hidden_states: Tensor) -> Tensor:
        var = hidden_states.pow(2).mean(-1, keepdim=True)
        return self.weight * (hidden_states * torch.rsqrt(var + self.eps))


class TinyRotaryEmbedding(nn.Module):
    def __init__(self, config: TinyConfig) -> None:
        super().__init__()
        dim = config.hidden_size // config.num_attention_heads
        inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2).float() / dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, x: Tensor, position_ids: Tensor) -> Tuple[Tensor, Tensor]:
        freqs = position_ids[:, :, None].float() * self.inv_freq[None, None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(x.dtype), emb.sin().to(x.dtype)


class TinyAttention(nn.Module):
    def __init__(self, config: TinyConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.heads = config.num_attention_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.q_proj = nn.Linear(config.hidden_size, config.hidden_size)
        self.k_proj = nn.Linear(config.hidden_size, config.hidden_size)
        self.v_proj = nn.Linear(config.hidden_size, config.hidden_size)
        self.o_proj = nn.Linear(config.hidden_size, config.hidden_size, bias=False)
        self.qk_norm = TinyRMSNorm(self.head_dim, config.rms_norm_eps)

    def forward(
        self,
        hidden_states: Tensor,
        position_embeddings: Tuple[Tensor, Tensor],
        attention_mask: Optional[Tensor] = None,
        past_key_value: Optional[TinyCache] = None,
        output_attentions: bool = False,
    ) -> Tuple[Tensor, Optional[Tensor]]:
        b, t, _ = hidden_states.shape
        q = self.q_proj(hidden_states).view(b, t, self.heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(hidden_states).view(b, t, self.heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(hidden_states).view(b, t, self.heads, self.head_dim).transpose(1, 2)
        q, k = self.qk_norm(q), self.qk_norm(k)
        cos, sin = position_embeddings
        cos, sin = cos[:, None], sin[:, None]
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        if past_key_value is not None:
            k, v = past_key_value.update(k, v, self.layer_idx)
        scores = torch.matmul(q, k.transpose(2, 3)) / self.head_dim**0.5
        if attention_mask is not None:
            scores = scores + attention_mask
        probs = F.softmax(scores, dim=-1)
        out = torch.matmul(probs, v).transpose(1, 2).reshape(b, t, -1)
        out = self.o_proj(out)
        if output_attentions:
            return out, probs  # never-runs
        return out, None


class TinyMLP(nn.Module):
    def __init__(self, config: TinyConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)
        self.act = nn.SiLU()

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class TinyDecoderLayer(nn.Module):
    def __init__(self, config: TinyConfig, layer_idx: int) -> None:
        super().__init__()
        self.self_attn = TinyAttention(config, layer_idx)
        self.mlp = TinyMLP(config)
        self.input_layernorm = TinyRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = TinyRMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(
        self,
        hidden_states: Tensor,
        attention_mask: Optional[Tensor] = None,
        position_embeddings: Optional[Tuple[Tensor, Tensor]] = None,
        past_key_value: Optional[TinyCache] = None,
        **kwargs,
    ) -> Tuple[Tensor]:
        residual = hidden_states
        hidden_states = self.input_layernorm(hidden_states)
        hidden_states, _ = self.self_attn(
            hidden_states, position_embeddings, attention_mask=attention_mask, past_key_value=past_key_value
        )
        hidden_states = residual + hidden_states
        residual = hidden_states
        hidden_states = residual + self.mlp(self.post_attention_layernorm(hidden_states))
        return (hidden_states,)


class TinyModel(TinyPreTrainedModel):
    def __init__(self, config: TinyConfig) -> None:
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList([TinyDecoderLayer(config, i) for i in range(config.num_hidden_layers)])
        self.norm = TinyRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = TinyRotaryEmbedding(config)

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Optional[Tensor] = None,
        position_ids: Optional[Tensor] = None,
        use_cache: Optional[bool] = None,
    ) -> TinyBaseOutput:
        b, t = input_ids.shape
        hidden_states = self.embed_tokens(input_ids)
        if position_ids is None:
            position_ids = torch.arange(t)[None]
        position_embeddings = self.rotary_emb(hidden_states, position_ids)
        mask = causal_mask(attention_mask, b, t, hidden_states.dtype)
        cache = TinyCache() if use_cache else None
        for layer in self.layers:
            (hidden_states,) = layer(
                hidden_states,
                attention_mask=mask,
                position_embeddings=position_embeddings,
                past_key_value=cache,
                use_cache=use_cache,
            )
        hidden_states = self.norm(hidden_states)
        return TinyBaseOutput(hidden_states, cache.to_legacy() if cache is not None else None, None)


class TinyForCausalLM(TinyPreTrainedModel):
    def __init__(self, config: TinyConfig) -> None:
        super().__init__(config)
        self.model = TinyModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.lm_head.weight = self.model.embed_tokens.weight
        self.init_weights()
        self.eval()

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Optional[Tensor] = None,
        position_ids: Optional[Tensor] = None,
        use_cache: Optional[bool] = None,
    ) -> TinyCausalLMOutput:
        use_cache = self.config.use_cache if use_cache is None else use_cache
        out = self.model(input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=use_cache)
        logits = self.lm_head(out.last_hidden_state)
        cache = None
        if use_cache:
            cache = TinyCache()
            cache.layers = list(out.past_key_values)
        return TinyCausalLMOutput(logits=logits, past_key_values=cache)


def build(**overrides) -> TinyForCausalLM:
    return TinyForCausalLM(TinyConfig(**overrides)).eval()
