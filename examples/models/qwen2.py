"""Qwen2 causal language model in the style of HuggingFace transformers.

A self-contained, class-based rewrite (our own words) of transformers'
modeling_qwen2.py with the same semantics: config object, ModelOutput
dataclasses, a PreTrainedModel-like base, RMSNorm with HF's cast order, rotary
embedding module, SwiGLU MLP, grouped-query attention (eager, and sdpa where
torch >= 2.0 has it), a simple KV cache, and the branches real checkpoints
carry but inference never runs (dropout, gradient checkpointing, labels).

It is fmx's example input: the exporter traces it and the reference solution
examples/solutions/qwen2.py rewrites it as flat functional code. It is not a
checkpoint loader and needs no transformers install (imports: torch, math,
dataclasses, typing).

`build(**overrides)` returns a seeded-by-caller, randomly initialised model in
eval() mode. The init is fmx's, not HF's: every op must move the output. The
inputs of every nonlinearity are O(1) with tails (projections N(0, 1/fan_in),
biases N(0, 0.1)), so approximations differ; the residual stream stays small
(embeddings N(0, RESIDUAL_STD), o_proj and down_proj scaled by RESIDUAL_STD), so
its variance (~1e-3) is only ~100x a norm's eps and an eps mistake shows; norm
weights are 1 + N(0, 0.1).
"""

import dataclasses
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, List, Optional, Tuple

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

RESIDUAL_STD = 0.03  # RMS of the residual stream under fmx's init (see above)

# ---------------------------------------------------------------- config


@dataclass
class Qwen2Config:
    vocab_size: int = 512
    hidden_size: int = 64
    intermediate_size: int = 160
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    hidden_act: str = "silu"
    max_position_embeddings: int = 256
    initializer_range: float = 0.02  # HF's; fmx's init below ignores it on purpose
    rms_norm_eps: float = 1e-6
    use_cache: bool = False
    tie_word_embeddings: bool = False
    rope_theta: float = 10000.0
    attention_dropout: float = 0.0
    attn_implementation: str = "eager"  # "eager" | "sdpa" (sdpa needs torch >= 2.0)
    output_attentions: bool = False
    output_hidden_states: bool = False
    use_return_dict: bool = True
    pad_token_id: Optional[int] = None
    sliding_window: Optional[int] = None  # a query sees only the last sliding_window keys

    def __post_init__(self):
        if self.hidden_size % self.num_attention_heads:
            raise ValueError("hidden_size must be a multiple of num_attention_heads")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError("num_attention_heads must be a multiple of num_key_value_heads")
        if self.attn_implementation not in ("eager", "sdpa"):
            raise ValueError(f"attn_implementation {self.attn_implementation!r}: eager or sdpa")


# ---------------------------------------------------------------- outputs


class ModelOutput(OrderedDict):
    """Dataclass output that is also an ordered dict and a tuple of its
    non-None fields, in field order (HF's ModelOutput contract)."""

    def __post_init__(self):
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if value is not None:
                super().__setitem__(field.name, value)

    def __getitem__(self, key):
        if isinstance(key, str):
            return super().__getitem__(key)
        return self.to_tuple()[key]

    def to_tuple(self) -> Tuple[Any, ...]:
        return tuple(super(ModelOutput, self).__getitem__(k) for k in self.keys())


@dataclass(eq=False)
class BaseModelOutputWithPast(ModelOutput):
    last_hidden_state: Optional[torch.Tensor] = None
    past_key_values: Optional["DynamicCache"] = None
    hidden_states: Optional[Tuple[torch.Tensor, ...]] = None
    attentions: Optional[Tuple[torch.Tensor, ...]] = None


@dataclass(eq=False)
class CausalLMOutputWithPast(ModelOutput):
    loss: Optional[torch.Tensor] = None
    logits: Optional[torch.Tensor] = None
    past_key_values: Optional["DynamicCache"] = None
    hidden_states: Optional[Tuple[torch.Tensor, ...]] = None
    attentions: Optional[Tuple[torch.Tensor, ...]] = None


class DynamicCache:
    """Per-layer key/value tensors (B, kv_heads, T_past, head_dim), grown by
    concatenation along the sequence axis."""

    def __init__(self):
        self.key_cache: List[torch.Tensor] = []
        self.value_cache: List[torch.Tensor] = []

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int):
        if len(self.key_cache) <= layer_idx:
            self.key_cache.append(key)
            self.value_cache.append(value)
        else:
            self.key_cache[layer_idx] = torch.cat([self.key_cache[layer_idx], key], dim=-2)
            self.value_cache[layer_idx] = torch.cat([self.value_cache[layer_idx], value], dim=-2)
        return self.key_cache[layer_idx], self.value_cache[layer_idx]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        if len(self.key_cache) <= layer_idx:
            return 0
        return self.key_cache[layer_idx].shape[-2]

    def __repr__(self) -> str:
        return f"DynamicCache(layers={len(self.key_cache)}, seq={self.get_seq_length()})"


# ---------------------------------------------------------------- base class


class Qwen2PreTrainedModel(nn.Module):
    config_class = Qwen2Config
    base_model_prefix = "model"
    supports_gradient_checkpointing = True

    def __init__(self, config: Qwen2Config):
        super().__init__()
        self.config = config

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    def _init_weights(self, module: nn.Module):
        # fmx init (module docstring): O(1) inputs to every nonlinearity, a residual
        # stream of RMS ~RESIDUAL_STD, nothing constant. apply() visits children
        # first, so the attention/MLP branch redraws their residual projections.
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=module.in_features**-0.5)
            if module.bias is not None:
                nn.init.normal_(module.bias, std=0.1)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=RESIDUAL_STD)
        elif isinstance(module, Qwen2RMSNorm):
            nn.init.normal_(module.weight, mean=1.0, std=0.1)
        elif isinstance(module, (Qwen2Attention, Qwen2MLP)):
            out = module.o_proj if isinstance(module, Qwen2Attention) else module.down_proj
            nn.init.normal_(out.weight, std=RESIDUAL_STD * out.in_features**-0.5)

    def tie_weights(self):
        pass

    def _initialize_weights(self, module: nn.Module):
        # a submodel's post_init ran first: initialise every module once only
        if getattr(module, "_is_hf_initialized", False):
            return
        self._init_weights(module)
        module._is_hf_initialized = True

    def post_init(self):
        self.apply(self._initialize_weights)
        self.tie_weights()

    def gradient_checkpointing_enable(self):
        for module in self.modules():
            if hasattr(module, "gradient_checkpointing"):
                module.gradient_checkpointing = True


# ---------------------------------------------------------------- layers


class Qwen2RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        input_dtype = hidden_states.dtype
        hidden_states = hidden_states.to(torch.float32)
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        # cast back first, then scale: the weight multiply happens in input_dtype
        return self.weight * hidden_states.to(input_dtype)


class Qwen2RotaryEmbedding(nn.Module):
    def __init__(self, config: Qwen2Config):
        super().__init__()
        dim = config.hidden_size // config.num_attention_heads
        exponent = torch.arange(0, dim, 2, dtype=torch.int64).float() / dim
        inv_freq = 1.0 / (config.rope_theta**exponent)  # (dim/2,)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.attention_scaling = 1.0  # default rope type

    @torch.no_grad()
    def forward(self, x: torch.Tensor, position_ids: torch.Tensor):
        # (B, dim/2, 1) @ (B, 1, T) -> (B, T, dim/2), always in float32
        inv_freq = self.inv_freq[None, :, None].float().expand(position_ids.shape[0], -1, 1)
        positions = position_ids[:, None, :].float()
        freqs = (inv_freq.to(x.device) @ positions).transpose(1, 2)
        emb = torch.cat((freqs, freqs), dim=-1)
        cos = emb.cos() * self.attention_scaling
        sin = emb.sin() * self.attention_scaling
        return cos.to(dtype=x.dtype), sin.to(dtype=x.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim: int = 1):
    cos = cos.unsqueeze(unsqueeze_dim)  # (B, 1, T, D) broadcasts over heads
    sin = sin.unsqueeze(unsqueeze_dim)
    q_embed = (q * cos) + (rotate_half(q) * sin)
    k_embed = (k * cos) + (rotate_half(k) * sin)
    return q_embed, k_embed


ACT2CLS = {"silu": nn.SiLU, "gelu": nn.GELU, "relu": nn.ReLU}


class Qwen2MLP(nn.Module):
    def __init__(self, config: Qwen2Config):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)
        self.act_fn = ACT2CLS[config.hidden_act]()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


def repeat_kv(hidden_states: torch.Tensor, n_rep: int) -> torch.Tensor:
    """(B, kv_heads, T, D) -> (B, kv_heads * n_rep, T, D), each kv head repeated n_rep times."""
    if n_rep == 1:
        return hidden_states
    b, kv_heads, t, d = hidden_states.shape
    expanded = hidden_states[:, :, None, :, :].expand(b, kv_heads, n_rep, t, d)
    return expanded.reshape(b, kv_heads * n_rep, t, d)


def eager_attention_forward(module, query, key, value, attention_mask, scaling, dropout=0.0):
    key_states = repeat_kv(key, module.num_key_value_groups)
    value_states = repeat_kv(value, module.num_key_value_groups)
    attn_weights = torch.matmul(query, key_states.transpose(2, 3)) * scaling
    if attention_mask is not None:
        attn_weights = attn_weights + attention_mask[:, :, :, : key_states.shape[-2]]
    # softmax in float32, then back to the activation dtype
    attn_weights = F.softmax(attn_weights, dim=-1, dtype=torch.float32).to(query.dtype)
    attn_weights = F.dropout(attn_weights, p=dropout, training=module.training)
    attn_output = torch.matmul(attn_weights, value_states)
    return attn_output.transpose(1, 2).contiguous(), attn_weights


def sdpa_attention_forward(module, query, key, value, attention_mask, scaling, dropout=0.0):
    key_states = repeat_kv(key, module.num_key_value_groups)
    value_states = repeat_kv(value, module.num_key_value_groups)
    is_causal = attention_mask is None and query.shape[2] > 1
    if attention_mask is not None:
        attention_mask = attention_mask[:, :, :, : key_states.shape[-2]]
    attn_output = F.scaled_dot_product_attention(  # default scale = head_dim**-0.5 = scaling
        query, key_states, value_states, attn_mask=attention_mask, dropout_p=dropout,
        is_causal=is_causal)
    return attn_output.transpose(1, 2).contiguous(), None


class Qwen2Attention(nn.Module):
    def __init__(self, config: Qwen2Config, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.num_key_value_groups = config.num_attention_heads // config.num_key_value_heads
        self.scaling = self.head_dim**-0.5
        self.attention_dropout = config.attention_dropout
        self.is_causal = True
        q_out = config.num_attention_heads * self.head_dim
        kv_out = config.num_key_value_heads * self.head_dim
        self.q_proj = nn.Linear(config.hidden_size, q_out, bias=True)
        self.k_proj = nn.Linear(config.hidden_size, kv_out, bias=True)
        self.v_proj = nn.Linear(config.hidden_size, kv_out, bias=True)
        self.o_proj = nn.Linear(q_out, config.hidden_size, bias=False)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: Optional[torch.Tensor] = None,
        position_ids: Optional[torch.LongTensor] = None,
        past_key_value: Optional[DynamicCache] = None,
        output_attentions: bool = False,
        use_cache: bool = False,
        cache_position: Optional[torch.LongTensor] = None,
        position_embeddings: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
    ):
        if position_embeddings is None:
            raise ValueError("Qwen2Attention needs position_embeddings (cos, sin)")
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)
        # (B, T, C) -> (B, heads, T, head_dim)
        query_states = self.q_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        key_states = self.k_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        value_states = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)

        cos, sin = position_embeddings
        query_states, key_states = apply_rotary_pos_emb(query_states, key_states, cos, sin)

        if past_key_value is not None:
            key_states, value_states = past_key_value.update(key_states, value_states,
                                                             self.layer_idx)

        use_sdpa = (self.config.attn_implementation == "sdpa" and not output_attentions
                    and hasattr(F, "scaled_dot_product_attention"))
        attention_interface = sdpa_attention_forward if use_sdpa else eager_attention_forward
        attn_output, attn_weights = attention_interface(
            self, query_states, key_states, value_states, attention_mask,
            scaling=self.scaling, dropout=self.attention_dropout if self.training else 0.0)

        attn_output = attn_output.reshape(*input_shape, -1).contiguous()
        attn_output = self.o_proj(attn_output)
        if not output_attentions:
            attn_weights = None
        return attn_output, attn_weights


class Qwen2DecoderLayer(nn.Module):
    def __init__(self, config: Qwen2Config, layer_idx: int):
        super().__init__()
        self.hidden_size = config.hidden_size
        self.self_attn = Qwen2Attention(config, layer_idx)
        self.mlp = Qwen2MLP(config)
        self.input_layernorm = Qwen2RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = Qwen2RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: Optional[torch.Tensor] = None,
        position_ids: Optional[torch.LongTensor] = None,
        past_key_value: Optional[DynamicCache] = None,
        output_attentions: bool = False,
        use_cache: bool = False,
        cache_position: Optional[torch.LongTensor] = None,
        position_embeddings: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
    ):
        residual = hidden_states
        hidden_states = self.input_layernorm(hidden_states)
        hidden_states, self_attn_weights = self.self_attn(
            hidden_states=hidden_states,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_value=past_key_value,
            output_attentions=output_attentions,
            use_cache=use_cache,
            cache_position=cache_position,
            position_embeddings=position_embeddings,
        )
        hidden_states = residual + hidden_states

        residual = hidden_states
        hidden_states = self.post_attention_layernorm(hidden_states)
        hidden_states = self.mlp(hidden_states)
        hidden_states = residual + hidden_states

        outputs = (hidden_states,)
        if output_attentions:
            outputs += (self_attn_weights,)
        return outputs


# ---------------------------------------------------------------- models


class Qwen2Model(Qwen2PreTrainedModel):
    def __init__(self, config: Qwen2Config):
        super().__init__(config)
        self.padding_idx = config.pad_token_id
        self.vocab_size = config.vocab_size
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList(
            [Qwen2DecoderLayer(config, i) for i in range(config.num_hidden_layers)])
        self.norm = Qwen2RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = Qwen2RotaryEmbedding(config)
        self.gradient_checkpointing = False
        self.post_init()

    def forward(
        self,
        input_ids: Optional[torch.LongTensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        position_ids: Optional[torch.LongTensor] = None,
        past_key_values: Optional[DynamicCache] = None,
        inputs_embeds: Optional[torch.FloatTensor] = None,
        use_cache: Optional[bool] = None,
        output_attentions: Optional[bool] = None,
        output_hidden_states: Optional[bool] = None,
        return_dict: Optional[bool] = None,
        cache_position: Optional[torch.LongTensor] = None,
    ):
        cfg = self.config
        output_attentions = (cfg.output_attentions if output_attentions is None
                             else output_attentions)
        output_hidden_states = (cfg.output_hidden_states if output_hidden_states is None
                                else output_hidden_states)
        use_cache = cfg.use_cache if use_cache is None else use_cache
        return_dict = cfg.use_return_dict if return_dict is None else return_dict

        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("specify exactly one of input_ids or inputs_embeds")
        if self.gradient_checkpointing and self.training and use_cache:
            use_cache = False  # checkpointing recomputes layers; a cache would be filled twice
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        if use_cache and past_key_values is None:
            past_key_values = DynamicCache()

        past_seen = past_key_values.get_seq_length() if past_key_values is not None else 0
        if cache_position is None:
            cache_position = torch.arange(past_seen, past_seen + inputs_embeds.shape[1],
                                          device=inputs_embeds.device)
        if position_ids is None:
            position_ids = cache_position.unsqueeze(0)

        causal_mask = self._update_causal_mask(attention_mask, inputs_embeds, cache_position,
                                               past_seen)
        hidden_states = inputs_embeds
        position_embeddings = self.rotary_emb(hidden_states, position_ids)

        all_hidden_states = () if output_hidden_states else None
        all_self_attns = () if output_attentions else None
        for decoder_layer in self.layers:
            if output_hidden_states:
                all_hidden_states += (hidden_states,)
            if self.gradient_checkpointing and self.training:
                layer_outputs = torch.utils.checkpoint.checkpoint(
                    decoder_layer.__call__, hidden_states, causal_mask, position_ids, None,
                    output_attentions, False, cache_position, position_embeddings)
            else:
                layer_outputs = decoder_layer(
                    hidden_states,
                    attention_mask=causal_mask,
                    position_ids=position_ids,
                    past_key_value=past_key_values,
                    output_attentions=output_attentions,
                    use_cache=use_cache,
                    cache_position=cache_position,
                    position_embeddings=position_embeddings,
                )
            hidden_states = layer_outputs[0]
            if output_attentions:
                all_self_attns += (layer_outputs[1],)

        hidden_states = self.norm(hidden_states)
        if output_hidden_states:
            all_hidden_states += (hidden_states,)

        next_cache = past_key_values if use_cache else None
        if not return_dict:
            return tuple(v for v in (hidden_states, next_cache, all_hidden_states, all_self_attns)
                         if v is not None)
        return BaseModelOutputWithPast(
            last_hidden_state=hidden_states,
            past_key_values=next_cache,
            hidden_states=all_hidden_states,
            attentions=all_self_attns,
        )

    def _update_causal_mask(self, attention_mask, input_tensor, cache_position, past_seen):
        """Additive (B, 1, T, T_total) mask: 0 where a query may attend a key,
        finfo(dtype).min where the key is in the future or padding."""
        if attention_mask is not None and attention_mask.dim() == 4:
            return attention_mask  # caller built it already
        dtype, device = input_tensor.dtype, input_tensor.device
        min_dtype = torch.finfo(dtype).min
        batch, seq_len = input_tensor.shape[0], input_tensor.shape[1]
        if attention_mask is not None:
            target_len = attention_mask.shape[-1]
        else:
            target_len = past_seen + seq_len
        causal_mask = torch.full((seq_len, target_len), min_dtype, dtype=dtype, device=device)
        if seq_len != 1:
            causal_mask = torch.triu(causal_mask, diagonal=1)
        future = torch.arange(target_len, device=device) > cache_position.reshape(-1, 1)
        causal_mask = causal_mask * future
        if self.config.sliding_window is not None:  # keys sliding_window or more behind the query
            old = (torch.arange(target_len, device=device)
                   <= cache_position.reshape(-1, 1) - self.config.sliding_window)
            causal_mask = causal_mask.masked_fill(old, min_dtype)
        causal_mask = causal_mask[None, None, :, :].expand(batch, 1, -1, -1)
        if attention_mask is not None:
            causal_mask = causal_mask.clone()
            mask_len = attention_mask.shape[-1]
            padding = causal_mask[:, :, :, :mask_len] + attention_mask[:, None, None, :]
            padding = padding == 0  # allowed by causality but a padding key
            causal_mask[:, :, :, :mask_len] = causal_mask[:, :, :, :mask_len].masked_fill(
                padding, min_dtype)
        return causal_mask


class Qwen2ForCausalLM(Qwen2PreTrainedModel):
    _tied_weights_keys = ["lm_head.weight"]

    def __init__(self, config: Qwen2Config):
        super().__init__(config)
        self.model = Qwen2Model(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def tie_weights(self):
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(
        self,
        input_ids: Optional[torch.LongTensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        position_ids: Optional[torch.LongTensor] = None,
        past_key_values: Optional[DynamicCache] = None,
        inputs_embeds: Optional[torch.FloatTensor] = None,
        labels: Optional[torch.LongTensor] = None,
        use_cache: Optional[bool] = None,
        output_attentions: Optional[bool] = None,
        output_hidden_states: Optional[bool] = None,
        return_dict: Optional[bool] = None,
        cache_position: Optional[torch.LongTensor] = None,
        logits_to_keep: int = 0,
    ):
        return_dict = self.config.use_return_dict if return_dict is None else return_dict
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            return_dict=True,
            cache_position=cache_position,
        )
        hidden_states = outputs.last_hidden_state
        # logits_to_keep = 0 keeps every position (slice(-0, None))
        logits = self.lm_head(hidden_states[:, -logits_to_keep:, :])

        loss = None
        if labels is not None:
            shift_logits = logits[..., :-1, :].float().reshape(-1, self.vocab_size)
            shift_labels = labels[..., 1:].reshape(-1).to(shift_logits.device)
            loss = F.cross_entropy(shift_logits, shift_labels, ignore_index=-100)

        if not return_dict:
            output = (logits,) + outputs.to_tuple()[1:]
            return (loss,) + output if loss is not None else output
        return CausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            past_key_values=outputs.past_key_values,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
        )


def build(**overrides) -> nn.Module:
    """Qwen2ForCausalLM with the tiny default config updated by overrides,
    randomly initialised from torch's global RNG (seed it first), in eval()."""
    valid = sorted(f.name for f in dataclasses.fields(Qwen2Config))
    unknown = sorted(set(overrides) - set(valid))
    if unknown:
        raise ValueError(f"unknown Qwen2Config keys {unknown}; valid keys: {valid}")
    model = Qwen2ForCausalLM(Qwen2Config(**overrides))
    return model.eval()
