"""Generation probes: a causal LM's prefill and decode steps with its own KV cache, for decode tasks.

For a model that returns `logits` and a cache when called with `use_cache=True`, the exporter
(export.py) calls `capture_generations` after the ordinary probes. Each generation runs a prompt
batch (left-padded where the batch has several rows) through the model, then feeds the model's
own cache back (a DynamicCache-like object or transformers' legacy tuple of (key, value) pairs)
for several greedy decode steps. Every step is one probe (docs/pack-format.md, "Generation"):
every module call is captured as on any probe, and the root's call is recorded in the flat cache
convention a functional file uses instead of the model's own arguments:

    forward(input_ids, positions, attention_mask, past_keys, past_values, weights)
        -> (logits, keys, values)

input_ids and positions are (B, T_new); attention_mask (B, past + T_new) keep flags; past_keys /
past_values lists with one (B, kv_heads, past_l, head_dim) tensor per layer (length 0 on the
prefill); keys / values the same lists after the step. A sliding-window layer keeps only its last
`window` positions. Positions are HF generate's: the count of real tokens before each one.

Not here: the ordinary probes and the pack's files (export.py), grading (env/verify.c).
"""

from __future__ import annotations

import dataclasses
import inspect
import sys
import time
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

# (batch, prompt length, decode steps); visible first. Hidden: a longer generation, other batches.
VISIBLE_GENERATIONS = [(2, 7, 3)]
HIDDEN_GENERATIONS = [(3, 5, 8), (1, 4, 3)]


@dataclasses.dataclass
class Generation:
    name: str  # "g0", "g1", ...
    visible: bool
    batch: int
    prompt: int
    steps: int  # decode steps after the prefill
    dtype: Optional[str] = None  # a reduced-precision copy of the model ran it (None: the pack's dtype)
    inputs_of: Optional[str] = None  # the generation whose prompt it reruns


def plan(hidden: int, low_precision: Optional[str]) -> List[Generation]:
    """The generations: visible, then hidden ones, then (a float32 pack) the visible one rerun on a
    `low_precision` copy of the model, where casts are not no-ops."""
    shapes = [(True, s) for s in VISIBLE_GENERATIONS] + [(False, s) for s in HIDDEN_GENERATIONS[:max(0, hidden)]]
    gens = [Generation(f"g{i}", visible, *shape) for i, (visible, shape) in enumerate(shapes)]
    if low_precision:
        gens.append(dataclasses.replace(gens[0], name=f"g{len(gens)}", dtype=low_precision, inputs_of=gens[0].name))
    return gens


def why_not_causal_lm(model: nn.Module) -> Optional[str]:
    """None when the model looks like a causal LM with a cache, else the reason it gets no decode task."""
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return "its forward has no signature"
    missing = [p for p in ("input_ids", "attention_mask", "position_ids", "past_key_values", "use_cache")
               if p not in params]
    if missing:
        return f"its forward takes no {', '.join(missing)}"
    return None


def cache_lists(cache: Any) -> Tuple[List[Tensor], List[Tensor]]:
    """Per-layer (keys, values) of a model's cache: transformers' legacy tuple of (key, value)
    pairs, a DynamicCache (key_cache/value_cache lists, or layers with keys/values), or anything
    with to_legacy_cache()."""
    if hasattr(cache, "key_cache") and hasattr(cache, "value_cache"):
        return list(cache.key_cache), list(cache.value_cache)
    if hasattr(cache, "layers") and all(hasattr(layer, "keys") for layer in cache.layers):
        return [layer.keys for layer in cache.layers], [layer.values for layer in cache.layers]
    if hasattr(cache, "to_legacy_cache"):
        cache = cache.to_legacy_cache()
    if isinstance(cache, (tuple, list)) and cache and all(
            isinstance(pair, (tuple, list)) and len(pair) >= 2 and all(isinstance(t, Tensor) for t in pair[:2])
            for pair in cache):
        return [pair[0] for pair in cache], [pair[1] for pair in cache]
    raise ValueError(f"cannot read the model's cache ({type(cache).__name__}): expected a DynamicCache or "
                     "a tuple of (key, value) pairs per layer")


def layer_windows(config: Any, layers: int) -> List[Optional[int]]:
    """The sliding window of each layer (None: full attention), from the config as transformers
    reads it: `sliding_window` when `use_sliding_window` is not false, on the layers `layer_types`
    marks "sliding_attention" (every layer when it is absent)."""
    window = getattr(config, "sliding_window", None)
    if not isinstance(window, int) or isinstance(window, bool) or window <= 0 or \
            getattr(config, "use_sliding_window", True) is False:
        return [None] * layers
    types = getattr(config, "layer_types", None)
    if isinstance(types, (list, tuple)) and len(types) == layers:
        return [window if t == "sliding_attention" else None for t in types]
    return [window] * layers


def positions_of(mask: Tensor) -> Tensor:
    """HF generate's position ids for a (B, T) keep mask: real tokens count from 0, padding gets 1."""
    return (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)


def _logits(out: Any) -> Tensor:
    logits = getattr(out, "logits", None)
    if logits is None and isinstance(out, (tuple, list)) and out and isinstance(out[0], Tensor):
        logits = out[0]
    if not isinstance(logits, Tensor):
        raise ValueError(f"the model returned no logits ({type(out).__name__})")
    return logits


def _cache(out: Any) -> Any:
    cache = getattr(out, "past_key_values", None)
    if cache is None and isinstance(out, (tuple, list)) and len(out) > 1:
        cache = out[1]
    if cache is None:
        raise ValueError("the model returned no cache with use_cache=True")
    return cache


def capture_generations(model: nn.Module, capture: Any, writer: Any, gens: Sequence[Generation], first: int, *,
                        inputs_fn: Callable[..., Dict[str, Any]], load: Callable[[bool], None], seed: int,
                        device: str, quiet: bool) -> List[Dict[str, Any]]:
    """Runs every generation under `capture` (export.Capture, its call list shared with the pack's),
    its steps numbered as probes from `first`; returns their probe entries. `load(visible)` puts
    the weight set of that visibility into the model."""
    entries: List[Dict[str, Any]] = []
    load(True)
    windows = checked_windows(model, capture, inputs_fn, seed, device)
    for gen in gens:
        load(gen.visible)
        source = gen.inputs_of or gen.name
        generator = torch.Generator().manual_seed(seed * 1_000_003 + 7_919 + int(source[1:]))
        inputs = inputs_fn(model, gen.batch, gen.prompt, "left" if gen.batch > 1 else "none", generator)
        ids, mask = inputs.get("input_ids"), inputs.get("attention_mask")
        if not isinstance(ids, Tensor):
            raise ValueError("generation needs input_ids from the probe inputs")
        if not isinstance(mask, Tensor):
            mask = torch.ones_like(ids)
        mask = (mask != 0).to(torch.int64)
        cache: Any = None
        keys: List[Tensor] = []
        values: List[Tensor] = []
        positions = positions_of(mask)
        for step in range(gen.steps + 1):
            t0 = time.perf_counter()
            i = first + len(entries)
            new = ids.shape[1]
            capture.start_probe(i, gen.batch, new, trace_ops=False, mask=torch.ones(gen.batch, new, dtype=torch.int64)
                                if step else mask)
            at = len(capture.calls)
            kwargs = {"input_ids": ids.to(device), "attention_mask": mask.to(device),
                      "position_ids": positions.to(device), "use_cache": True}
            if cache is not None:
                kwargs["past_key_values"] = cache
            out = model(**kwargs)
            logits, cache = _logits(out), _cache(out)
            after_k, after_v = cache_lists(cache)
            after_k, after_v = _windowed(after_k, windows), _windowed(after_v, windows)
            if not keys:  # the prefill's past: empty, shaped like the cache it makes
                keys = [k[:, :, :0] for k in after_k]
                values = [v[:, :, :0] for v in after_v]
            root = capture.calls[at]
            assert root["module"] == "" and root["probe"] == i
            _record(capture, root, ids, positions, mask, keys, values, logits, after_k, after_v)
            step_mask = mask[:, -new:]
            mask_key = writer.add(f"p{i}/mask", step_mask.contiguous(), dedupe=True)
            entries.append({"name": f"p{i}", "visible": gen.visible, "batch": gen.batch, "seq": new,
                            "padding": "left" if step == 0 and bool((mask == 0).any()) else "none",
                            "mask": mask_key, "generation": gen.name, "step": step,
                            "past": int(mask.shape[1] - new)})
            if gen.dtype is not None:
                entries[-1]["dtype"] = gen.dtype
            if not quiet:
                kind = "visible" if gen.visible else "hidden"
                what = "prefill" if step == 0 else f"decode step {step}"
                print(f"generation {gen.name} ({kind}, batch {gen.batch}) {what}: probe p{i} "
                      f"{time.perf_counter() - t0:.2f}s", file=sys.stderr)
            # the next step: greedy token, its position, the mask extended; the cache as the model left it
            keys = [k.clone() for k in after_k]
            values = [v.clone() for v in after_v]
            ids = logits[:, -1:].argmax(-1).to("cpu")
            positions = positions[:, -1:] + 1
            mask = torch.cat([mask, torch.ones(gen.batch, 1, dtype=torch.int64)], dim=1)
    return entries


def checked_windows(model: nn.Module, capture: Any, inputs_fn: Callable[..., Dict[str, Any]], seed: int,
                    device: str) -> List[Optional[int]]:
    """The layers' windows (layer_windows), checked on the model where every layer has the same one:
    a decode step past the window must give the same logits from the cache cut to the window as
    from the whole cache. A model that still attends past it (a config whose window the forward
    ignores) keeps whole caches: the convention must hand a candidate what the model used."""
    config = getattr(model, "config", None)
    layers = getattr(config, "num_hidden_layers", None) or getattr(config, "n_layer", None)
    windows = layer_windows(config, layers) if isinstance(layers, int) else []
    if not any(windows):
        return windows
    if len(set(windows)) != 1:
        return windows  # per-layer types: the model's own rule, as transformers applies it
    window = windows[0]
    generator = torch.Generator().manual_seed(seed * 1_000_003 + 104_729)
    ids = inputs_fn(model, 1, window + 3, "none", generator).get("input_ids")
    mask = torch.ones(1, window + 4, dtype=torch.int64)
    positions = torch.arange(window + 4)[None]
    capture.replaying = True  # not the pack's calls
    try:
        out = model(input_ids=ids.to(device), attention_mask=mask[:, :-1].to(device),
                    position_ids=positions[:, :-1].to(device), use_cache=True)
        cache = _cache(out)
        keys, values = cache_lists(cache)
        cut = _cache_like(cache, [k[:, :, -window:] for k in keys], [v[:, :, -window:] for v in values])
        step = {"input_ids": _logits(out)[:, -1:].argmax(-1), "position_ids": positions[:, -1:].to(device),
                "use_cache": True}
        whole = _logits(model(attention_mask=mask.to(device), past_key_values=cache, **step))
        windowed = _logits(model(attention_mask=mask[:, -window - 1:].to(device), past_key_values=cut, **step))
    finally:
        capture.replaying = False
    scale = whole.float().pow(2).mean().sqrt()
    same = bool(((windowed.float() - whole.float()).abs() <= 1e-4 * (scale + whole.float().abs())).all())
    return windows if same else [None] * len(windows)


def _cache_like(cache: Any, keys: Sequence[Tensor], values: Sequence[Tensor]) -> Any:
    """A cache of the model's own kind holding these per-layer keys and values."""
    if isinstance(cache, (tuple, list)):
        return tuple((k, v) for k, v in zip(keys, values))
    if hasattr(type(cache), "from_legacy_cache"):
        return type(cache).from_legacy_cache(tuple((k, v) for k, v in zip(keys, values)))
    fresh = type(cache)()
    for i, (k, v) in enumerate(zip(keys, values)):
        fresh.update(k, v, i)
    return fresh


def _windowed(ts: List[Tensor], windows: Sequence[Optional[int]]) -> List[Tensor]:
    return [t[:, :, -w:] if w is not None and t.shape[2] > w else t for t, w in zip(ts, windows)]


def _record(capture: Any, call: Dict[str, Any], ids: Tensor, positions: Tensor, mask: Tensor,
            keys: Sequence[Tensor], values: Sequence[Tensor], logits: Tensor, after_k: Sequence[Tensor],
            after_v: Sequence[Tensor]) -> None:
    """The root call of a step in the cache convention (replaces the model's own arguments)."""
    def tensor(side: str, name: str, t: Tensor) -> Dict[str, Any]:
        # keys apart from those of the model's own arguments, which the capture stored already
        entry = capture._entry(call, "step_" + side, name, "tensor", t.detach().to("cpu").contiguous())
        if side == "out":
            entry["token_aligned"] = name == "logits"
        return entry

    inputs = [tensor("in", "input_ids", ids), tensor("in", "positions", positions),
              tensor("in", "attention_mask", mask)]
    inputs += [tensor("in", f"past_keys_{j}", k) for j, k in enumerate(keys)]
    inputs += [tensor("in", f"past_values_{j}", v) for j, v in enumerate(values)]
    outputs = [tensor("out", "logits", logits)]
    for name, ts in (("keys", after_k), ("values", after_v)):
        for j, t in enumerate(ts):
            entry = tensor("out", f"{name}_{j}", t)
            # graded at real tokens only: (B, kv_heads, L) keep flags over the cache's leading dims
            keep = mask[:, -t.shape[2]:] if t.shape[2] else mask[:, :0]
            keep = keep[:, None, :].expand(t.shape[0], t.shape[1], t.shape[2]).contiguous()
            entry["mask"] = capture.writer.add(f"p{call['probe']}//0/step_out/{name}_{j}/mask", keep, dedupe=True)
            outputs.append(entry)
    call["inputs"], call["outputs"] = inputs, outputs


def summary(entries: Sequence[Mapping[str, Any]], gens: Sequence[Generation]) -> Dict[str, Any]:
    """task.json's "generation": the convention and which probes are which step."""
    out = []
    for g in gens:
        item = {"name": g.name, "visible": g.visible, "batch": g.batch, "prompt": g.prompt, "steps": g.steps,
                "probes": [e["name"] for e in entries if e.get("generation") == g.name]}
        if g.dtype is not None:
            item.update(dtype=g.dtype, inputs_of=g.inputs_of)
        out.append(item)
    return {"convention": "flat-kv-v1",
            "entry": ["input_ids", "positions", "attention_mask", "past_keys", "past_values"],
            "returns": ["logits", "keys", "values"], "generations": out}
