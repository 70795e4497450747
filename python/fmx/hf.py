"""Transformers models for the exporter: every family, built from a config or a snapshot.

`build(path, config_path, random_init, overrides)` returns the model and the probe
inputs fmx makes for it. The class is the config's `architectures[0]` when
transformers has it, else the first Auto class that takes the config (causal LM,
sequence-to-sequence LM, masked LM, image classification, audio classification,
then the bare AutoModel). Probe inputs follow the model's `main_input_name`:
token ids and an attention mask (and decoder ids for an encoder-decoder), pixel
values at the config's image size, raw audio samples, or log-mel features at the
length the encoder expects.

Only public transformers API is used (Auto classes, `main_input_name`, config
attributes), so the same code runs with transformers 4.47 on torch 1.13 and with
current releases on torch 2.x. This is not the exporter (export.py) and does not
trace.
"""

from __future__ import annotations

import difflib
import json
import math
import os
import sys
from typing import Any, Callable, Dict, Mapping, Optional, Tuple

import torch
from torch import Tensor, nn

# Tried in this order when the config names no architecture transformers has.
AUTO_CLASSES = ("AutoModelForCausalLM", "AutoModelForSeq2SeqLM", "AutoModelForMaskedLM",
                "AutoModelForImageClassification", "AutoModelForAudioClassification", "AutoModel")

InputsFn = Callable[[nn.Module, int, int, str, torch.Generator], Dict[str, Any]]


class HFError(Exception):
    """A config or snapshot transformers cannot build (the exporter prints it as one line, exit 2)."""


def available() -> bool:
    """Whether transformers imports here (FMX_PYDEPS: a folder with it, added to the path)."""
    extra = os.environ.get("FMX_PYDEPS")
    if extra and os.path.isdir(extra) and extra not in sys.path:
        sys.path.append(extra)
    try:
        import transformers  # noqa: F401
    except ImportError:
        return False
    return True


def load_config(source: str, overrides: Mapping[str, Any]) -> Tuple[Any, Dict[str, Any]]:
    """(config, model kwargs) from a config.json or a snapshot folder, with `overrides` set on it.
    `attn_implementation` is a model kwarg, not a config field; an override naming no config
    field is refused (a typo would otherwise be ignored)."""
    from transformers import AutoConfig

    if not os.path.exists(source):
        raise HFError(f"not found: {source}")
    rest = dict(overrides)
    attn = rest.pop("attn_implementation", None)
    kwargs = {"attn_implementation": attn or "eager"}  # eager unless asked: sdpa needs torch 2
    if os.path.isfile(source):
        try:
            with open(source, encoding="utf-8") as f:
                raw = json.load(f)
            model_type = raw.pop("model_type")
            kwargs["attn_implementation"] = attn or raw.pop("attn_implementation", None) or "eager"
        except (OSError, ValueError, KeyError, AttributeError, TypeError) as e:
            raise HFError(f"{source}: not a transformers config.json with a model_type ({e})") from None
        try:
            config = AutoConfig.for_model(model_type, **raw, **kwargs)
        except (ValueError, KeyError, TypeError) as e:
            raise HFError(f"{source}: {e}".splitlines()[0]) from None
    else:
        config = AutoConfig.from_pretrained(source, local_files_only=True, **kwargs)
    known = set(config.to_dict()) | set(getattr(config, "attribute_map", None) or {})  # (n_layer: num_hidden_layers)
    for key, value in rest.items():
        if key not in known:
            close = difflib.get_close_matches(key, sorted(known), n=3)
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise HFError(f"--set {key}: {type(config).__name__} has no field {key!r}{hint}")
        setattr(config, key, value)
    if getattr(config, "use_cache", None) and "use_cache" not in rest:
        config.use_cache = False  # one forward per probe, no cache to keep (gemma2's needs torch 2)
    return config, kwargs


def build(path: Optional[str], config_path: Optional[str], random_init: bool,
          overrides: Mapping[str, Any]) -> Tuple[nn.Module, InputsFn]:
    """A transformers model from a snapshot folder (`path`) or a config file (random weights)."""
    import transformers

    source = path if path is not None else config_path
    assert source is not None
    config, kwargs = load_config(source, overrides)
    named = []
    for arch in getattr(config, "architectures", None) or []:
        try:
            named.append(getattr(transformers, arch, None))
        except Exception as e:  # noqa: BLE001 - transformers imports the model's module lazily, here
            raise HFError(f"transformers cannot import {arch} here: {type(e).__name__}: {e}".splitlines()[0]) from None
    classes = [(c, c.__name__) for c in named if c is not None][:1] or [
        (getattr(transformers, a), a) for a in AUTO_CLASSES]
    tried = []
    for cls, name in classes:
        try:
            if path is not None and not random_init:
                model = cls.from_pretrained(path, config=config, local_files_only=True, **kwargs)
            else:
                model = _from_config(cls, config, kwargs)
            return model.eval(), inputs
        except ValueError as e:  # an Auto class that does not take this config: the next one
            tried.append(name)
            if "Unrecognized configuration class" not in str(e):
                raise HFError(f"{name} from {source}: {e}".splitlines()[0]) from None
        except (TypeError, ImportError, OSError, RuntimeError, AttributeError, KeyError) as e:
            raise HFError(f"{name} from {source}: {type(e).__name__}: {e}".splitlines()[0]) from None
    raise HFError(f"no transformers class builds a {type(config).__name__} (tried {', '.join(tried)})")


def _from_config(cls: Any, config: Any, kwargs: Dict[str, Any]) -> nn.Module:
    """An Auto class's from_config, or a model class built from the config (random weights)."""
    if hasattr(cls, "from_config"):
        return cls.from_config(config, **kwargs)
    return cls(config)  # (the config carries attn_implementation)


# --------------------------------------------------------------------------- probe inputs


def _int(config: Any, *names: str, default: int) -> int:
    for name in names:
        value = getattr(config, name, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return default


def _ids(config: Any, batch: int, seq: int, generator: torch.Generator) -> Tensor:
    vocab = _int(config, "vocab_size", default=0)
    if vocab < 1:
        raise HFError(f"{type(config).__name__} has no vocab_size: cannot make token ids")
    return torch.randint(0, vocab, (batch, seq), generator=generator, dtype=torch.int64)


def inputs(model: nn.Module, batch: int, seq: int, padding: str, generator: torch.Generator) -> Dict[str, Any]:
    """Probe inputs for a transformers model, by its main input (see the module doc)."""
    from .export import padding_mask

    config = model.config
    main = getattr(model, "main_input_name", "input_ids")
    out: Dict[str, Any] = {}
    if main == "input_ids":
        ids = _ids(config, batch, seq, generator)
        mask = padding_mask(batch, seq, padding, generator)
        pad = getattr(config, "pad_token_id", None)
        if isinstance(pad, int) and not isinstance(pad, bool) and 0 <= pad < _int(config, "vocab_size", default=0):
            ids = ids.masked_fill(mask == 0, pad)
        out.update(input_ids=ids, attention_mask=mask)
    elif main == "pixel_values":
        size = getattr(config, "image_size", 32)
        size = list(size) if isinstance(size, (list, tuple)) else [size, size]
        channels = _int(config, "num_channels", default=3)
        out["pixel_values"] = torch.randn([batch, channels] + size, generator=generator)
    elif main == "input_values":  # raw audio: seq frames of the feature encoder
        stride = math.prod(getattr(config, "conv_stride", None) or [1])
        kernel = sum(getattr(config, "conv_kernel", None) or [1])
        out["input_values"] = torch.randn(batch, seq * stride + kernel, generator=generator)
    elif main == "input_features":  # log-mel frames, as many as the encoder expects
        mels = _int(config, "num_mel_bins", "feature_size", default=80)
        frames = 2 * _int(config, "max_source_positions", default=seq)
        out["input_features"] = torch.randn(batch, mels, frames, generator=generator)
    else:
        raise HFError(f"{type(model).__name__}'s main input is {main!r}: fmx makes token ids, pixel values, "
                      "audio samples or log-mel features; define fmx_inputs in a model file instead")
    if getattr(config, "is_encoder_decoder", False):
        out["decoder_input_ids"] = _ids(config, batch, seq, generator)
    return out
