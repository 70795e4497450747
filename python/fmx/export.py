"""The fmx exporter: run a class-based PyTorch model on probe inputs and write a task pack.

A pack (docs/pack-format.md) is `task.json` + `weights.safetensors` +
`weights_hidden.safetensors` + `probes.safetensors`. The exporter builds the model
from a Python file (`FILE.py:NAME`) or a local transformers snapshot, runs it on
visible and hidden probes (a float32 model also on a bfloat16 copy, for two of
them), and records: the module tree, every module call's inputs and outputs
(tensors streamed to disk as they arrive, byte-identical ones stored once),
per-line coverage of the model's package, a function-level op trace per module on
the first probe, the class sources and line ranges, and every parameter and buffer
with its ties. With `--sensitive-init` (always with random transformers weights) it
first redraws the weights so that every op moves the output (`sensitive_init`).
Hidden probes run under a second, independent draw of the weights (hidden.py), and
every norm's eps is rerun changed to say which constants no probe sees
(constants.py).

It is not a verifier and never runs candidate code; the C server does that.

    python3 -m fmx.export examples/models/qwen2.py:build -o packs/qwen2 --set num_hidden_layers=2
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import functools
import importlib.util
import inspect
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

try:
    import torch
except ImportError as _e:  # FMX_PYTHON names an interpreter without torch: one line, exit 2
    if __name__ != "__main__":
        raise
    print(f"fmx export: {sys.executable} cannot import torch ({_e}); set FMX_PYTHON to a python3 with torch",
          file=sys.stderr)
    raise SystemExit(2) from None
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from . import __version__
from . import generate
from . import hidden as hidden_set
from .constants import ConstantCheck
from .dataflow import Flow, generalize, record_op
from .safetensors import Writer, dtype_name, is_storable, save_file

FORMAT = "fmx-pack"
VERSION = 1
# Per output dtype, an element passes when |got - want| <= atol * RMS(want) + rtol * |want|.
# Measured and chosen in docs/pack-format.md ("Tolerances"): TOLERANCE for a verifier on the
# torch build and device in created_by (a faithful rewrite is bit-exact there; bfloat16 allows
# one rounding per element), TOLERANCE_CROSS_BUILD for any other build.
TOLERANCE = {"float32": {"atol": 1e-5, "rtol": 1e-5}, "bfloat16": {"atol": 2**-7, "rtol": 2**-7}}
TOLERANCE_CROSS_BUILD = {"float32": {"atol": 1e-5, "rtol": 1e-5}, "bfloat16": {"atol": 2**-3, "rtol": 2**-3}}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
TOLERANCE_DTYPES = ("float64", "float32", "float16", "bfloat16")
PADDINGS = ("none", "left", "right")
# (batch, seq, padding); the first `probes` visible, then `hidden` hidden ones.
VISIBLE_SHAPES = [(1, 8, "none"), (2, 13, "left"), (3, 6, "right")]
HIDDEN_SHAPES = [(2, 17, "right"), (1, 64, "none"), (3, 11, "left")]
LONG_PROBE = 64      # a pack should have a probe at least this long (the hidden 1x64)
MAX_WINDOW = 512     # a sliding window up to this long gets a hidden probe past it
LOW_PRECISION = "bfloat16"  # the reduced-precision copy probed in a float32 pack
HIDDEN_WEIGHTS = "weights_hidden.safetensors"  # the weights hidden probes run under

InputsFn = Callable[[nn.Module, int, int, str, torch.Generator], Dict[str, Any]]


class ExportError(Exception):
    """A bad request (spec, options, output directory): the CLI prints one line and exits 2."""


# --------------------------------------------------------------------------- model loading


def load_spec(spec: str) -> Tuple[Any, Any, str]:
    """Import FILE of `FILE.py:NAME`; returns (python module, the NAME object, real file path)."""
    path, sep, name = spec.rpartition(":")
    if not sep or not path or not name:
        raise ExportError(f"bad model spec {spec!r}: expected FILE.py:NAME (a factory function or a model class)")
    if not os.path.isfile(path):
        raise ExportError(f"model file not found: {path}")
    real = os.path.realpath(path)
    modname = os.path.splitext(os.path.basename(real))[0]
    if not modname.isidentifier():
        raise ExportError(f"model file name {os.path.basename(real)!r} is not a Python module name")
    def file_of(name: str) -> Optional[str]:
        mod = sys.modules.get(name)
        return None if mod is None else os.path.realpath(getattr(mod, "__file__", None) or "?")

    base, n = modname, 0
    while file_of(modname) not in (None, real):  # the name is taken by another file: don't replace it
        n += 1
        modname = f"{base}_{n}"
    if file_of(modname) == real:
        module = sys.modules[modname]
    else:
        loader_spec = importlib.util.spec_from_file_location(modname, real)
        if loader_spec is None or loader_spec.loader is None:
            raise ExportError(f"cannot import {path} as a Python module")
        module = importlib.util.module_from_spec(loader_spec)
        folder = os.path.dirname(real)
        sys.path.insert(0, folder)
        sys.modules[modname] = module  # dataclasses and pickling look the module up by name
        try:
            loader_spec.loader.exec_module(module)
        except BaseException:
            del sys.modules[modname]
            raise
        finally:
            if folder in sys.path:
                sys.path.remove(folder)
    if not hasattr(module, name):
        found = sorted(
            n for n, v in vars(module).items()
            if not n.startswith("_") and callable(v) and getattr(v, "__module__", None) == module.__name__
        )
        raise ExportError(f"{path} has no {name!r}; it defines: {', '.join(found) or 'nothing callable'}")
    return module, getattr(module, name), real


def build_from_spec(spec: str, overrides: Mapping[str, Any]) -> Tuple[nn.Module, Any, str]:
    """Build the model of `FILE.py:NAME` with `overrides`; returns (model, python module, file)."""
    module, obj, real = load_spec(spec)
    name = spec.rpartition(":")[2]
    try:
        if isinstance(obj, type) and issubclass(obj, nn.Module) and getattr(obj, "config_class", None) is not None:
            _check_fields(obj.config_class, overrides)
            model = obj(obj.config_class(**overrides))
        elif callable(obj):
            model = obj(**overrides)
        else:
            raise ExportError(f"{name} in {spec.rpartition(':')[0]} is a {type(obj).__name__}, not a factory or a model class")
    except (TypeError, ValueError, KeyError) as e:  # a --set typo or a bad value: the model's own words
        what = f" with --set {', '.join(overrides)}" if overrides else ""
        raise ExportError(f"building {name}{what} failed: {type(e).__name__}: {e}".splitlines()[0]) from None
    if not isinstance(model, nn.Module):
        raise ExportError(f"{name}(...) returned a {type(model).__name__}, not a torch.nn.Module")
    return model, module, real


def _check_fields(config_class: Any, overrides: Mapping[str, Any]) -> None:
    """Refuses an override that names no field of a dataclass config (a typo would be ignored)."""
    if not dataclasses.is_dataclass(config_class):
        return
    fields = {f.name for f in dataclasses.fields(config_class)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ValueError(f"{config_class.__name__} has no field {', '.join(map(repr, unknown))}; "
                         f"its fields: {', '.join(sorted(fields))}")


def build_from_hf(path: Optional[str], config_path: Optional[str], random_init: bool,
                  overrides: Mapping[str, Any]) -> Tuple[nn.Module, InputsFn]:
    """A transformers model of any family from a local snapshot (`path`) or a config file (random
    weights), and the probe inputs fmx makes for it (fmx/hf.py)."""
    from . import hf

    if not hf.available():
        raise ExportError(
            "--hf/--hf-config need the transformers package, which is not installed; "
            "export a model file instead: python3 -m fmx.export FILE.py:NAME -o OUT"
        )
    try:
        return hf.build(path, config_path, random_init, overrides)
    except hf.HFError as e:
        raise ExportError(str(e)) from None


def parse_value(text: str) -> Any:
    """A --set VALUE: JSON if it parses, else the plain string."""
    try:
        return json.loads(text)
    except ValueError:
        return text


def parse_overrides(items: Sequence[str]) -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ExportError(f"bad --set {item!r}: expected KEY=VALUE")
        out[key] = parse_value(value)
    return out


# --------------------------------------------------------------------------- random weights

RESIDUAL_STD = 0.03
# A module whose output is added to the residual stream, by its dotted path:
# attention output and MLP down projections across transformers' families.
RESIDUAL_OUT = re.compile(r"(^|\.)(o_proj|out_proj|down_proj|c_proj|dense|dense_4h_to_h|fc2|fc_out|w2)$")
RESIDUAL_OUT_EXCLUDE = re.compile(r"(^|\.)intermediate\.")  # BERT-style up projections named dense


def sensitive_init(model: nn.Module, seed: int = 0, residual_std: float = RESIDUAL_STD) -> Dict[str, int]:
    """Redraw every floating parameter by its role so that every op moves the output.

    The rule (docs/pack-format.md, "Random weights"): inputs of nonlinearities
    O(1), the residual stream small enough that every norm's eps matters, nothing
    constant. A tied parameter takes the role of its first name in module order;
    buffers are left alone. Draws come from a generator seeded with `seed`.
    Returns how many parameters got each role.
    """
    gen = torch.Generator().manual_seed(seed)
    counts: Dict[str, int] = {}
    done: set = set()

    def normal(p: Tensor, std: float) -> Tensor:
        return torch.randn(p.shape, generator=gen, dtype=torch.float32) * std

    with torch.no_grad():
        for path, module in model.named_modules():
            kind = type(module).__name__.lower()
            residual = bool(RESIDUAL_OUT.search(path)) and not RESIDUAL_OUT_EXCLUDE.search(path)
            scale = residual_std if residual else 1.0
            for pname, p in module.named_parameters(recurse=False):
                if id(p) in done or not p.is_floating_point() or p.numel() == 0:
                    continue
                done.add(id(p))
                if "norm" in kind and p.dim() == 1 and pname == "weight":  # 1 + N(0, 0.1); a (1 + w) norm
                    base = 1.0 if float(p.float().mean()) > 0.5 else 0.0        # starts at zeros: N(0, 0.1)
                    role, value = "norm_weight", base + normal(p, 0.1)
                elif "norm" in kind and p.dim() == 1:
                    role, value = "norm_bias", normal(p, 0.1)
                elif "embedding" in kind and pname == "weight" and p.dim() == 2:
                    role, value = "embedding", normal(p, residual_std / _embed_scale(module))
                elif pname == "weight" and p.dim() >= 2:  # Linear (out, in), Conv1D (in, out), convs
                    fan_in = p.shape[0] if p.dim() == 2 and getattr(module, "nx", None) == p.shape[0] else p[0].numel()
                    role, value = "residual_out" if residual else "linear", normal(p, scale * fan_in**-0.5)
                elif pname == "bias" and p.dim() == 1:
                    role, value = "residual_bias" if residual else "bias", normal(p, scale * 0.1)
                else:  # anything else: 10% jitter around its constructed value (N(0, 0.1) if all zero)
                    rms = float(p.float().pow(2).mean().sqrt())
                    role, value = "other", p.float() + normal(p, 0.1 * rms if rms > 0 else 0.1)
                p.copy_(value.to(p.device, p.dtype))
                counts[role] = counts.get(role, 0) + 1
    return counts


def residual_stream(model: nn.Module) -> List[str]:
    """Names of the parameters that set the residual stream's scale in a pre-norm model, by the
    roles of `sensitive_init`: embeddings and the weights and biases of projections into the
    stream (a tied parameter by the role of its first name). Scaling them all by s scales the
    stream by s, which every norm divides out but for its eps."""
    names: List[str] = []
    done: set = set()
    for path, module in model.named_modules():
        kind = type(module).__name__.lower()
        residual = bool(RESIDUAL_OUT.search(path)) and not RESIDUAL_OUT_EXCLUDE.search(path)
        for pname, p in module.named_parameters(recurse=False):
            if id(p) in done or not p.is_floating_point() or p.numel() == 0:
                continue
            done.add(id(p))
            if "norm" in kind:
                continue
            if ("embedding" in kind and pname == "weight" and p.dim() == 2) or \
                    (residual and (pname == "weight" and p.dim() >= 2 or pname == "bias" and p.dim() == 1)):
                names.append(f"{path}.{pname}" if path else pname)
    return names


def _embed_scale(module: nn.Module) -> float:
    """The factor a scaled embedding (Gemma's embed_scale) multiplies its output by, else 1."""
    try:
        scale = float(getattr(module, "embed_scale", 1.0))
    except (TypeError, ValueError, RuntimeError):
        return 1.0
    return scale if math.isfinite(scale) and scale > 0 else 1.0


def parse_tolerance(text: str) -> Dict[str, Dict[str, float]]:
    """'float32=1e-5:1e-5,bfloat16=0.0156:0.0156' -> {dtype: {"atol": .., "rtol": ..}}."""
    out: Dict[str, Dict[str, float]] = {}
    for item in text.split(","):
        dtype, sep, values = item.strip().partition("=")
        atol, sep2, rtol = values.partition(":")
        try:
            tol = {"atol": float(atol), "rtol": float(rtol)}
        except ValueError:
            tol = {}
        if not sep or not sep2 or dtype not in TOLERANCE_DTYPES or not tol or \
                not all(math.isfinite(v) and v >= 0 for v in tol.values()):
            raise ExportError(f"bad --tolerance {item.strip()!r}: expected DTYPE=ATOL:RTOL with DTYPE one of "
                              f"{', '.join(TOLERANCE_DTYPES)} and non-negative numbers, e.g. float32=1e-5:1e-5")
        out[dtype] = tol
    return out


# --------------------------------------------------------------------------- probes


@dataclasses.dataclass
class Probe:
    name: str
    visible: bool
    batch: int
    seq: int
    padding: str
    dtype: Optional[str] = None     # a reduced-precision copy's dtype; None: the pack's
    inputs_of: Optional[int] = None  # a copy's inputs are those of this probe index


def parse_probe_shapes(text: str) -> List[Tuple[int, int, str]]:
    """'1x8:none,2x13:left' -> [(1, 8, 'none'), (2, 13, 'left')]; padding defaults to none."""
    shapes = []
    for item in text.split(","):
        item = item.strip()
        m = re.fullmatch(r"(\d+)x(\d+)(?::(\w+))?", item)
        if not m or m.group(3) not in (None,) + PADDINGS:
            raise ExportError(f"bad probe shape {item!r}: expected BATCHxSEQ[:none|left|right], e.g. 2x13:left")
        shapes.append((int(m.group(1)), int(m.group(2)), m.group(3) or "none"))
    return shapes


def plan_probes(probes: int, hidden: int, shapes: Optional[Sequence[Tuple[int, int, str]]],
                max_len: Optional[int]) -> List[Probe]:
    """Visible probes first, then hidden ones, named p0, p1, ...

    With `shapes`, the first `probes` shapes are visible and the next (up to
    `hidden`) hidden. Without, the default shapes, extended if more are asked.
    """
    if probes < 1:
        raise ExportError("--probes must be at least 1 (the op trace and the visible captures come from them)")
    if hidden < 0:
        raise ExportError("--hidden must not be negative")
    if shapes is not None:
        visible_shapes = list(shapes[:probes])
        hidden_shapes = list(shapes[len(visible_shapes):len(visible_shapes) + hidden])
    else:
        visible_shapes = [_default_shape(VISIBLE_SHAPES, i) for i in range(probes)]
        hidden_shapes = [_default_shape(HIDDEN_SHAPES, i) for i in range(hidden)]
    plan = []
    for visible, group in ((True, visible_shapes), (False, hidden_shapes)):
        for batch, seq, padding in group:
            if max_len is not None:
                seq = min(seq, max_len)
            if batch < 1 or seq < 1:
                raise ExportError(f"probe shape {batch}x{seq} is empty")
            if padding != "none" and seq < 3:
                raise ExportError(f"probe shape {batch}x{seq}:{padding}: padding needs seq >= 3")
            plan.append(Probe(f"p{len(plan)}", visible, batch, seq, padding))
    return plan


def _default_shape(base: Sequence[Tuple[int, int, str]], i: int) -> Tuple[int, int, str]:
    if i < len(base):
        return base[i]
    return (1 + i % 3, 5 + (7 * i) % 29, PADDINGS[i % 3])


def window_probe(config: Any, max_len: Optional[int]) -> Tuple[Optional[Tuple[int, int, str]], str]:
    """(shape, why) of a hidden probe past the config's sliding window; shape None where there is
    no window, it is off, longer than MAX_WINDOW (not affordable) or no position lies past it."""
    window = getattr(config, "sliding_window", None)
    if not isinstance(window, int) or isinstance(window, bool) or window <= 0:
        return None, "no sliding window in the config"
    if getattr(config, "use_sliding_window", True) is False:
        return None, f"sliding_window {window} is off (use_sliding_window is false): no probe past it"
    if window > MAX_WINDOW:
        return None, f"sliding_window {window} > {MAX_WINDOW}: a probe past it is not affordable"
    seq = window + max(8, window // 4)
    if max_len is not None:
        seq = min(seq, max_len)
    if seq <= window:
        return None, f"sliding_window {window}: no position past it (max length {max_len})"
    return (1, seq, "none"), f"hidden 1x{seq} probe: past the sliding window of {window}"


def low_precision_copies(plan: Sequence[Probe], dtype: str) -> List[Probe]:
    """The probes rerun on a `dtype` copy of the model: one visible and one hidden, left-padded
    by preference (padding and casts both matter there), then right-padded, then any."""
    rank = {"left": 0, "right": 1, "none": 2}
    copies = []
    for visible in (True, False):
        group = [i for i, p in enumerate(plan) if p.visible == visible]
        if group:
            i = min(group, key=lambda i: (rank[plan[i].padding], i))
            src = plan[i]
            copies.append(Probe(f"p{len(plan) + len(copies)}", src.visible, src.batch, src.seq, src.padding,
                                dtype, i))
    return copies


def padding_mask(batch: int, seq: int, padding: str, generator: torch.Generator) -> Tensor:
    """(B, T) I64 keep flags: every row but the last loses 1 <= n < T/2 positions on `padding`'s side."""
    mask = torch.ones(batch, seq, dtype=torch.int64)
    if padding == "none":
        return mask
    high = max(1, (seq - 1) // 2)
    for row in range(batch - 1):
        n = int(torch.randint(1, high + 1, (1,), generator=generator))
        if padding == "left":
            mask[row, :n] = 0
        else:
            mask[row, seq - n:] = 0
    return mask


def default_inputs(model: nn.Module, batch: int, seq: int, padding: str, generator: torch.Generator) -> Dict[str, Any]:
    """input_ids uniform in [0, vocab) and an attention_mask; padded ids are pad_token_id when set."""
    config = getattr(model, "config", None)
    vocab = getattr(config, "vocab_size", None)
    if not isinstance(vocab, int) or vocab < 1:
        raise ExportError(
            "cannot make probe inputs: the model has no config.vocab_size; define "
            "fmx_inputs(model, batch, seq, padding, generator) -> dict in the model file"
        )
    ids = torch.randint(0, vocab, (batch, seq), generator=generator, dtype=torch.int64)
    mask = padding_mask(batch, seq, padding, generator)
    pad = getattr(config, "pad_token_id", None)
    if isinstance(pad, int) and not isinstance(pad, bool) and 0 <= pad < vocab:
        ids = ids.masked_fill(mask == 0, pad)
    return {"input_ids": ids, "attention_mask": mask}


def _max_len(config: Any) -> Optional[int]:
    for attr in ("max_position_embeddings", "n_positions"):
        value = getattr(config, attr, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def _mask_of(inputs: Mapping[str, Any], batch: int, seq: int) -> Tensor:
    mask = inputs.get("attention_mask")
    if isinstance(mask, Tensor) and tuple(mask.shape) == (batch, seq):
        return (mask.detach().to("cpu") != 0).to(torch.int64)
    return torch.ones(batch, seq, dtype=torch.int64)


# --------------------------------------------------------------------------- flattening values

_CACHE_NAME = re.compile(r"past|present|cache", re.IGNORECASE)
_REPR_MAX = 200


def _short_repr(value: Any) -> str:
    try:
        text = repr(value)
    except Exception as e:  # a broken __repr__ must not fail the export
        text = f"<{type(value).__name__}: repr failed: {e}>"
    return text if len(text) <= _REPR_MAX else text[:_REPR_MAX - 3] + "..."


def _is_cache(name: str, value: Any) -> bool:
    if "Cache" in type(value).__name__:
        return True
    return (
        isinstance(value, (tuple, list)) and len(value) > 0 and bool(_CACHE_NAME.search(name))
        and all(isinstance(v, (tuple, list)) and all(isinstance(x, Tensor) for x in v) for v in value)
    )


def _has_tensor(value: Any) -> bool:
    if isinstance(value, Tensor):
        return True
    if isinstance(value, (tuple, list)):
        return any(_has_tensor(v) for v in value)
    if isinstance(value, Mapping):
        return any(_has_tensor(v) for v in value.values())
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return any(_has_tensor(getattr(value, f.name, None)) for f in dataclasses.fields(value))
    return False


def _json_scalar(value: Any) -> bool:
    if isinstance(value, float):
        return math.isfinite(value)
    return isinstance(value, (bool, int, str))


def _fields(value: Any) -> Optional[List[Tuple[str, Any]]]:
    """Named parts of a structured value (dataclass incl. ModelOutput, mapping, namedtuple), else None."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return [(f.name, getattr(value, f.name, None)) for f in dataclasses.fields(value)]
    if isinstance(value, Mapping):
        return [(str(k), v) for k, v in value.items()]
    if isinstance(value, tuple) and hasattr(value, "_fields"):
        return [(str(k), getattr(value, k)) for k in value._fields]
    return None


def flatten(name: str, value: Any) -> Iterator[Tuple[str, str, Any]]:
    """(name, kind, payload) leaves of a value; kinds: tensor, none, cache, value, other.

    Tuples and lists that hold tensors become NAME_0, NAME_1, ...; dataclasses and
    mappings NAME_field. An empty `name` names the parts by themselves.
    """
    def join(part: str) -> str:
        return f"{name}_{part}" if name else part

    if isinstance(value, Tensor):
        yield name, "tensor", value
    elif value is None:
        yield name, "none", None
    elif _is_cache(name, value):
        yield name, "cache", type(value).__name__
    elif _json_scalar(value):
        yield name, "value", value
    elif (parts := _fields(value)) is not None and _has_tensor(value):
        for part, v in parts:
            yield from flatten(join(part), v)
    elif isinstance(value, (tuple, list)) and _has_tensor(value):
        for i, v in enumerate(value):
            yield from flatten(join(str(i)), v)
    elif isinstance(value, (tuple, list)) and all(_json_scalar(v) for v in value):
        yield name, "value", list(value)
    else:
        yield name, "other", _short_repr(value)


# --------------------------------------------------------------------------- op names


_SKIP_OPS = {
    "torch.Tensor." + n for n in (
        "dim", "size", "numel", "stride", "is_contiguous", "data_ptr", "element_size", "__len__",
        "__format__", "__repr__", "__hash__", "storage_offset", "get_device", "is_floating_point",
    )
}
_C_NAMESPACES = {"torch._C._linalg": ("torch.linalg.", "linalg_"), "torch._C._special": ("torch.special.", "special_"),
                 "torch._C._fft": ("torch.fft.", "fft_")}


def op_name(func: Any) -> Optional[str]:
    """The public name of a torch function or Tensor method ("torch.nn.functional.linear",
    "torch.Tensor.view", "torch.matmul"), or None for attribute getters and trivial queries."""
    name = getattr(func, "__name__", None) or type(func).__name__
    if name in ("__get__", "__set__", "__delete__"):
        return None
    qual = getattr(func, "__qualname__", None) or name
    mod = getattr(func, "__module__", None)
    full = None
    for prefix in ("_TensorBase.", "TensorBase.", "Tensor."):  # C methods (1.13, 2.x), Python ones
        if qual.startswith(prefix) and (prefix != "Tensor." or mod == "torch._tensor"):
            full = "torch.Tensor." + qual[len(prefix):]
            break
    if full is None:
        if qual.startswith("_VariableFunctionsClass."):
            full = "torch." + name
        elif mod == "torch._C._nn":
            full = ("torch.nn.functional." if hasattr(F, name) else "torch._C._nn.") + name
        elif mod == "torch.functional":  # split, einsum, norm, ...: Python functions re-exported as torch.*
            full = "torch." + name
        elif mod in _C_NAMESPACES:
            public, strip = _C_NAMESPACES[mod]
            full = public + (name[len(strip):] if name.startswith(strip) else name)
        elif mod:
            full = f"{mod}.{qual}"
        else:
            full = qual
    if full in _SKIP_OPS or re.match(r"torch\._C\._[^.]*$", full):  # torch._C._set_grad_enabled & co.
        return None
    return full


def _shapes(values: Any, out: List[List[int]]) -> List[List[int]]:
    if isinstance(values, Tensor):
        out.append(list(values.shape))
    elif isinstance(values, (tuple, list)):
        for v in values:
            _shapes(v, out)
    elif isinstance(values, Mapping):
        for v in values.values():
            _shapes(v, out)
    return out


def _arg_text(value: Any) -> Tuple[str, bool]:
    """(compact text, whether it holds a non-tensor) of one op argument."""
    if isinstance(value, Tensor):
        return "T", False
    if isinstance(value, (tuple, list)):
        parts = [_arg_text(v) for v in value]
        inner = ", ".join(p for p, _ in parts)
        text = f"({inner},)" if isinstance(value, tuple) and len(parts) == 1 else (
            f"({inner})" if isinstance(value, tuple) else f"[{inner}]")
        return text, any(n for _, n in parts) or not parts
    if isinstance(value, slice):
        parts = ["" if v is None else _short_repr(v) for v in (value.start, value.stop, value.step)]
        return (":".join(parts[:2]) if value.step is None else ":".join(parts)), True
    if value is Ellipsis:
        return "...", True
    return _short_repr(value), True


def _args_text(args: Sequence[Any], kwargs: Mapping[str, Any]) -> Optional[str]:
    parts = [_arg_text(a) for a in args] + [
        (f"{k}={_arg_text(v)[0]}", not isinstance(v, Tensor)) for k, v in kwargs.items() if not k.startswith("_")]
    if not any(n for _, n in parts):
        return None
    text = ", ".join(p for p, _ in parts)
    return text if len(text) <= _REPR_MAX else text[:_REPR_MAX - 3] + "..."


# --------------------------------------------------------------------------- capture


class _Frame:
    __slots__ = ("path", "ops", "flow")

    def __init__(self, path: str, ops: Optional[List[Dict[str, Any]]], flow: Optional[Flow]) -> None:
        self.path = path
        self.ops = ops  # the op list being recorded for this call, or None
        self.flow = flow  # its dataflow, when recorded


class Capture:
    """Wraps every submodule's forward to record its calls into `calls` and `writer`; with
    `constants`, also reruns every call of a module with an eps-like constant changed."""

    def __init__(self, model: nn.Module, writer: Writer, constants: Optional[ConstantCheck] = None) -> None:
        self.model = model
        self.writer = writer
        self.constants = constants
        self.replaying = False  # a constants rerun: calls inside it are not the model's
        self.mask: Optional[Tensor] = None  # the probe's (B, T) keep flags
        self.calls: List[Dict[str, Any]] = []
        self.ops: Dict[str, List[Dict[str, Any]]] = {}  # module path -> op trace of its first call
        self.flows: Dict[str, Flow] = {}  # module path -> dataflow of that call
        self.stack: List[_Frame] = []
        self.busy = False  # our own tensor handling runs inside the op-trace mode; skip it
        self.trace_ops = False
        self.probe = 0
        self.batch = 0
        self.seq = 0
        self._counts: Dict[str, int] = {}
        self._saved: List[Tuple[nn.Module, Optional[Any]]] = []
        self.signatures: Dict[str, Optional[inspect.Signature]] = {}

    # -- wrapping
    def __enter__(self) -> "Capture":
        for path, module in self.model.named_modules():
            orig = module.forward
            sig = _signature(module)
            self.signatures[path] = sig
            self._saved.append((module, module.__dict__.get("forward")))
            module.forward = self._wrapper(path, module, orig, sig)
        return self

    def __exit__(self, *exc: Any) -> None:
        for module, previous in self._saved:
            if previous is None:
                del module.forward
            else:
                module.forward = previous
        self._saved.clear()

    def start_probe(self, probe: int, batch: int, seq: int, trace_ops: bool, mask: Optional[Tensor] = None) -> None:
        self.probe, self.batch, self.seq, self.trace_ops, self.mask = probe, batch, seq, trace_ops, mask
        self._counts = {}
        if trace_ops:
            self.ops, self.flows = {}, {}

    def trace(self) -> Dict[str, Dict[str, Any]]:
        """The last traced probe's op trace per module path, with its dataflow (dataflow.generalize's
        input). Lets go of the tensors the trace kept alive."""
        out = {}
        for path, ops in self.ops.items():
            flow = self.flows[path]
            flow.keep.clear()
            flow.refs.clear()
            out[path] = {"ops": ops, "info": flow.info, "order": flow.order, "count": flow.count, "aliases": flow.aliases,
                         "returns": flow.returns, "return_names": flow.return_names, "inputs": flow.inputs}
        self.ops, self.flows = {}, {}
        return out

    def _wrapper(self, path: str, module: nn.Module, orig: Callable[..., Any],
                 sig: Optional[inspect.Signature]) -> Callable[..., Any]:
        def forward(*args: Any, **kwargs: Any) -> Any:
            if self.replaying:
                return orig(*args, **kwargs)
            index = self._counts.get(path, 0)
            self._counts[path] = index + 1
            ops = None
            flow = None
            parent = self.stack[-1] if self.trace_ops and self.stack and self.stack[-1].ops is not None else None
            call_rec: Optional[Dict[str, Any]] = None
            leaves: List[Tuple[str, str, Any]] = []
            self.busy = True  # (our bookkeeping reads tensors: not the model's ops)
            if self.trace_ops:
                leaves = [leaf for name, value, _ in _bind(sig, args, kwargs) for leaf in flatten(name, value)]
            if parent is not None:
                call_rec = {"call": path}
                if parent.path and not path.startswith(parent.path + "."):  # a module under two paths
                    call_rec["as"] = _path_under(self.model.get_submodule(parent.path), module)
                if parent.flow is not None:
                    call_rec["x"] = {leaf: parent.flow.encode(payload) for leaf, kind, payload in leaves
                                     if kind in ("tensor", "value", "none")}
                parent.ops.append(call_rec)  # type: ignore[union-attr]
            if self.trace_ops and index == 0:
                ops = self.ops.setdefault(path, [])
                flow = self.flows[path] = Flow(self.model.get_submodule(path) if path else self.model, leaves, ops)
            call = {"probe": self.probe, "module": path, "index": index}
            self.calls.append(call)
            try:
                call["inputs"] = self._inputs(call, sig, args, kwargs)
            finally:
                self.busy = False
            self.stack.append(_Frame(path, ops, flow))
            try:
                out = orig(*args, **kwargs)
            except BaseException as e:  # model code may catch it and go on: say so in the call
                call["outputs"] = []
                call["raised"] = type(e).__name__
                raise
            finally:
                self.stack.pop()
            self.busy = True
            try:
                call["outputs"] = self._outputs(call, out)
                parent_flow = parent.flow if call_rec is not None and parent is not None else None
                if flow is not None or parent_flow is not None:
                    out_leaves = [(leaf or "0", payload) for leaf, kind, payload in flatten("", out) if kind == "tensor"]
                    if flow is not None:
                        flow.returns = [flow.encode(t) for _, t in out_leaves]
                        flow.return_names = [name for name, _ in out_leaves]
                    if parent_flow is not None and call_rec is not None:
                        call_rec["y"] = [parent_flow.new_value(t) for _, t in out_leaves]
                        call_rec["yn"] = [name for name, _ in out_leaves]
            finally:
                self.busy = False
            if self.constants is not None and self.constants.watches(path):
                self._check_constants(path, module, orig, args, kwargs, out)
            return out

        forward.__wrapped__ = orig  # type: ignore[attr-defined]
        return forward

    def _check_constants(self, path: str, module: nn.Module, orig: Callable[..., Any], args: Tuple[Any, ...],
                         kwargs: Dict[str, Any], out: Any) -> None:
        """Reruns the call with its constants changed, unseen by the op trace, coverage and the call list."""
        assert self.constants is not None
        tracer = sys.gettrace()
        self.busy = self.replaying = True
        sys.settrace(None)
        try:
            self.constants.check(path, module, orig, args, kwargs, out, f"p{self.probe}", self.mask)
        finally:
            sys.settrace(tracer)
            self.busy = self.replaying = False

    # -- recording
    def _key(self, call: Mapping[str, Any], side: str, name: str) -> str:
        return f"p{call['probe']}/{call['module']}/{call['index']}/{side}/{name}"

    def _entry(self, call: Mapping[str, Any], side: str, name: str, kind: str, payload: Any) -> Dict[str, Any]:
        if kind == "tensor" and not is_storable(payload):
            kind, payload = "other", f"Tensor({payload.dtype}, {list(payload.shape)}, {payload.layout})"
        entry: Dict[str, Any] = {"name": name, "kind": kind}
        if kind == "tensor":
            t: Tensor = payload
            entry["key"] = self.writer.add(self._key(call, side, name), t, dedupe=True)
            entry["dtype"] = dtype_name(t.dtype)
            entry["shape"] = list(t.shape)
            if side == "out":
                entry["token_aligned"] = t.dim() >= 2 and tuple(t.shape[:2]) == (self.batch, self.seq)
        elif kind == "value":
            entry["value"] = payload
        elif kind in ("other", "cache"):
            entry["repr"] = payload
        return entry

    def _inputs(self, call: Mapping[str, Any], sig: Optional[inspect.Signature], args: Tuple[Any, ...],
                kwargs: Mapping[str, Any]) -> List[Dict[str, Any]]:
        entries = []
        for name, value, default in _bind(sig, args, kwargs):
            for leaf, kind, payload in flatten(name, value):
                entry = self._entry(call, "in", leaf, kind, payload)
                if default:
                    entry["default"] = True
                entries.append(entry)
        return entries

    def _outputs(self, call: Mapping[str, Any], out: Any) -> List[Dict[str, Any]]:
        leaves = list(flatten("", out))
        return [self._entry(call, "out", leaf or "0", kind, payload) for leaf, kind, payload in leaves]


def _path_under(parent: nn.Module, module: nn.Module) -> Optional[str]:
    """The name `module` has under `parent` (a module registered under two paths, like an embedding
    shared by an encoder and a decoder, is traced under its first path only)."""
    for name, sub in parent.named_modules(remove_duplicate=False):
        if sub is module and name:
            return name
    return None


def mark_bodies(flows: Mapping[str, Dict[str, Any]]) -> None:
    """Gives every child call record of the traces a `body`: a digest of the child's generalized
    trace and, recursively, of its children's, with paths relative to the child. Two calls with one
    body run the same program, so the tracer may roll them into one loop; calls whose bodies differ
    (sliding and global attention layers, a downsampling stage) must not be."""
    import hashlib

    done: Dict[str, str] = {}

    def body(path: str) -> str:
        if path not in done:
            done[path] = "?"  # (a module that calls itself: not expected, never equal)
            ops = []
            for rec in flows[path]["ops"]:
                rec = dict(rec)
                child = rec.pop("call", None)
                if child is not None:
                    rel = rec.pop("as", None) or (child[len(path) + 1:] if path else child)
                    rec.pop("body", None)
                    rec["call"] = [rel, body(child) if child in flows else None]
                ops.append(rec)
            text = json.dumps([ops, flows[path]["returns"]], sort_keys=True, default=str)
            done[path] = hashlib.sha1(text.encode()).hexdigest()[:16]
        return done[path]

    for path, flow in flows.items():
        for rec in flow["ops"]:
            if "call" in rec and rec["call"] in flows:
                rec["body"] = body(rec["call"])


def _signature(module: nn.Module) -> Optional[inspect.Signature]:
    forward = module.forward
    if getattr(type(module).forward, "__name__", "") == "_forward_unimplemented":
        return None
    try:
        return inspect.signature(forward)
    except (TypeError, ValueError):
        return None


def _bind(sig: Optional[inspect.Signature], args: Tuple[Any, ...],
          kwargs: Mapping[str, Any]) -> Iterator[Tuple[str, Any, bool]]:
    """(parameter name, value, came from the default) for one call, in parameter order."""
    try:
        if sig is None:
            raise TypeError("no signature")
        bound = sig.bind(*args, **kwargs)
    except TypeError:
        for i, a in enumerate(args):
            yield f"arg{i}", a, False
        for k, v in kwargs.items():
            yield k, v, False
        return
    passed = set(bound.arguments)
    bound.apply_defaults()
    for name, value in bound.arguments.items():
        kind = sig.parameters[name].kind
        if kind == inspect.Parameter.VAR_KEYWORD:
            for k, v in value.items():
                yield k, v, False
        elif kind == inspect.Parameter.VAR_POSITIONAL:
            for i, v in enumerate(value):
                yield f"{name}_{i}", v, False
        else:
            yield name, value, name not in passed


class OpTrace(TorchFunctionMode):
    """Records torch functions and Tensor methods into the innermost module's first-call trace."""

    def __init__(self, capture: Capture) -> None:
        super().__init__()
        self.capture = capture
        self.depth = 0
        self._saved: List[Tuple[str, Any]] = []

    # torch 1.13 indexes with one None, int, slice or Ellipsis (x[None], x[1:]) without asking the
    # mode; while tracing, Tensor's item methods go through it first.
    _ITEM_METHODS = ("__getitem__", "__setitem__")

    def __enter__(self) -> "OpTrace":
        for name in self._ITEM_METHODS:
            self._saved.append((name, torch.Tensor.__dict__.get(name)))
            setattr(torch.Tensor, name, self._through_mode(getattr(torch.Tensor, name)))
        try:
            return super().__enter__()
        except BaseException:
            self._restore()
            raise

    def __exit__(self, *exc: Any) -> Any:
        try:
            return super().__exit__(*exc)
        finally:
            self._restore()

    def _restore(self) -> None:
        for name, previous in self._saved:
            if previous is None:
                delattr(torch.Tensor, name)
            else:
                setattr(torch.Tensor, name, previous)
        self._saved.clear()

    def _through_mode(self, method: Any) -> Callable[..., Any]:
        def item(tensor: Tensor, *args: Any) -> Any:
            return self.__torch_function__(method, (type(tensor),), (tensor, *args), {})
        item.__name__ = method.__name__
        return item

    def __torch_function__(self, func: Any, types: Any, args: Sequence[Any] = (), kwargs: Optional[Dict[str, Any]] = None) -> Any:
        kwargs = kwargs or {}
        cap = self.capture
        if self.depth or cap.busy or not cap.stack or cap.stack[-1].ops is None:
            return func(*args, **kwargs)
        self.depth += 1
        try:
            out = func(*args, **kwargs)
        finally:
            self.depth -= 1
        name = op_name(func)
        if name is None and isinstance(out, Tensor):  # weight.T & co.: a property that makes a view
            name, args, kwargs = _property_view(func, args, out)
        if name is not None:
            record: Dict[str, Any] = {"op": name, "in": _shapes((args, kwargs), []), "out": _shapes(out, [])}
            text = _args_text(args, kwargs)
            if text is not None:
                record["args"] = text
            flow = cap.stack[-1].flow
            if flow is not None:
                self.depth += 1  # encoding a constant reads it: not an op of the model's
                try:
                    record.update(record_op(flow, name, args, kwargs, out))
                finally:
                    self.depth -= 1
            cap.stack[-1].ops.append(record)  # type: ignore[union-attr]
        return out


def _property_view(func: Any, args: Sequence[Any], out: Tensor) -> Tuple[Optional[str], Sequence[Any], Dict[str, Any]]:
    """A tensor property that returns a view (x.T, x.mT, x.H, x.mH, x.data, x.real) as the method
    call that makes the same view, so the trace reads the view from its base (a weight's `.T` is a
    read of the weight, not a constant); (None, ...) for any other attribute."""
    prop = getattr(getattr(func, "__self__", None), "__name__", None)
    if getattr(func, "__name__", None) != "__get__" or not args or not isinstance(args[0], Tensor):
        return None, args, {}
    x = args[0]
    if prop == "T":
        return ("torch.Tensor.t", (x,), {}) if x.dim() == 2 else (
            "torch.Tensor.permute", (x, *reversed(range(x.dim()))), {})
    if prop in ("mT", "mH") and not x.is_complex():
        return "torch.Tensor.transpose", (x, -2, -1), {}
    if prop == "H" and not x.is_complex():
        return "torch.Tensor.t", (x,), {}
    if prop in ("data", "real") and not x.is_complex():
        return "torch.Tensor.detach", (x,), {}
    return None, args, {}


class Coverage:
    """Counts line events of code whose file lies under one of `folders` (sys.settrace)."""

    def __init__(self, folders: Sequence[str]) -> None:
        self.folders = tuple(os.path.join(os.path.realpath(f), "") for f in folders)
        self.counts: Dict[Tuple[str, int], int] = {}
        self._inside: Dict[str, bool] = {}
        self._previous: Any = None

    def _global(self, frame: Any, event: str, arg: Any) -> Any:
        filename = frame.f_code.co_filename
        inside = self._inside.get(filename)
        if inside is None:
            # ("<frozen abc>", "<string>": no file; a relative realpath would put it in the cwd's folder)
            inside = self._inside[filename] = (os.path.isabs(filename) and os.path.isfile(filename)
                                               and os.path.realpath(filename).startswith(self.folders))
        return self._local if inside else None

    def _local(self, frame: Any, event: str, arg: Any) -> Any:
        if event == "line":
            key = (frame.f_code.co_filename, frame.f_lineno)
            self.counts[key] = self.counts.get(key, 0) + 1
        return self._local

    def __enter__(self) -> "Coverage":
        self._previous = sys.gettrace()
        sys.settrace(self._global)
        return self

    def __exit__(self, *exc: Any) -> None:
        sys.settrace(self._previous)

    def by_file(self) -> Dict[str, Dict[int, int]]:
        out: Dict[str, Dict[int, int]] = {}
        for (filename, line), n in self.counts.items():
            lines = out.setdefault(os.path.realpath(filename), {})
            lines[line] = lines.get(line, 0) + n
        return out


# --------------------------------------------------------------------------- static information


def display_path(path: str) -> str:
    """`path` relative to the working directory when inside it, else to the sys.path entry
    holding it (site-packages/transformers/... -> transformers/...), else absolute."""
    real = os.path.realpath(path)
    cwd = os.path.join(os.path.realpath(os.getcwd()), "")
    if real.startswith(cwd):
        return os.path.relpath(real, cwd)
    best = ""
    for entry in sys.path:
        if not entry:
            continue
        root = os.path.join(os.path.realpath(entry), "")
        if real.startswith(root) and len(root) > len(best):
            best = root
    return os.path.relpath(real, best) if best else real


def _class_file(cls: type) -> Optional[str]:
    try:
        return os.path.realpath(inspect.getfile(cls))
    except (TypeError, OSError):
        return None


def _class_lines(cls: type) -> Tuple[Optional[int], Optional[int]]:
    """(line of the `class` statement, last line) of `cls`, 1-based."""
    try:
        lines, start = inspect.getsourcelines(cls)
    except (TypeError, OSError):
        return None, None
    first = start
    for i, text in enumerate(lines):
        if re.match(r"\s*class\s", text):
            first = start + i
            break
    return first, start + len(lines) - 1


def modules_and_classes(model: nn.Module, folders: Sequence[str], signatures: Mapping[str, Optional[inspect.Signature]],
                        flows: Mapping[str, Dict[str, Any]]) -> Tuple[List[Dict[str, Any]], Dict[str, Dict[str, Any]], List[str]]:
    """The pre-order module tree, the class table, and the package files that define those classes."""
    roots = tuple(os.path.join(os.path.realpath(f), "") for f in folders)
    classes: Dict[str, Dict[str, Any]] = {}
    keys: Dict[type, str] = {}
    files: List[str] = []

    def in_package(cls: type) -> Optional[str]:
        file = _class_file(cls)
        return file if file is not None and file.startswith(roots) else None

    def key_of(cls: type) -> str:
        if cls in keys:
            return keys[cls]
        key = cls.__name__
        if key in classes:
            key = f"{cls.__module__}.{cls.__qualname__}"
        keys[cls] = key
        file = in_package(cls)
        entry: Dict[str, Any] = {"file": None, "start": None, "end": None, "bases": [], "module": cls.__module__}
        classes[key] = entry
        if file is not None:
            if file not in files:
                files.append(file)
            entry["file"] = display_path(file)
            entry["start"], entry["end"] = _class_lines(cls)
            entry["bases"] = [key_of(base) for base in cls.__mro__[1:] if in_package(base) is not None]
        return key

    paths = [path for path, _ in model.named_modules()]
    tree = []
    for path, module in model.named_modules():
        sig = signatures.get(path)
        params = []
        if sig is not None:
            for p in sig.parameters.values():
                prefix = {inspect.Parameter.VAR_POSITIONAL: "*", inspect.Parameter.VAR_KEYWORD: "**"}.get(p.kind, "")
                params.append(prefix + p.name)
        tree.append({
            "path": path,
            "class": key_of(type(module)),
            "parent": None if path == "" else path.rpartition(".")[0],
            "children": [p for p in paths if p != "" and p != path and p.rpartition(".")[0] == path],
            "forward_params": params,
            "ops": flows[path]["ops"] if path in flows else None,
        })
        if path in flows:
            tree[-1].update({k: flows[path][k] for k in ("inputs", "returns", "return_names", "dataflow")})
    return tree, classes, files


def collect_weights(model: nn.Module) -> Tuple[Dict[str, Tensor], Dict[str, str], List[str], List[str]]:
    """(stored tensors by name, aliases tied name -> stored name, buffer names, non-persistent buffer names)."""
    stored: Dict[str, Tensor] = {}
    aliases: Dict[str, str] = {}
    buffers: List[str] = []
    non_persistent: List[str] = []
    seen: Dict[Tuple[Any, ...], str] = {}
    for mpath, module in model.named_modules(remove_duplicate=False):
        tables = (("param", module._parameters), ("buffer", module._buffers))
        for kind, table in tables:
            for name, t in table.items():
                if t is None:
                    continue
                full = f"{mpath}.{name}" if mpath else name
                if full in stored or full in aliases:
                    continue
                ident = (t.device, t.data_ptr(), tuple(t.shape), tuple(t.stride()), t.dtype)
                if t.numel() > 0 and ident in seen:
                    aliases[full] = seen[ident]
                else:
                    seen[ident] = full
                    stored[full] = t
                if kind == "buffer":
                    buffers.append(full)
                    if name in getattr(module, "_non_persistent_buffers_set", ()):
                        non_persistent.append(full)
    return stored, aliases, buffers, non_persistent


def _jsonable(value: Any) -> Tuple[bool, Any]:
    if value is None or isinstance(value, (bool, int, str)):
        return True, value
    if isinstance(value, float):
        return math.isfinite(value), value
    if isinstance(value, Mapping):
        out = {}
        for k, v in value.items():
            ok, jv = _jsonable(v)
            if ok and isinstance(k, (str, int)):
                out[str(k)] = jv
        return True, out
    if isinstance(value, (list, tuple)):
        items = [_jsonable(v) for v in value]
        return all(ok for ok, _ in items), [v for _, v in items]
    return False, None


def config_json(config: Any) -> Optional[Dict[str, Any]]:
    """The config as a JSON object (to_dict / dataclass / vars), without non-JSON values; None if no config."""
    if config is None:
        return None
    try:
        if hasattr(config, "to_dict"):
            raw = config.to_dict()
        elif dataclasses.is_dataclass(config) and not isinstance(config, type):
            raw = dataclasses.asdict(config)
        elif isinstance(config, Mapping):
            raw = dict(config)
        else:
            raw = vars(config)
    except Exception:
        return None
    ok, value = _jsonable(raw)
    return value if ok and isinstance(value, dict) else None


# --------------------------------------------------------------------------- output directory


class _OutDir:
    """Write into a temporary directory beside OUT and rename it into place on success."""

    def __init__(self, out_dir: str, force: bool) -> None:
        self.out = os.path.abspath(out_dir)
        self.force = force
        self.created: List[str] = []
        self.tmp = ""
        self.check(out_dir, force)
        parent = os.path.dirname(self.out)
        missing = []
        while parent and not os.path.exists(parent):
            missing.append(parent)
            parent = os.path.dirname(parent)
        try:
            for folder in reversed(missing):
                os.mkdir(folder)
                self.created.append(folder)
            self.tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(self.out)}.tmp-", dir=os.path.dirname(self.out))
        except OSError as e:
            self._remove_created()
            raise ExportError(f"cannot write to {os.path.dirname(self.out) or '.'}: {e.strerror or e}") from None

    @staticmethod
    def check(out_dir: str, force: bool) -> None:
        """Refuse an OUT that is a file, or a non-empty directory without `force`."""
        if os.path.exists(out_dir):
            if not os.path.isdir(out_dir):
                raise ExportError(f"output {out_dir} exists and is not a directory")
            if os.listdir(out_dir) and not force:
                raise ExportError(f"output directory {out_dir} exists and is not empty (use --force to replace it)")

    def path(self, name: str) -> str:
        return os.path.join(self.tmp, name)

    def commit(self) -> None:
        old = None
        try:
            if os.path.exists(self.out):
                if os.listdir(self.out):
                    old = tempfile.mkdtemp(prefix=f".{os.path.basename(self.out)}.old-", dir=os.path.dirname(self.out))
                    os.rename(self.out, os.path.join(old, "pack"))
                else:
                    os.rmdir(self.out)
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(self.tmp, 0o777 & ~umask)  # mkdtemp made it private
            os.rename(self.tmp, self.out)
        except OSError as e:
            raise ExportError(f"cannot move the pack into {self.out}: {e.strerror or e}") from None
        finally:
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)

    def abort(self) -> None:
        if self.tmp:
            shutil.rmtree(self.tmp, ignore_errors=True)
        self._remove_created()

    def _remove_created(self) -> None:
        for folder in reversed(self.created):
            with contextlib.suppress(OSError):
                os.rmdir(folder)
        self.created.clear()


# --------------------------------------------------------------------------- export


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


def export(spec_or_model: Any, out_dir: str, *, overrides: Optional[Mapping[str, Any]] = None, seed: int = 0,
           probes: int = 3, hidden: int = 3, dtype: str = "float32", name: Optional[str] = None,
           quiet: bool = False, force: bool = False, probe_shapes: Optional[str] = None, device: str = "cpu",
           inputs_fn: Optional[InputsFn] = None, source: Optional[Dict[str, Any]] = None,
           package_dirs: Optional[Sequence[str]] = None, init: bool = False, low_precision_probe: bool = True,
           tolerance: Optional[Mapping[str, Mapping[str, float]]] = None) -> Dict[str, Any]:
    """Export a task pack to `out_dir`; returns the manifest (task.json) as a dict.

    `spec_or_model` is "FILE.py:NAME" (built here with `overrides` after
    torch.manual_seed(seed)) or an nn.Module. Its package (coverage, class
    sources) is the folder of the file defining the model's class, unless
    `package_dirs` says otherwise. Probe inputs come from `inputs_fn`, else the
    model file's `fmx_inputs`, else `default_inputs`. `init` redraws the weights
    with `sensitive_init`; a float32 export reruns two probes on a bfloat16 copy
    unless `low_precision_probe` is false; `tolerance` overrides TOLERANCE per dtype.
    """
    overrides = dict(overrides or {})
    if dtype not in DTYPES:
        raise ExportError(f"bad dtype {dtype!r}: expected one of {', '.join(DTYPES)}")
    shapes = parse_probe_shapes(probe_shapes) if probe_shapes else None
    plan_probes(probes, hidden, shapes, None)  # validate before any work
    tolerances = {**TOLERANCE, **{k: dict(v) for k, v in (tolerance or {}).items()}}
    out = _OutDir(out_dir, force)
    t_start = time.perf_counter()
    try:
        manifest = _export(spec_or_model, out, overrides, seed, probes, hidden, dtype, name, quiet, shapes,
                           device, inputs_fn, source, package_dirs, init=init,
                           low_precision=low_precision_probe and dtype == "float32", tolerance=tolerances)
        out.commit()
    except BaseException:
        out.abort()
        raise
    if not quiet:
        n_visible = sum(1 for p in manifest["probes"] if p["visible"])
        sizes = [os.path.getsize(os.path.join(out.out, f))
                 for f in ("weights.safetensors", HIDDEN_WEIGHTS, "probes.safetensors")]
        print(f"wrote {out_dir}: {n_visible}+{len(manifest['probes']) - n_visible} probes, {len(manifest['calls'])} calls, "
              f"{_mb(sizes[0])} weights, {_mb(sizes[1])} hidden weights, {_mb(sizes[2])} captures "
              f"({time.perf_counter() - t_start:.1f}s)", file=sys.stderr)
        for line in _constants_summary(manifest):
            print(line, file=sys.stderr)
    return manifest


def _export(spec_or_model: Any, out: _OutDir, overrides: Dict[str, Any], seed: int, probes: int, hidden: int,
            dtype: str, name: Optional[str], quiet: bool, shapes: Optional[List[Tuple[int, int, str]]], device: str,
            inputs_fn: Optional[InputsFn], source: Optional[Dict[str, Any]],
            package_dirs: Optional[Sequence[str]], *, init: bool, low_precision: bool,
            tolerance: Dict[str, Dict[str, float]]) -> Dict[str, Any]:
    t0 = time.perf_counter()

    def phase(what: str) -> None:  # a progress line per phase, beside the per-probe ones
        if not quiet:
            print(f"[{time.perf_counter() - t0:.1f}s] {what}", file=sys.stderr, flush=True)

    torch.manual_seed(seed)
    if isinstance(spec_or_model, str):
        model, pymodule, file = build_from_spec(spec_or_model, overrides)
        source = source or {"kind": "file", "spec": spec_or_model, "overrides": overrides}
        folders = list(package_dirs or [os.path.dirname(file)])
    elif isinstance(spec_or_model, nn.Module):
        model = spec_or_model
        pymodule = sys.modules.get(type(model).__module__)
        cls_file = _class_file(type(model))
        source = source or {"kind": "module", "class": f"{type(model).__module__}.{type(model).__qualname__}"}
        folders = list(package_dirs or ([os.path.dirname(cls_file)] if cls_file else []))
    else:
        raise ExportError(f"cannot export a {type(spec_or_model).__name__}: expected FILE.py:NAME or an nn.Module")
    phase(f"built {type(model).__name__} ({sum(p.numel() for p in model.parameters()):,} parameters)")
    if inputs_fn is None:
        inputs_fn = getattr(pymodule, "fmx_inputs", None) or default_inputs
    roles = sensitive_init(model, seed) if init else None
    model = model.to(device=device, dtype=DTYPES[dtype]).eval()
    config = getattr(model, "config", None)
    plan = plan_probes(probes, hidden, shapes, _max_len(config))
    window, window_note = window_probe(config, _max_len(config))
    window_name = None
    if window is not None and hidden > 0:
        window_name = f"p{len(plan)}"
        plan.append(Probe(window_name, False, *window))
    elif window is not None:
        window_note += " (not added: --hidden 0)"
    copies = low_precision_copies(plan, LOW_PRECISION) if low_precision else []
    public, secret, hidden_init = _draw_hidden(model, spec_or_model, overrides, init, seed, plan, inputs_fn, device,
                                               dtype, tolerance)
    phase(f"drew the hidden weight set; running {len(plan) + len(copies)} probes")
    weights_of = {True: public, False: secret}  # by probe visibility
    constants = ConstantCheck(model, tolerance)

    writer = Writer(out.path("probes.safetensors"), metadata={"format": FORMAT, "fmx": __version__})
    coverage = Coverage(folders)
    run = functools.partial(_run_probe, writer=writer, coverage=coverage, inputs_fn=inputs_fn, seed=seed,
                            device=device, quiet=quiet, total=len(plan) + len(copies))
    probe_entries = []
    traced = _traced_probes(plan)
    traces_of: Dict[int, Dict[str, Dict[str, Any]]] = {}  # per traced probe: module path -> its trace
    try:
        with torch.no_grad(), Capture(model, writer, constants) as capture:
            loaded = True  # the model holds the public weights
            for i, probe in enumerate(plan):
                if probe.visible != loaded:  # hidden probes run under the hidden set
                    hidden_set.load(model, weights_of[probe.visible])
                    loaded = probe.visible
                probe_entries.append(run(model, capture, i, probe, trace=i in traced))
                if i in traced:
                    traces_of[i] = capture.trace()
            signatures = dict(capture.signatures)
        for visible in (True, False):  # copies: visible ones first, as low_precision_copies orders them
            group = [(i, probe) for i, probe in enumerate(copies, start=len(plan)) if probe.visible == visible]
            if not group:
                continue
            hidden_set.load(model, weights_of[visible])
            low = _low_precision_copy(model, DTYPES[LOW_PRECISION])
            with torch.no_grad(), Capture(low, writer, constants) as low_capture:
                low_capture.calls = capture.calls  # one call list, in the order calls started
                for i, probe in group:
                    probe_entries.append(run(low, low_capture, i, probe, trace=i == len(plan)))
                    if i == len(plan):
                        traces_of[i] = low_capture.trace()
                        traced.append(i)
            _check_cast(model, low, "after its probes")  # the forward must not have changed them
            del low
        generations = _capture_generations(model, capture.calls, writer, probe_entries, hidden, inputs_fn, seed,
                                           device, quiet, lambda visible: hidden_set.load(model, weights_of[visible]),
                                           LOW_PRECISION if copies else None)
        writer.close()
    except BaseException:
        writer.abort()
        raise
    finally:
        hidden_set.load(model, public)

    phase("probes done; writing the manifest (module tree, sources, coverage, op traces) and weights")
    traces = [traces_of[i] for i in traced]  # the first is the one the pack shows
    flows = {path: generalize([t[path] for t in traces if path in t]) for path in traces[0]}
    mark_bodies(flows)
    tree, classes, class_files = modules_and_classes(model, folders, signatures, flows)
    covered = coverage.by_file()
    files = {}
    for file in class_files + sorted(f for f in covered if f not in class_files):
        with open(file, encoding="utf-8") as f:
            text = f.read()
        lines = covered.get(file, {})
        files[display_path(file)] = {"source": text, "coverage": {str(n): lines[n] for n in sorted(lines)}}

    stored, aliases, buffers, non_persistent = collect_weights(model)
    save_file(stored, out.path("weights.safetensors"), metadata={"format": FORMAT, "fmx": __version__})
    save_file({k: secret.get(k, t) for k, t in stored.items()}, out.path(HIDDEN_WEIGHTS),  # buffers: as public
              metadata={"format": FORMAT, "fmx": __version__})
    checks, unseen = constants.report()

    manifest = {
        "format": FORMAT,
        "version": VERSION,
        "name": name or os.path.basename(out.out),
        "created_by": {"fmx": __version__, "torch": torch.__version__, "device": str(torch.device(device))},
        "source": source,
        "root_class": tree[0]["class"],
        "dtype": dtype,
        "config": config_json(config),
        "seed": seed,
        "init": {"kind": "sensitive", "residual_std": RESIDUAL_STD, "roles": roles} if roles is not None
                else {"kind": "model"},
        "hidden_weights": HIDDEN_WEIGHTS,
        "hidden_init": hidden_init,
        "constants": checks,
        "unseen_constants": unseen,
        "tolerance": tolerance,
        "tolerance_cross_build": TOLERANCE_CROSS_BUILD,
        "probe_power": _probe_power(plan, copies, window_name, window_note),
        "weights": {"aliases": aliases, "buffers": buffers, "non_persistent": non_persistent},
        "modules": tree,
        "files": files,
        "classes": classes,
        "probes": probe_entries,
        "traced_probes": [probe_entries[i]["name"] for i in traced],
        "generation": generations,
        "calls": capture.calls,
    }
    with open(out.path("task.json"), "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=1, allow_nan=False)
        f.write("\n")
    return manifest


def _draw_hidden(model: nn.Module, spec_or_model: Any, overrides: Mapping[str, Any], init: bool, seed: int,
                 plan: Sequence[Probe], inputs_fn: InputsFn, device: str, dtype: str,
                 tolerance: Mapping[str, Mapping[str, float]]
                 ) -> Tuple[Dict[str, Tensor], Dict[str, Tensor], Dict[str, Any]]:
    """(the public parameters, the hidden set, task.json's hidden_init), drawn by the pack's init
    policy (hidden.py) with the scales that make every norm's eps matter tuned on the first hidden
    probe's inputs."""
    redraw: Optional[Callable[[int], Any]]
    if init:
        kind, redraw = "sensitive", functools.partial(sensitive_init, model)
    elif isinstance(spec_or_model, str):
        kind, redraw = "model", functools.partial(_rebuild_into, model, spec_or_model, overrides)
    else:
        kind, redraw = "perturbed", None
    i = next((k for k, p in enumerate(plan) if not p.visible), 0)
    probe = plan[i]
    inputs = inputs_fn(model, probe.batch, probe.seq, probe.padding,
                       torch.Generator().manual_seed(seed * 1_000_003 + i + 1))  # probe i's own inputs
    if not isinstance(inputs, Mapping):
        raise ExportError(f"probe inputs must be a dict of forward arguments, got {type(inputs).__name__}")
    inputs = {k: v.to(device) if isinstance(v, Tensor) else v for k, v in inputs.items()}
    target = max(hidden_set.EPS_TARGET, hidden_set.TARGET_OVER_RTOL * tolerance.get(dtype, {}).get("rtol", 0.0))
    return hidden_set.draw(model, kind, seed, redraw, residual_stream(model), lambda: model(**inputs), target)


def _rebuild_into(model: nn.Module, spec: str, overrides: Mapping[str, Any], seed: int) -> None:
    """The model file's own init drawn again: SPEC built after torch.manual_seed(seed), its
    parameters copied into `model` (the global generator is left as it was)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        other, _, _ = build_from_spec(spec, overrides)
    theirs = hidden_set.parameters(other)
    with torch.no_grad():
        for name, p in hidden_set.parameters(model).items():
            q = theirs.get(name)
            if q is not None and q.shape == p.shape and q.is_floating_point():
                p.copy_(q.detach().to(p.device, p.dtype))


def _constants_summary(manifest: Mapping[str, Any]) -> List[str]:
    """The export summary's lines about constants: the unseen ones, else the least seen."""
    checks, unseen = manifest["constants"], manifest["unseen_constants"]
    if unseen:
        return [f"unseen constants ({len(unseen)} of {len(checks)}): no probe's output moves past the tolerance "
                "when one changes by x1.5 or /1.5"] + [f"  {u['module']} {u['constant']}: {u['why']}" for u in unseen]
    moves = [(min(c[k]["exceeds"] for k in ("times_1.5", "over_1.5")), c) for c in checks]
    if not moves:
        return ["constants: no module has an eps-like constant"]
    least, c = min(moves, key=lambda m: m[0])
    return [f"constants: each of {len(checks)} eps-like constants x1.5 and /1.5 moves some probe past the tolerance "
            f"(least: {c['module'] or '(root)'} {c['constant']}, {least:.3g}x the tolerance)"]


def _traced_probes(plan: Sequence[Probe]) -> List[int]:
    """The probes whose op traces are recorded, the one the trace shows first: a padded visible
    probe (a model may skip its mask when nothing is padded, and that path is not the general
    one), then a visible probe whose batch and sequence sizes both differ from it (else one whose
    shape differs), padded when one is: two shapes tell a size that follows the input from a
    constant. The first bfloat16 copy (of a left-padded probe when there is one) is traced too,
    by the caller."""
    visible = [i for i, p in enumerate(plan) if p.visible] or [0]
    padded = [i for i in visible if plan[i].padding != "none"]
    base = (padded or visible)[0]
    rest = sorted((i for i in visible if i != base), key=lambda i: plan[i].padding == "none")
    both = [i for i in rest if plan[i].batch != plan[base].batch and plan[i].seq != plan[base].seq]
    some = [i for i in rest if (plan[i].batch, plan[i].seq) != (plan[base].batch, plan[base].seq)]
    return [base] + (both or some)[:1]


def _run_probe(model: nn.Module, capture: Capture, i: int, probe: Probe, *, writer: Writer, coverage: Coverage,
               inputs_fn: InputsFn, seed: int, device: str, quiet: bool, total: int, trace: bool) -> Dict[str, Any]:
    """Runs probe `i` and returns its manifest entry. A reduced-precision copy (`probe.dtype`) gets the
    inputs of probe `probe.inputs_of`, floating ones cast to its dtype."""
    t0 = time.perf_counter()
    source = i if probe.inputs_of is None else probe.inputs_of
    generator = torch.Generator().manual_seed(seed * 1_000_003 + source + 1)
    inputs = inputs_fn(model, probe.batch, probe.seq, probe.padding, generator)
    if not isinstance(inputs, Mapping):
        raise ExportError(f"probe inputs must be a dict of forward arguments, got {type(inputs).__name__}")
    mask = _mask_of(inputs, probe.batch, probe.seq)
    mask_key = writer.add(f"{probe.name}/mask", mask, dedupe=True)
    inputs = {k: v.to(device) if isinstance(v, Tensor) else v for k, v in inputs.items()}
    if probe.dtype is not None:  # a reduced-precision copy: floating inputs in its dtype too
        inputs = {k: v.to(DTYPES[probe.dtype]) if isinstance(v, Tensor) and v.is_floating_point() else v
                  for k, v in inputs.items()}
    # what the probe is, for people (fmx info, verify): the tensors it feeds the model
    described = [{"name": k, "shape": list(v.shape), "dtype": str(v.dtype).replace("torch.", "")}
                 for k, v in inputs.items() if isinstance(v, Tensor)]
    capture.start_probe(i, probe.batch, probe.seq, trace_ops=trace, mask=mask)
    with coverage, (OpTrace(capture) if trace else contextlib.nullcontext()):
        result = model(**inputs)
    del result, inputs
    entry = {"name": probe.name, "visible": probe.visible, "batch": probe.batch, "seq": probe.seq,
             "padding": probe.padding, "mask": mask_key, "inputs": described}
    note = ""
    if probe.dtype is not None:
        entry.update(dtype=probe.dtype, inputs_of=f"p{probe.inputs_of}")
        note = f", {probe.dtype} copy of p{probe.inputs_of}"
    if not quiet:
        kind = "visible" if probe.visible else "hidden"
        print(f"[{i + 1}/{total}] probe {probe.name} ({kind}, {probe.batch}x{probe.seq}, "
              f"{probe.padding}{note}) {time.perf_counter() - t0:.2f}s", file=sys.stderr)
    return entry


def _capture_generations(model: nn.Module, calls: List[Dict[str, Any]], writer: Writer,
                         probe_entries: List[Dict[str, Any]], hidden: int, inputs_fn: InputsFn, seed: int, device: str,
                         quiet: bool, load: Callable[[bool], None], low_precision: Optional[str]) -> Dict[str, Any]:
    """A causal LM's prefill and decode steps (generate.py), appended to the probes; task.json's
    "generation" (`{"none": why}` for a model that has none). A reduced-precision generation runs on
    a copy of the model in that dtype, as the reduced-precision probes do."""
    why = generate.why_not_causal_lm(model)
    if why is not None:
        return {"none": why}
    gens = generate.plan(hidden, low_precision)
    first, first_call = len(probe_entries), len(calls)
    try:
        for dtype in dict.fromkeys(g.dtype for g in gens):
            group = [g for g in gens if g.dtype == dtype]
            load(True)
            run = model if dtype is None else _low_precision_copy(model, DTYPES[dtype])
            with torch.no_grad(), Capture(run, writer, None) as gen_capture:
                gen_capture.calls = calls  # one call list, in the order calls started
                probe_entries += generate.capture_generations(
                    run, gen_capture, writer, group, len(probe_entries), inputs_fn=inputs_fn,
                    load=load if dtype is None else lambda visible: None, seed=seed, device=device, quiet=quiet)
    except ExportError:
        raise
    except Exception as e:  # noqa: BLE001 — not a cache fmx can read, or the model's own generation
        # code failing on this torch (gemma2's HybridCache on torch 1.x): no decode task, and why
        del probe_entries[first:], calls[first_call:]
        if not quiet:
            print(f"no generation captured: {e}", file=sys.stderr)
        return {"none": f"generation failed: {type(e).__name__}: {e}"}
    return generate.summary(probe_entries[first:], gens)


def _low_precision_copy(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """A deep copy of `model` in `dtype`, checked to hold exactly the pack's weights cast to it
    (round to nearest), which is what the verifier hands a candidate on such a probe."""
    try:
        low = copy.deepcopy(model).to(dtype)
    except Exception as e:
        raise ExportError(f"cannot make a {dtype} copy of the model for the reduced-precision probe ({e}); "
                          "export with --no-bf16-probe") from None
    _check_cast(model, low, "after .to()")
    return low


def _check_cast(model: nn.Module, low: nn.Module, when: str) -> None:
    """Every parameter and buffer of `low` equals `model`'s, floating ones cast to their dtype, bit for bit."""
    theirs, ours = _named_tensors(low), _named_tensors(model)
    for name, t in ours.items():
        other = theirs.get(name)
        want = t.detach().to(other.dtype) if other is not None and t.is_floating_point() else t.detach()
        same = (other is not None and other.dtype == want.dtype and other.shape == want.shape
                and torch.equal(_bits(other.detach()), _bits(want)))
        if not same:
            raise ExportError(
                f"the reduced-precision copy's {name!r} is not the pack's weight cast to its dtype ({when}): the "
                "verifier would hand a candidate other weights than the reference used (a buffer computed "
                "in the forward or in .to()?); export with --no-bf16-probe")
    extra = sorted(set(theirs) - set(ours))
    if extra:
        raise ExportError(f"the reduced-precision copy has tensors the model lacks ({', '.join(extra[:3])}); "
                          "export with --no-bf16-probe")


def _named_tensors(model: nn.Module) -> Dict[str, Tensor]:
    """Every parameter and buffer under every name (tied and shared ones too)."""
    out = {}
    for mpath, module in model.named_modules(remove_duplicate=False):
        for table in (module._parameters, module._buffers):
            for name, t in table.items():
                if t is not None:
                    out[f"{mpath}.{name}" if mpath else name] = t
    return out


def _bits(t: Tensor) -> Tensor:
    """`t` viewed as integers of its width (NaN-safe bitwise equality); bool and integer tensors as they are."""
    if not t.is_floating_point():
        return t
    width = {8: torch.int64, 4: torch.int32, 2: torch.int16}[t.element_size()]
    return t.contiguous().view(width)


def _probe_power(plan: Sequence[Probe], copies: Sequence[Probe], window_name: Optional[str],
                 window_note: str) -> Dict[str, Any]:
    """task.json's probe_power: what the probes include to separate a wrong program from a right one."""
    probes = list(plan) + list(copies)
    longest = max(p.seq for p in probes)
    notes = [f"shapes vary: batch {sorted({p.batch for p in probes})}, seq {sorted({p.seq for p in probes})}, "
             f"padding {sorted({p.padding for p in probes})} (mask bugs show on padded rows)"]
    notes.append(f"longest probe {longest} tokens" + ("" if longest >= LONG_PROBE else
                 f", under {LONG_PROBE}: capped by the config's max length or the requested shapes"))
    notes.append(window_note)
    if copies:
        notes.append(", ".join(f"{c.name} reruns p{c.inputs_of} in {c.dtype}" for c in copies)
                     + ": in float32 every cast is a no-op, so dtype mistakes show only there")
    else:
        notes.append("no reduced-precision probe (bfloat16 export, or --no-bf16-probe)")
    return {"longest": longest, "paddings": sorted({p.padding for p in probes}),
            "sliding_window": window_name,
            "low_precision": [c.name for c in copies], "notes": notes}


# --------------------------------------------------------------------------- mutation check

EQUIVALENT_KEYS = ("operator", "line_contains", "after_contains", "reason")


def load_equivalents(path: str) -> List[Dict[str, str]]:
    """An --equivalent file: a JSON list of {operator, line_contains, after_contains, reason}."""
    try:
        with open(path, encoding="utf-8") as f:
            items = json.load(f)
    except (OSError, ValueError) as e:
        raise ExportError(f"--equivalent {path}: {getattr(e, 'strerror', None) or e}") from None
    if not isinstance(items, list):
        raise ExportError(f"--equivalent {path}: expected a JSON list of objects")
    for i, item in enumerate(items):
        where = f"--equivalent {path}: entry {i}"
        if not isinstance(item, dict) or any(k not in EQUIVALENT_KEYS or not isinstance(v, str) for k, v in item.items()):
            raise ExportError(f"{where}: an object of strings with keys among {', '.join(EQUIVALENT_KEYS)}")
        if not item.get("reason"):
            raise ExportError(f"{where}: needs a reason")
        if not (item.get("line_contains") or item.get("after_contains")):
            raise ExportError(f"{where}: needs line_contains or after_contains")
    return items


def store_equivalents(out_dir: str, items: List[Dict[str, str]]) -> None:
    """Adds "equivalent_mutants" to a written pack's task.json (replaced atomically)."""
    path = os.path.join(out_dir, "task.json")
    with open(path, encoding="utf-8") as f:
        manifest = json.load(f)
    manifest["equivalent_mutants"] = items
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=1, allow_nan=False)
        f.write("\n")
    os.replace(path + ".tmp", path)


def mutation_check(pack: str, solution: str) -> int:
    """Runs `fmx mutate PACK SOLUTION` (the binary in $FMX_BIN, which `fmx export`
    sets); prints each survivor and the score line. Returns 0 when no mutant
    survives, 1 when some do."""
    fmx = os.environ.get("FMX_BIN") or shutil.which("fmx")
    if not fmx:
        raise ExportError("--solution runs `fmx mutate`: run through `fmx export` or set FMX_BIN")
    res = subprocess.run([fmx, "mutate", pack, solution, "--json"], capture_output=True, text=True,
                         stdin=subprocess.DEVNULL)
    if res.returncode not in (0, 1):
        raise ExportError(f"fmx mutate {pack} {solution}: {res.stderr.strip() or f'exit status {res.returncode}'}")
    report = json.loads(res.stdout)
    for m in report["mutants"]:
        if m["verdict"] == "survived":
            print(f"survived {m['id']} {m['operator']} line {m['line']}: {m['before']}  ->  {m['after']}")
    n = report["summary"]
    counted = n["killed"] + n["survived"]
    score = f"{100 * n['killed'] / counted:.1f}%" if counted else "n/a"
    print(f"{pack}: mutation score {score}: {n['killed']} of {counted} killed, {n['survived']} survived "
          f"({n['equivalent']} equivalent, {n['invalid']} invalid not counted; {solution})")
    return 1 if n["survived"] else 0


# --------------------------------------------------------------------------- CLI


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fmx export",
        description="Run a PyTorch model on probe inputs and write an fmx task pack "
                    "(task.json, weights.safetensors, probes.safetensors).",
        epilog="SPEC is FILE.py:NAME: a factory called as NAME(**overrides), or an nn.Module class "
               "with config_class, built as NAME(config_class(**overrides)).",
    )
    p.add_argument("spec", nargs="?", metavar="SPEC", help="model file and name, FILE.py:NAME")
    p.add_argument("-o", "--out", required=True, metavar="OUT_DIR", help="pack directory to create")
    p.add_argument("--hf", metavar="DIR", help="local transformers snapshot (config.json + safetensors)")
    p.add_argument("--hf-config", metavar="CONFIG_JSON", help="transformers config file; weights are random")
    p.add_argument("--random-init", action="store_true",
                   help="with --hf: random weights from the snapshot's config (drawn as --sensitive-init does)")
    p.add_argument("--sensitive-init", action="store_true",
                   help="redraw the weights by parameter role so that every op moves the output "
                        "(docs/pack-format.md, Random weights); for a model file without an init of its own")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="config override (VALUE is JSON, else a string); repeatable")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--probes", type=int, default=3, help="visible probes (default 3)")
    p.add_argument("--hidden", type=int, default=3, help="hidden probes (default 3)")
    p.add_argument("--probe-shapes", metavar="BxT:PAD,...",
                   help="probe shapes, e.g. 1x8:none,2x13:left; the first --probes are visible, the next --hidden hidden")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    p.add_argument("--no-bf16-probe", action="store_true",
                   help="no bfloat16 rerun of a visible and a hidden probe in a float32 pack")
    p.add_argument("--tolerance", metavar="DTYPE=ATOL:RTOL,...",
                   help="per-dtype tolerances recorded in the pack, e.g. float32=1e-5:1e-5,bfloat16=0.0156:0.0156 "
                        "(defaults: docs/pack-format.md)")
    p.add_argument("--device", default="cpu", help="device to run the reference on (default cpu)")
    p.add_argument("--name", help="pack name (default: the OUT_DIR folder name)")
    p.add_argument("--force", action="store_true", help="replace an existing pack")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    p.add_argument("--equivalent", metavar="FILE",
                   help="equivalent mutants of the pack's solutions, a JSON list stored in task.json "
                        "(docs/pack-format.md, \"Equivalent mutants\")")
    p.add_argument("--solution", metavar="FILE",
                   help="then run `fmx mutate OUT FILE` and print the mutation score (exit 1 if a mutant survives)")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = _parser().parse_args(argv)
    try:
        chosen = [x for x in (args.spec, args.hf, args.hf_config) if x is not None]
        if len(chosen) != 1:
            raise ExportError("give exactly one of SPEC (FILE.py:NAME), --hf DIR, --hf-config CONFIG_JSON")
        if args.random_init and args.hf is None and args.hf_config is None:
            raise ExportError("--random-init goes with --hf or --hf-config")
        if args.sensitive_init and args.hf is not None and not args.random_init:
            raise ExportError("--sensitive-init redraws the weights: with --hf add --random-init")
        overrides = parse_overrides(args.set)
        equivalents = load_equivalents(args.equivalent) if args.equivalent else None
        common = dict(seed=args.seed, probes=args.probes, hidden=args.hidden, dtype=args.dtype, name=args.name,
                      quiet=args.quiet, force=args.force, probe_shapes=args.probe_shapes, device=args.device,
                      low_precision_probe=not args.no_bf16_probe,
                      tolerance=parse_tolerance(args.tolerance) if args.tolerance else None)
        if args.spec is not None:
            export(args.spec, args.out, overrides=overrides, init=args.sensitive_init, **common)
        else:
            _OutDir.check(args.out, args.force)
            torch.manual_seed(args.seed)
            random_init = args.random_init or args.hf_config is not None
            model, inputs_fn = build_from_hf(args.hf, args.hf_config, random_init, overrides)
            source = {"kind": "hf", "path": args.hf or args.hf_config, "random_init": random_init, "overrides": overrides}
            export(model, args.out, source=source, init=random_init, inputs_fn=inputs_fn, **common)
        if equivalents is not None:
            store_equivalents(args.out, equivalents)
        if args.solution:
            return mutation_check(args.out, args.solution)
    except ExportError as e:
        print(f"fmx.export: error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # noqa: BLE001 - the model's own code failed: one line, exit 2
        if os.environ.get("FMX_DEBUG"):
            raise
        where = _model_frame(e)
        print(f"fmx.export: error: {type(e).__name__}: {e}".splitlines()[0][:400]
              + (f" (at {where}; FMX_DEBUG=1 shows the traceback)" if where else " (FMX_DEBUG=1 shows the traceback)"),
              file=sys.stderr)
        return 2
    return 0


def _model_frame(e: BaseException) -> Optional[str]:
    """FILE:LINE of the innermost frame of the traceback outside fmx and torch (the model's code)."""
    tb, where = e.__traceback__, None
    skip = (os.path.dirname(os.path.abspath(__file__)), os.path.dirname(os.path.abspath(torch.__file__)))
    while tb is not None:
        file = tb.tb_frame.f_code.co_filename
        if os.path.isabs(file) and not file.startswith(skip):
            where = f"{display_path(file)}:{tb.tb_lineno}"
        tb = tb.tb_next
    return where


if __name__ == "__main__":
    sys.exit(main())
