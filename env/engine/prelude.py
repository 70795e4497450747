# prelude.py — the F prelude of the fmx candidate language: TorchScript
# source that resolver.cpp embeds at build time and compiles once. `F.<name>`
# in a candidate resolves to the function here of that name when there is
# one, else to the aten op `<name>`. Functions are here when the Python
# signature of torch.nn.functional differs from the aten op of the same name
# (argument order, extra arguments such as inplace=), or when a libtorch
# version lacks the op. Names starting with _fmx are helpers, not F names.
#
# Not here: scaled_dot_product_attention and rms_norm themselves, which
# depend on the libtorch version (resolver.cpp picks aten's op or the _fmx_*
# implementation below).
import math
import torch
from torch import Tensor
from typing import List, Optional


def embedding(input: Tensor, weight: Tensor, padding_idx: Optional[int] = None,
              max_norm: Optional[float] = None, norm_type: float = 2.0,
              scale_grad_by_freq: bool = False, sparse: bool = False) -> Tensor:
    if max_norm is not None:
        raise RuntimeError("F.embedding: max_norm renormalises the weight in place; not supported")
    return torch.embedding(weight, input)


def dropout(input: Tensor, p: float = 0.5, training: bool = True,
            inplace: bool = False) -> Tensor:
    if p < 0.0 or p > 1.0:
        raise ValueError("dropout probability has to be between 0 and 1, but got " + str(p))
    if not training or p == 0.0:
        return input
    return torch.dropout(input, p, True)


def layer_norm(input: Tensor, normalized_shape: List[int], weight: Optional[Tensor] = None,
               bias: Optional[Tensor] = None, eps: float = 1e-5) -> Tensor:
    return torch.layer_norm(input, normalized_shape, weight, bias, eps)


def group_norm(input: Tensor, num_groups: int, weight: Optional[Tensor] = None,
               bias: Optional[Tensor] = None, eps: float = 1e-5) -> Tensor:
    return torch.group_norm(input, num_groups, weight, bias, eps)


def batch_norm(input: Tensor, running_mean: Optional[Tensor], running_var: Optional[Tensor],
               weight: Optional[Tensor] = None, bias: Optional[Tensor] = None,
               training: bool = False, momentum: float = 0.1, eps: float = 1e-5) -> Tensor:
    if training and (running_mean is not None or running_var is not None):
        raise RuntimeError("F.batch_norm: training=True updates running statistics "
                           "in place; not supported")
    return torch.batch_norm(input, weight, bias, running_mean, running_var, training,
                            momentum, eps, True)


def instance_norm(input: Tensor, running_mean: Optional[Tensor] = None,
                  running_var: Optional[Tensor] = None, weight: Optional[Tensor] = None,
                  bias: Optional[Tensor] = None, use_input_stats: bool = True,
                  momentum: float = 0.1, eps: float = 1e-5) -> Tensor:
    if use_input_stats and (running_mean is not None or running_var is not None):
        raise RuntimeError("F.instance_norm: use_input_stats with running statistics "
                           "updates them in place; not supported")
    return torch.instance_norm(input, weight, bias, running_mean, running_var,
                               use_input_stats, momentum, eps, True)


def linear(input: Tensor, weight: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    return torch.linear(input, weight, bias)


def softmax(input: Tensor, dim: Optional[int] = None, _stacklevel: int = 3,
            dtype: Optional[int] = None) -> Tensor:
    if dim is None:
        raise ValueError("F.softmax: pass dim explicitly")
    return torch.softmax(input, dim, dtype)


def log_softmax(input: Tensor, dim: Optional[int] = None, _stacklevel: int = 3,
                dtype: Optional[int] = None) -> Tensor:
    if dim is None:
        raise ValueError("F.log_softmax: pass dim explicitly")
    return torch.log_softmax(input, dim, dtype)


def softmin(input: Tensor, dim: Optional[int] = None, _stacklevel: int = 3,
            dtype: Optional[int] = None) -> Tensor:
    if dim is None:
        raise ValueError("F.softmin: pass dim explicitly")
    return torch.softmax(torch.neg(input), dim, dtype)


def gelu(input: Tensor, approximate: str = "none") -> Tensor:
    return torch.gelu(input, approximate=approximate)


def silu(input: Tensor, inplace: bool = False) -> Tensor:
    return torch.silu(input)


def relu(input: Tensor, inplace: bool = False) -> Tensor:
    return torch.relu(input)


def relu6(input: Tensor, inplace: bool = False) -> Tensor:
    return torch.hardtanh(input, 0.0, 6.0)


def leaky_relu(input: Tensor, negative_slope: float = 0.01, inplace: bool = False) -> Tensor:
    return torch.leaky_relu(input, negative_slope)


def elu(input: Tensor, alpha: float = 1.0, inplace: bool = False) -> Tensor:
    return torch.elu(input, alpha)


def selu(input: Tensor, inplace: bool = False) -> Tensor:
    return torch.selu(input)


def celu(input: Tensor, alpha: float = 1.0, inplace: bool = False) -> Tensor:
    return torch.celu(input, alpha)


def mish(input: Tensor, inplace: bool = False) -> Tensor:
    return torch.mish(input)


def hardswish(input: Tensor, inplace: bool = False) -> Tensor:
    return torch.hardswish(input)


def hardsigmoid(input: Tensor, inplace: bool = False) -> Tensor:
    return torch.hardsigmoid(input)


def hardtanh(input: Tensor, min_val: float = -1.0, max_val: float = 1.0,
             inplace: bool = False) -> Tensor:
    return torch.hardtanh(input, min_val, max_val)


def threshold(input: Tensor, threshold: float, value: float, inplace: bool = False) -> Tensor:
    return torch.threshold(input, threshold, value)


def logsigmoid(input: Tensor) -> Tensor:
    return torch.log_sigmoid(input)


def softsign(input: Tensor) -> Tensor:
    return input / (input.abs() + 1)


def tanhshrink(input: Tensor) -> Tensor:
    return input - input.tanh()


def sigmoid(input: Tensor) -> Tensor:
    return torch.sigmoid(input)


def tanh(input: Tensor) -> Tensor:
    return torch.tanh(input)


def pad(input: Tensor, pad: List[int], mode: str = "constant",
        value: Optional[float] = None) -> Tensor:
    if mode == "constant":
        fill = 0.0
        if value is not None:
            fill = value
        return torch.constant_pad_nd(input, pad, fill)
    if value is not None:
        raise ValueError("F.pad: padding mode \"" + mode + "\" doesn't take in value argument")
    return torch.pad(input, pad, mode)


def _fmx_finfo_min(dtype: int) -> float:
    if dtype == torch.float32:
        return -3.4028234663852886e+38
    if dtype == torch.float16:
        return -65504.0
    if dtype == torch.bfloat16:
        return -3.3895313892515355e+38
    if dtype == torch.float64:
        return -1.7976931348623157e+308
    raise TypeError("torch.finfo: not a floating point dtype")


def _fmx_finfo_max(dtype: int) -> float:
    return -_fmx_finfo_min(dtype)


def _fmx_finfo_eps(dtype: int) -> float:
    if dtype == torch.float32:
        return 1.1920928955078125e-07
    if dtype == torch.float16:
        return 0.0009765625
    if dtype == torch.bfloat16:
        return 0.0078125
    if dtype == torch.float64:
        return 2.220446049250313e-16
    raise TypeError("torch.finfo: not a floating point dtype")


def _fmx_finfo_tiny(dtype: int) -> float:
    if dtype == torch.float32 or dtype == torch.bfloat16:
        return 1.1754943508222875e-38
    if dtype == torch.float16:
        return 6.103515625e-05
    if dtype == torch.float64:
        return 2.2250738585072014e-308
    raise TypeError("torch.finfo: not a floating point dtype")


def normalize(input: Tensor, p: float = 2.0, dim: int = 1, eps: float = 1e-12,
              out: Optional[Tensor] = None) -> Tensor:
    if out is not None:
        raise RuntimeError("F.normalize: out= writes a tensor in place; not supported")
    denom = input.norm(p, [dim], True).clamp_min(eps).expand_as(input)
    return input / denom


# aten's _scaled_dot_product_attention_math, for libtorch without the op:
# q and k each scaled by sqrt(scale), a bool mask keeps True, a float mask is
# added, softmax in the input dtype, and rows whose every score is masked
# give zeros (as _safe_softmax does), not NaN.
def _fmx_sdpa_math(query: Tensor, key: Tensor, value: Tensor,
                   attn_mask: Optional[Tensor] = None, dropout_p: float = 0.0,
                   is_causal: bool = False, scale: Optional[float] = None,
                   enable_gqa: bool = False) -> Tensor:
    L = query.size(-2)
    S = key.size(-2)
    scale_factor = 1.0 / math.sqrt(query.size(-1))
    if scale is not None:
        scale_factor = scale
    if enable_gqa:
        rep = query.size(-3) // key.size(-3)
        key = key.repeat_interleave(rep, -3)
        value = value.repeat_interleave(rep, -3)
    root = math.sqrt(scale_factor)
    attn = torch.matmul(query * root, key.transpose(-2, -1) * root)
    if is_causal:
        if attn_mask is not None:
            raise RuntimeError("scaled_dot_product_attention: Explicit attn_mask should "
                               "not be set when is_causal=True")
        keep = torch.ones([L, S], dtype=torch.bool, device=query.device).tril()
        attn = attn.masked_fill(keep.logical_not(), -math.inf)
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            attn = attn.masked_fill(attn_mask.logical_not(), -math.inf)
        else:
            attn = attn + attn_mask
    probs = torch.softmax(attn, -1)
    dead = (attn == -math.inf).all(-1, keepdim=True)
    probs = probs.masked_fill(dead, 0.0)
    if dropout_p > 0.0:
        probs = torch.dropout(probs, dropout_p, True)
    return torch.matmul(probs, value)


# aten's composite rms_norm (torch >= 2.4), for libtorch without it: float32
# math for float16/bfloat16, eps defaulting to that type's epsilon.
def _fmx_rms_norm_math(input: Tensor, normalized_shape: List[int],
                       weight: Optional[Tensor] = None,
                       eps: Optional[float] = None) -> Tensor:
    dims: List[int] = []
    for i in range(len(normalized_shape)):
        dims.append(input.dim() - i - 1)
    h = input
    if input.dtype == torch.float16 or input.dtype == torch.bfloat16:
        h = input.to(torch.float32)
    e = _fmx_finfo_eps(h.dtype)
    if eps is not None:
        e = eps
    out = (h * torch.rsqrt(h.pow(2).mean(dims, keepdim=True) + e)).type_as(input)
    if weight is not None:
        out = out * weight
    return out
