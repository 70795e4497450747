"""The hidden weight set: a second draw of a pack's weights, which its hidden probes run under.

A candidate is graded on hidden probes too, and there it is handed
`weights_hidden.safetensors` instead of `weights.safetensors`: same names, shapes,
dtypes and ties, other values. So a candidate that copied weight values into its
source (or fitted constants to the visible probes) fails there, while one that
computes from the weights it is handed passes. The exporter draws the set as the
pack's own weights were drawn, but independently (docs/pack-format.md, "Hidden
weights"):

- `sensitive` (the exporter's own init, --sensitive-init / --random-init):
  sensitive_init again, from seed + HIDDEN_SEED;
- `model` (a model file's own init): the model built again after
  torch.manual_seed(seed + HIDDEN_SEED), its parameters taken;
- `perturbed` (pretrained weights, or a model handed in as an object): every
  floating parameter plus N(0, (0.25·std)²), its own std (0.1·RMS for a constant
  tensor; an all-zero one stays zero), so the model stays in its regime.

A parameter the draw left bit-identical (a factory that seeds itself, a norm
weight initialised to ones) is perturbed the same way. Then the residual stream
(embeddings and the projections into it), and apart from it each projection a
norm normalizes whole (a q-norm's q projection), is scaled down until a norm's
eps matters: eps ×1.5 moves the norm's output by about EPS_TARGET relative
(median over the norms), 1000× the float32 tolerance (in a bfloat16 pack 4× its
rtol). In a pre-norm model this changes nothing but eps's weight (every norm
divides the scale out). Buffers are not redrawn.

It draws weights only; the exporter captures the probes and writes the files.
"""

from __future__ import annotations

import math
import statistics
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from .constants import eps_attributes, eps_sensitivity

HIDDEN_SEED = 0x68696464  # added to the pack's seed: the hidden draw's seed
PERTURB = 0.25            # a perturbed parameter's noise, in units of its own std
EPS_TARGET = 1e-2         # relative change of a norm's output at eps x1.5, median over the norms
TARGET_OVER_RTOL = 4      # and at least this many times the pack dtype's rtol (bfloat16: 3.1e-2)
MIN_SCALE = 1e-6


def parameters(model: nn.Module) -> Dict[str, Tensor]:
    """Every parameter under every name it has (tied ones under each), in module order."""
    out: Dict[str, Tensor] = {}
    for mpath, module in model.named_modules(remove_duplicate=False):
        for name, p in module._parameters.items():
            if p is not None:
                out.setdefault(f"{mpath}.{name}" if mpath else name, p)
    return out


def snapshot(model: nn.Module) -> Dict[str, Tensor]:
    """A copy of every parameter's value by name; tied names share one copy."""
    clones: Dict[int, Tensor] = {}
    out = {}
    for name, p in parameters(model).items():
        if id(p) not in clones:
            clones[id(p)] = p.detach().clone()
        out[name] = clones[id(p)]
    return out


def load(model: nn.Module, values: Dict[str, Tensor]) -> None:
    """Copies `values` (a snapshot) into the model's parameters, in place."""
    with torch.no_grad():
        for name, p in parameters(model).items():
            if name in values:
                p.copy_(values[name])


def perturbed(p: Tensor, gen: torch.Generator) -> Tensor:
    """p + N(0, (PERTURB·std(p))²); for a constant p, N(0, (0.1·RMS)²); all zero stays zero."""
    x = p.detach().float()
    std = float(x.std(unbiased=False)) if x.numel() > 1 else 0.0
    sigma = PERTURB * std if std > 0 else 0.1 * float(x.pow(2).mean().sqrt())
    if not math.isfinite(sigma) or sigma == 0:
        return p.detach().clone()
    noise = torch.randn(p.shape, generator=gen, dtype=torch.float32).to(x.device)
    return (x + noise * sigma).to(p.dtype)


def draw(model: nn.Module, kind: str, seed: int, redraw: Optional[Callable[[int], Any]],
         residual: Sequence[str], run: Callable[[], Any],
         target: float = EPS_TARGET) -> Tuple[Dict[str, Tensor], Dict[str, Tensor], Dict[str, Any]]:
    """Draws the hidden set into `model`; returns (the public parameters, the hidden ones, task.json's
    hidden_init), each by every name, and puts the public ones back.

    `redraw(seed)` redraws the parameters in place by the pack's policy (None: perturb them);
    `residual` names the parameters that carry the residual stream's scale (export.residual_stream);
    `run()` runs the model on one probe's inputs, to tune the scales on until eps x1.5 moves a
    norm's output by about `target` (relative).
    """
    hidden_seed = seed + HIDDEN_SEED
    gen = torch.Generator().manual_seed(hidden_seed)
    public = snapshot(model)
    names = parameters(model)
    unique: Dict[int, Tuple[str, Tensor]] = {}
    for name, p in names.items():
        unique.setdefault(id(p), (name, p))
    info: Dict[str, Any] = {"kind": kind, "seed": hidden_seed}
    same = 0
    try:
        with torch.no_grad():
            if redraw is not None:
                redraw(hidden_seed)
            for name, p in unique.values():
                if not p.is_floating_point() or p.numel() == 0:
                    continue
                if redraw is None or torch.equal(p, public[name]):
                    p.copy_(perturbed(p, gen))
                    same += redraw is not None
        if redraw is None or same:
            info["perturb"] = PERTURB
        if same:
            info["perturbed"] = same  # parameters the redraw left as they were
        info.update(_tune(model, names, residual, run, target))
        hidden = snapshot(model)
    finally:
        load(model, public)
    return public, hidden, info


def _tune(model: nn.Module, names: Dict[str, Tensor], residual: Sequence[str], run: Callable[[], Any],
          target: float) -> Dict[str, Any]:
    """Scales groups of parameters by s <= 1 until eps x1.5 moves the norms they feed by about
    `target` (relative RMS of the output, median over the group's norms, on run()'s probe): the
    residual stream for the norms on it, and the projection whose whole output a norm normalizes
    (a q-norm's q projection) for each such norm. task.json's fields for it."""
    # group: (parameter names, the norms it is tuned on; None: every norm no other group owns)
    groups: List[Tuple[List[str], Optional[List[str]]]] = [(list(residual), None)]
    taken = set(residual)
    by_feeders: Dict[Tuple[str, ...], List[str]] = {}
    for norm, feeders in _feeders(model, run).items():
        by_feeders.setdefault(tuple(feeders), []).append(norm)
    for feeders, norms in by_feeders.items():
        params = [n for n in names if n.rpartition(".")[0] in feeders and n.rpartition(".")[2] in ("weight", "bias")
                  and n not in taken and names[n].is_floating_point()]
        if params:
            taken.update(params)
            groups.append((params, norms))
    owned = {n for _, norms in groups[1:] for n in norms or ()}
    tensors = [list({id(names[n]): names[n] for n in params if n in names}.values()) for params, _ in groups]
    base = [[p.detach().clone() for p in ps] for ps in tensors]
    scales = [1.0] * len(groups)
    changes: List[Optional[float]] = [None] * len(groups)
    for _ in range(6):
        sens = eps_sensitivity(model, run)
        moved = False
        for g, (_, norms) in enumerate(groups):
            vals = [v for k, v in sens.items() if v > 0 and (k in norms if norms is not None else k not in owned)]
            changes[g] = statistics.median(vals) if vals else None
            change = changes[g]
            if change is None or not tensors[g] or target / 2 <= change <= target * 2 or \
                    (scales[g] == 1.0 and change > target):
                continue
            new = min(1.0, max(MIN_SCALE, scales[g] * math.sqrt(change / target)))
            if new != scales[g]:
                scales[g] = new
                moved = True
                with torch.no_grad():
                    for p, b in zip(tensors[g], base[g]):
                        p.copy_((b.float() * new).to(p.dtype))
        if not moved:
            break

    def rounded(x: Optional[float], digits: int) -> Optional[float]:
        return None if x is None else float(f"{x:.{digits}g}")

    return {"residual": groups[0][0], "residual_scale": rounded(scales[0], 4), "eps_change": rounded(changes[0], 3),
            "norm_inputs": [{"norms": norms, "params": params, "scale": rounded(scales[g], 4),
                             "eps_change": rounded(changes[g], 3)}
                            for g, (params, norms) in enumerate(groups) if g > 0]}


def _storage_key(t: Tensor) -> Tuple[int, int]:
    storage = t.untyped_storage() if hasattr(t, "untyped_storage") else t.storage()
    return storage.data_ptr(), t.numel()


def _feeders(model: nn.Module, run: Callable[[], Any]) -> Dict[str, List[str]]:
    """Per module with an eps-like constant: the modules (paths) whose whole output, viewed or
    transposed but not sliced or recomputed, is its first input on every call while run() runs
    (a q projection before a q-norm). Embeddings and modules without a 2-D weight do not count."""
    made: Dict[Tuple[int, int], Tuple[str, Tensor]] = {}  # holds the outputs: no storage is reused
    found: Dict[str, set] = {}
    missed: set = set()
    handles = []

    def before(path: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: Tuple[Any, ...]) -> None:
            src = made.get(_storage_key(args[0])) if args and isinstance(args[0], Tensor) else None
            if src is None:
                missed.add(path)
            else:
                found.setdefault(path, set()).add(src[0])
        return hook

    def after(path: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: Tuple[Any, ...], out: Any) -> None:
            if isinstance(out, Tensor):
                made[_storage_key(out)] = (path, out)
        return hook

    for path, module in model.named_modules():
        if eps_attributes(module):
            handles.append(module.register_forward_pre_hook(before(path)))
        elif "embedding" not in type(module).__name__.lower() and \
                any(p.dim() >= 2 for p in module.parameters(recurse=False)):
            handles.append(module.register_forward_hook(after(path)))
    try:
        with torch.no_grad():
            run()
    finally:
        for h in handles:
            h.remove()
        made.clear()
    return {path: sorted(src) for path, src in found.items() if path not in missed}
