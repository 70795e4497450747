"""GPT-2 language model in the style of HuggingFace transformers.

A self-contained, class-based rewrite (our own words) of transformers'
modeling_gpt2.py with the same semantics: Conv1D layers with the transposed
(in, out) weight layout, a fused q/k/v projection, a causal mask kept as a
boolean `bias` buffer, learned position embeddings, pre-LayerNorm blocks,
"gelu_new" (the tanh approximation written out), an LM head tied to the token
embedding, and the branches real checkpoints carry but inference never runs
(dropout, gradient checkpointing, head masks, labels, a legacy tuple cache).

It is fmx's example input: the exporter traces it and the reference solution
examples/solutions/gpt2.py rewrites it as flat functional code. It needs no
transformers install (imports: torch, math, dataclasses, typing).

`build(**overrides)` returns a seeded-by-caller, randomly initialised model in
eval() mode. The init is fmx's, not HF's: every op must move the output. The
inputs of every nonlinearity are O(1) with tails (projections N(0, 1/fan_in),
biases N(0, 0.1)), so tanh- and erf-GELU differ; the residual stream stays
small (wte and wpe N(0, RESIDUAL_STD), both c_proj scaled by RESIDUAL_STD), so
its variance (~1e-3) is only ~100x LayerNorm's eps and an eps mistake shows;
LayerNorm weights are 1 + N(0, 0.1), biases N(0, 0.1).
"""

import dataclasses
import math
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Optional, Tuple

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

RESIDUAL_STD = 0.03  # RMS of the residual stream under fmx's init (see above)

# ---------------------------------------------------------------- config


@dataclass
class GPT2Config:
    vocab_size: int = 512
    n_positions: int = 256
    n_embd: int = 64
    n_layer: int = 2
    n_head: int = 4
    n_inner: Optional[int] = None  # None -> 4 * n_embd
    activation_function: str = "gelu_new"
    resid_pdrop: float = 0.1
    embd_pdrop: float = 0.1
    attn_pdrop: float = 0.1
    layer_norm_epsilon: float = 1e-5
    initializer_range: float = 0.02  # HF's; fmx's init below ignores it on purpose
    scale_attn_weights: bool = True
    scale_attn_by_inverse_layer_idx: bool = False
    reorder_and_upcast_attn: bool = False
    attn_implementation: str = "eager"  # "eager" | "sdpa" (sdpa needs torch >= 2.0)
    use_cache: bool = False
    output_attentions: bool = False
    output_hidden_states: bool = False
    use_return_dict: bool = True
    tie_word_embeddings: bool = True

    def __post_init__(self):
        if self.n_embd % self.n_head:
            raise ValueError("n_embd must be a multiple of n_head")
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
class BaseModelOutputWithPastAndCrossAttentions(ModelOutput):
    last_hidden_state: Optional[torch.Tensor] = None
    past_key_values: Optional[Tuple[Tuple[torch.Tensor, torch.Tensor], ...]] = None
    hidden_states: Optional[Tuple[torch.Tensor, ...]] = None
    attentions: Optional[Tuple[torch.Tensor, ...]] = None
    cross_attentions: Optional[Tuple[torch.Tensor, ...]] = None


@dataclass(eq=False)
class CausalLMOutputWithCrossAttentions(ModelOutput):
    loss: Optional[torch.Tensor] = None
    logits: Optional[torch.Tensor] = None
    past_key_values: Optional[Tuple[Tuple[torch.Tensor, torch.Tensor], ...]] = None
    hidden_states: Optional[Tuple[torch.Tensor, ...]] = None
    attentions: Optional[Tuple[torch.Tensor, ...]] = None
    cross_attentions: Optional[Tuple[torch.Tensor, ...]] = None


# ---------------------------------------------------------------- base class


class GPT2PreTrainedModel(nn.Module):
    config_class = GPT2Config
    base_model_prefix = "transformer"
    supports_gradient_checkpointing = True

    def __init__(self, config: GPT2Config):
        super().__init__()
        self.config = config

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    def _init_weights(self, module: nn.Module):
        # fmx init (module docstring): O(1) inputs to every nonlinearity, a residual
        # stream of RMS ~RESIDUAL_STD, nothing constant. apply() visits children
        # first, so the attention/MLP branch redraws their residual projections.
        if isinstance(module, (nn.Linear, Conv1D)):
            fan_in = module.weight.shape[1] if isinstance(module, nn.Linear) else module.nx
            nn.init.normal_(module.weight, std=fan_in**-0.5)
            if module.bias is not None:
                nn.init.normal_(module.bias, std=0.1)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=RESIDUAL_STD)
        elif isinstance(module, nn.LayerNorm):
            nn.init.normal_(module.weight, mean=1.0, std=0.1)
            nn.init.normal_(module.bias, std=0.1)
        elif isinstance(module, (GPT2Attention, GPT2MLP)):
            out = module.c_proj  # writes into the residual stream
            nn.init.normal_(out.weight, std=RESIDUAL_STD * out.nx**-0.5)
            nn.init.normal_(out.bias, std=RESIDUAL_STD * 0.1)

    def _initialize_weights(self, module: nn.Module):
        # a submodel's post_init ran first: initialise every module once only
        if getattr(module, "_is_hf_initialized", False):
            return
        self._init_weights(module)
        module._is_hf_initialized = True

    def tie_weights(self):
        pass

    def post_init(self):
        self.apply(self._initialize_weights)
        self.tie_weights()

    def gradient_checkpointing_enable(self):
        for module in self.modules():
            if hasattr(module, "gradient_checkpointing"):
                module.gradient_checkpointing = True


# ---------------------------------------------------------------- layers


class Conv1D(nn.Module):
    """A linear layer stored transposed, as in the original GPT-2:
    weight (nx, nf) = (in, out) and y = x @ weight + bias."""

    def __init__(self, nf: int, nx: int):
        super().__init__()
        self.nf = nf
        self.nx = nx
        self.weight = nn.Parameter(torch.empty(nx, nf))
        self.bias = nn.Parameter(torch.zeros(nf))
        nn.init.normal_(self.weight, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size_out = x.size()[:-1] + (self.nf,)
        x = torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight)
        return x.view(size_out)

    def extra_repr(self) -> str:
        return f"nf={self.nf}, nx={self.nx}"


class NewGELUActivation(nn.Module):
    """GELU, tanh approximation, written out term by term (HF "gelu_new")."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        inner = math.sqrt(2.0 / math.pi) * (input + 0.044715 * torch.pow(input, 3.0))
        return 0.5 * input * (1.0 + torch.tanh(inner))


ACT2CLS = {"gelu_new": NewGELUActivation, "gelu": nn.GELU, "relu": nn.ReLU}


class GPT2Attention(nn.Module):
    def __init__(self, config: GPT2Config, layer_idx: Optional[int] = None):
        super().__init__()
        self.config = config
        max_positions = config.n_positions
        causal = torch.tril(torch.ones((max_positions, max_positions), dtype=torch.bool))
        self.register_buffer("bias", causal.view(1, 1, max_positions, max_positions),
                             persistent=False)
        self.embed_dim = config.n_embd
        self.num_heads = config.n_head
        self.head_dim = self.embed_dim // self.num_heads
        self.split_size = self.embed_dim
        self.scale_attn_weights = config.scale_attn_weights
        self.scale_attn_by_inverse_layer_idx = config.scale_attn_by_inverse_layer_idx
        self.reorder_and_upcast_attn = config.reorder_and_upcast_attn
        self.layer_idx = layer_idx
        self.c_attn = Conv1D(3 * self.embed_dim, self.embed_dim)
        self.c_proj = Conv1D(self.embed_dim, self.embed_dim)
        self.attn_dropout = nn.Dropout(config.attn_pdrop)
        self.resid_dropout = nn.Dropout(config.resid_pdrop)

    def _causal_where(self, attn_weights, query, key):
        # keys after the query (offset by any cached past) get finfo(dtype).min
        query_length, key_length = query.size(-2), key.size(-2)
        causal_mask = self.bias[:, :, key_length - query_length : key_length, :key_length]
        mask_value = torch.full([], torch.finfo(attn_weights.dtype).min,
                                dtype=attn_weights.dtype, device=attn_weights.device)
        return torch.where(causal_mask, attn_weights, mask_value)

    def _attn(self, query, key, value, attention_mask=None, head_mask=None):
        attn_weights = torch.matmul(query, key.transpose(-1, -2))
        if self.scale_attn_weights:
            attn_weights = attn_weights / torch.full(
                [], value.size(-1) ** 0.5, dtype=attn_weights.dtype, device=attn_weights.device)
        if self.scale_attn_by_inverse_layer_idx:
            attn_weights = attn_weights / float(self.layer_idx + 1)
        attn_weights = self._causal_where(attn_weights, query, key)
        if attention_mask is not None:
            attn_weights = attn_weights + attention_mask
        # softmax in the activation dtype (GPT-2 does not upcast here)
        attn_weights = F.softmax(attn_weights, dim=-1)
        attn_weights = attn_weights.type(value.dtype)
        attn_weights = self.attn_dropout(attn_weights)
        if head_mask is not None:
            attn_weights = attn_weights * head_mask
        return torch.matmul(attn_weights, value), attn_weights

    def _upcast_and_reordered_attn(self, query, key, value, attention_mask=None, head_mask=None):
        # float32 scores with the scale folded into the matmul (config option)
        scale = 1.0
        if self.scale_attn_weights:
            scale /= float(value.size(-1)) ** 0.5
        if self.scale_attn_by_inverse_layer_idx:
            scale /= float(self.layer_idx + 1)
        attn_weights = torch.matmul(query.float() * scale, key.float().transpose(-1, -2))
        attn_weights = self._causal_where(attn_weights, query, key)
        if attention_mask is not None:
            attn_weights = attn_weights + attention_mask
        attn_weights = F.softmax(attn_weights, dim=-1).type(value.dtype)
        attn_weights = self.attn_dropout(attn_weights)
        if head_mask is not None:
            attn_weights = attn_weights * head_mask
        return torch.matmul(attn_weights, value), attn_weights

    def _sdpa_attn(self, query, key, value, attention_mask=None):
        # torch's fused attention: the same math as _attn, rounded differently
        query_length, key_length = query.size(-2), key.size(-2)
        dropout_p = self.attn_dropout.p if self.training else 0.0
        if attention_mask is None and query_length == key_length:
            return F.scaled_dot_product_attention(query, key, value, dropout_p=dropout_p,
                                                  is_causal=query_length > 1), None
        zeros = torch.zeros(query_length, key_length, dtype=query.dtype, device=query.device)
        mask = self._causal_where(zeros, query, key)  # (1, 1, Tq, Tk): 0 or finfo.min
        if attention_mask is not None:
            mask = (mask + attention_mask).clamp(min=torch.finfo(query.dtype).min)
        return F.scaled_dot_product_attention(query, key, value, attn_mask=mask,
                                              dropout_p=dropout_p), None

    def _split_heads(self, tensor):
        # (B, T, C) -> (B, heads, T, head_dim)
        new_shape = tensor.size()[:-1] + (self.num_heads, self.head_dim)
        return tensor.view(new_shape).permute(0, 2, 1, 3)

    def _merge_heads(self, tensor):
        # (B, heads, T, head_dim) -> (B, T, C)
        tensor = tensor.permute(0, 2, 1, 3).contiguous()
        return tensor.view(tensor.size()[:-2] + (self.num_heads * self.head_dim,))

    def forward(
        self,
        hidden_states: torch.Tensor,
        layer_past: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
        attention_mask: Optional[torch.Tensor] = None,
        head_mask: Optional[torch.Tensor] = None,
        use_cache: bool = False,
        output_attentions: bool = False,
    ):
        query, key, value = self.c_attn(hidden_states).split(self.split_size, dim=2)
        query = self._split_heads(query)
        key = self._split_heads(key)
        value = self._split_heads(value)

        if layer_past is not None:
            past_key, past_value = layer_past
            key = torch.cat((past_key, key), dim=-2)
            value = torch.cat((past_value, value), dim=-2)
        present = (key, value) if use_cache else None

        use_sdpa = (self.config.attn_implementation == "sdpa" and not output_attentions
                    and head_mask is None and hasattr(F, "scaled_dot_product_attention")
                    and self.scale_attn_weights and not self.scale_attn_by_inverse_layer_idx
                    and not self.reorder_and_upcast_attn)
        if use_sdpa:
            attn_output, attn_weights = self._sdpa_attn(query, key, value, attention_mask)
        elif self.reorder_and_upcast_attn:
            attn_output, attn_weights = self._upcast_and_reordered_attn(
                query, key, value, attention_mask, head_mask)
        else:
            attn_output, attn_weights = self._attn(query, key, value, attention_mask, head_mask)

        attn_output = self._merge_heads(attn_output)
        attn_output = self.c_proj(attn_output)
        attn_output = self.resid_dropout(attn_output)

        outputs = (attn_output, present)
        if output_attentions:
            outputs += (attn_weights,)
        return outputs


class GPT2MLP(nn.Module):
    def __init__(self, intermediate_size: int, config: GPT2Config):
        super().__init__()
        self.c_fc = Conv1D(intermediate_size, config.n_embd)
        self.c_proj = Conv1D(config.n_embd, intermediate_size)
        self.act = ACT2CLS[config.activation_function]()
        self.dropout = nn.Dropout(config.resid_pdrop)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        hidden_states = self.c_fc(hidden_states)
        hidden_states = self.act(hidden_states)
        hidden_states = self.c_proj(hidden_states)
        return self.dropout(hidden_states)


class GPT2Block(nn.Module):
    def __init__(self, config: GPT2Config, layer_idx: Optional[int] = None):
        super().__init__()
        inner_dim = config.n_inner if config.n_inner is not None else 4 * config.n_embd
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.attn = GPT2Attention(config, layer_idx=layer_idx)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.mlp = GPT2MLP(inner_dim, config)

    def forward(
        self,
        hidden_states: torch.Tensor,
        layer_past: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
        attention_mask: Optional[torch.Tensor] = None,
        head_mask: Optional[torch.Tensor] = None,
        use_cache: bool = False,
        output_attentions: bool = False,
    ):
        residual = hidden_states
        hidden_states = self.ln_1(hidden_states)
        attn_outputs = self.attn(
            hidden_states,
            layer_past=layer_past,
            attention_mask=attention_mask,
            head_mask=head_mask,
            use_cache=use_cache,
            output_attentions=output_attentions,
        )
        attn_output = attn_outputs[0]
        outputs = attn_outputs[1:]  # (present, attn_weights?)
        hidden_states = attn_output + residual

        residual = hidden_states
        hidden_states = self.ln_2(hidden_states)
        feed_forward_hidden_states = self.mlp(hidden_states)
        hidden_states = residual + feed_forward_hidden_states

        if use_cache:
            return (hidden_states,) + outputs
        return (hidden_states,) + outputs[1:]


# ---------------------------------------------------------------- models


class GPT2Model(GPT2PreTrainedModel):
    def __init__(self, config: GPT2Config):
        super().__init__(config)
        self.embed_dim = config.n_embd
        self.wte = nn.Embedding(config.vocab_size, self.embed_dim)
        self.wpe = nn.Embedding(config.n_positions, self.embed_dim)
        self.drop = nn.Dropout(config.embd_pdrop)
        self.h = nn.ModuleList([GPT2Block(config, layer_idx=i) for i in range(config.n_layer)])
        self.ln_f = nn.LayerNorm(self.embed_dim, eps=config.layer_norm_epsilon)
        self.gradient_checkpointing = False
        self.post_init()

    def get_head_mask(self, head_mask, num_layers):
        """None, or (heads,) / (layers, heads) multipliers -> per-layer (1, heads, 1, 1)."""
        if head_mask is None:
            return [None] * num_layers
        if head_mask.dim() == 1:
            head_mask = head_mask[None, :].expand(num_layers, -1)
        return [m[None, :, None, None].to(dtype=self.dtype) for m in head_mask]

    def forward(
        self,
        input_ids: Optional[torch.LongTensor] = None,
        past_key_values: Optional[Tuple[Tuple[torch.Tensor, torch.Tensor], ...]] = None,
        attention_mask: Optional[torch.Tensor] = None,
        token_type_ids: Optional[torch.LongTensor] = None,
        position_ids: Optional[torch.LongTensor] = None,
        head_mask: Optional[torch.Tensor] = None,
        inputs_embeds: Optional[torch.FloatTensor] = None,
        use_cache: Optional[bool] = None,
        output_attentions: Optional[bool] = None,
        output_hidden_states: Optional[bool] = None,
        return_dict: Optional[bool] = None,
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
        if input_ids is not None:
            input_shape = input_ids.size()
            input_ids = input_ids.view(-1, input_shape[-1])
        else:
            input_shape = inputs_embeds.size()[:-1]
        batch_size = input_shape[0]
        device = input_ids.device if input_ids is not None else inputs_embeds.device

        if past_key_values is None:
            past_length = 0
            past_key_values = tuple([None] * len(self.h))
        else:
            past_length = past_key_values[0][0].size(-2)
        if position_ids is None:
            position_ids = torch.arange(past_length, input_shape[-1] + past_length,
                                        dtype=torch.long, device=device).unsqueeze(0)

        # 2D keep flags (B, T_total) -> additive (B, 1, 1, T_total): 0 keep, finfo.min drop
        if attention_mask is not None:
            attention_mask = attention_mask.view(batch_size, -1)
            attention_mask = attention_mask[:, None, None, :]
            attention_mask = attention_mask.to(dtype=self.dtype)
            attention_mask = (1.0 - attention_mask) * torch.finfo(self.dtype).min

        head_mask = self.get_head_mask(head_mask, cfg.n_layer)
        if inputs_embeds is None:
            inputs_embeds = self.wte(input_ids)
        position_embeds = self.wpe(position_ids)
        hidden_states = inputs_embeds + position_embeds
        if token_type_ids is not None:
            hidden_states = hidden_states + self.wte(token_type_ids.view(-1, input_shape[-1]))
        hidden_states = self.drop(hidden_states)
        output_shape = (-1,) + tuple(input_shape[1:]) + (hidden_states.size(-1),)

        if self.gradient_checkpointing and self.training and use_cache:
            use_cache = False  # checkpointing recomputes blocks; no cache
        presents = () if use_cache else None
        all_self_attentions = () if output_attentions else None
        all_hidden_states = () if output_hidden_states else None
        for i, (block, layer_past) in enumerate(zip(self.h, past_key_values)):
            if output_hidden_states:
                all_hidden_states += (hidden_states,)
            if self.gradient_checkpointing and self.training:
                outputs = torch.utils.checkpoint.checkpoint(
                    block.__call__, hidden_states, None, attention_mask, head_mask[i],
                    use_cache, output_attentions)
            else:
                outputs = block(
                    hidden_states,
                    layer_past=layer_past,
                    attention_mask=attention_mask,
                    head_mask=head_mask[i],
                    use_cache=use_cache,
                    output_attentions=output_attentions,
                )
            hidden_states = outputs[0]
            if use_cache:
                presents += (outputs[1],)
            if output_attentions:
                all_self_attentions += (outputs[2 if use_cache else 1],)

        hidden_states = self.ln_f(hidden_states)
        hidden_states = hidden_states.view(output_shape)
        if output_hidden_states:
            all_hidden_states += (hidden_states,)

        if not return_dict:
            return tuple(v for v in (hidden_states, presents, all_hidden_states,
                                     all_self_attentions) if v is not None)
        return BaseModelOutputWithPastAndCrossAttentions(
            last_hidden_state=hidden_states,
            past_key_values=presents,
            hidden_states=all_hidden_states,
            attentions=all_self_attentions,
        )


class GPT2LMHeadModel(GPT2PreTrainedModel):
    _tied_weights_keys = ["lm_head.weight"]

    def __init__(self, config: GPT2Config):
        super().__init__(config)
        self.transformer = GPT2Model(config)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.post_init()

    def tie_weights(self):
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.transformer.wte.weight

    def forward(
        self,
        input_ids: Optional[torch.LongTensor] = None,
        past_key_values: Optional[Tuple[Tuple[torch.Tensor, torch.Tensor], ...]] = None,
        attention_mask: Optional[torch.Tensor] = None,
        token_type_ids: Optional[torch.LongTensor] = None,
        position_ids: Optional[torch.LongTensor] = None,
        head_mask: Optional[torch.Tensor] = None,
        inputs_embeds: Optional[torch.FloatTensor] = None,
        labels: Optional[torch.LongTensor] = None,
        use_cache: Optional[bool] = None,
        output_attentions: Optional[bool] = None,
        output_hidden_states: Optional[bool] = None,
        return_dict: Optional[bool] = None,
    ):
        return_dict = self.config.use_return_dict if return_dict is None else return_dict
        transformer_outputs = self.transformer(
            input_ids,
            past_key_values=past_key_values,
            attention_mask=attention_mask,
            token_type_ids=token_type_ids,
            position_ids=position_ids,
            head_mask=head_mask,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            return_dict=True,
        )
        hidden_states = transformer_outputs.last_hidden_state
        lm_logits = self.lm_head(hidden_states)

        loss = None
        if labels is not None:
            shift_logits = lm_logits[..., :-1, :].contiguous()
            shift_labels = labels[..., 1:].contiguous()
            loss = F.cross_entropy(shift_logits.view(-1, shift_logits.size(-1)),
                                   shift_labels.view(-1))

        if not return_dict:
            output = (lm_logits,) + transformer_outputs.to_tuple()[1:]
            return ((loss,) + output) if loss is not None else output
        return CausalLMOutputWithCrossAttentions(
            loss=loss,
            logits=lm_logits,
            past_key_values=transformer_outputs.past_key_values,
            hidden_states=transformer_outputs.hidden_states,
            attentions=transformer_outputs.attentions,
        )


def build(**overrides) -> nn.Module:
    """GPT2LMHeadModel with the tiny default config updated by overrides,
    randomly initialised from torch's global RNG (seed it first), in eval()."""
    valid = sorted(f.name for f in dataclasses.fields(GPT2Config))
    unknown = sorted(set(overrides) - set(valid))
    if unknown:
        raise ValueError(f"unknown GPT2Config keys {unknown}; valid keys: {valid}")
    model = GPT2LMHeadModel(GPT2Config(**overrides))
    return model.eval()
