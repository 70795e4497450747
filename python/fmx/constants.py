"""Which constants of a model its probes can see: a normalization layer's eps, above all.

A constant is seen when getting it wrong fails some probe. For every module whose
instance holds a positive float attribute named `eps` or `epsilon`, or ending in
`_eps` / `_epsilon` (nn.LayerNorm's `eps`, an HF RMSNorm's `variance_epsilon`,
`layer_norm_eps`), the exporter reruns each call of the module on that call's own
inputs with the constant ×1.5 and ÷1.5 and measures how far its outputs move
against the pack's tolerance (`ConstantCheck`, fed by export.Capture). A constant
that moves no probe's output past the tolerance either way is *unseen*: task.json
lists it (docs/pack-format.md, "Constants the probes see").
`eps_sensitivity` measures the same change relative to the output's size, which
is what hidden.py tunes the hidden weight set with.

It reruns modules only; it never runs candidate code and writes nothing.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import re
import statistics
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

EPS_ATTR = re.compile(r"(^|_)(eps|epsilon)$")
# (task.json key, factor) of the two changes every constant gets
FACTORS = (("times_1.5", 1.5), ("over_1.5", 1 / 1.5))
EXCEEDS_CAP = 1e30  # an output that moved where its allowance is zero (JSON has no inf)


def eps_attributes(module: nn.Module) -> List[Tuple[str, float]]:
    """(attribute, value) of the module's own eps-like float constants."""
    return [(k, v) for k, v in vars(module).items()
            if EPS_ATTR.search(k) and type(v) is float and math.isfinite(v) and v > 0]


def rerun(module: nn.Module, forward: Callable[..., Any], args: Sequence[Any], kwargs: Mapping[str, Any],
          attr: str, value: float) -> Any:
    """forward(*args, **kwargs) with module.<attr> = value for the call."""
    old = getattr(module, attr)
    setattr(module, attr, value)
    try:
        return forward(*args, **kwargs)
    finally:
        setattr(module, attr, old)


def tensors(value: Any) -> List[Tensor]:
    """The tensors of an output, in order (tuples, lists, mappings, dataclasses)."""
    if isinstance(value, Tensor):
        return [value]
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return [t for f in dataclasses.fields(value) for t in tensors(getattr(value, f.name, None))]
    if isinstance(value, Mapping):
        return [t for v in value.values() for t in tensors(v)]
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in tensors(v)]
    return []


def exceeds(want: Tensor, got: Tensor, atol: float, rtol: float, keep: Optional[Tensor] = None) -> float:
    """The worst graded element's |got - want| over its allowance atol·RMS(want) + rtol·|want|
    (RMS over the graded elements: finite, and where `keep` is true); > 1 fails a verifier."""
    if want.shape != got.shape:
        return math.inf
    w, g = want.detach().double(), got.detach().double()
    ok = torch.isfinite(w) & torch.isfinite(g)
    if keep is not None:
        ok &= keep.to(ok.device)
    if not bool(ok.any()):
        return 0.0
    w, g = w[ok], g[ok]
    allow = atol * w.pow(2).mean().sqrt() + rtol * w.abs()
    diff = (g - w).abs()
    over = torch.where(allow > 0, diff / allow.clamp_min(1e-300), torch.where(diff > 0, math.inf, 0.0))
    return float(over.max())


def relative_change(want: Tensor, got: Tensor) -> float:
    """RMS(got - want) / RMS(want) over the finite elements; 0 when want is all zero."""
    w, g = want.detach().double(), got.detach().double()
    ok = torch.isfinite(w) & torch.isfinite(g)
    if want.shape != got.shape or not bool(ok.any()):
        return 0.0
    scale = float(w[ok].pow(2).mean().sqrt())
    return float((g - w)[ok].pow(2).mean().sqrt()) / scale if scale > 0 else 0.0


def _keep(t: Tensor, mask: Optional[Tensor]) -> Optional[Tensor]:
    """The probe mask broadcast over a token-aligned (B, T, ...) output; None for others."""
    if mask is None or t.dim() < 2 or tuple(t.shape[:2]) != tuple(mask.shape):
        return None
    return (mask != 0).reshape(*mask.shape, *([1] * (t.dim() - 2))).expand(t.shape)


class ConstantCheck:
    """Per (module path, constant): the largest move of the module's outputs past the tolerance,
    over every call on every probe, for each of FACTORS. Feed it every call (`check`), then
    `report()`."""

    def __init__(self, model: nn.Module, tolerance: Mapping[str, Mapping[str, float]]) -> None:
        self.tolerance = tolerance
        self.watched: Dict[Tuple[str, str], Tuple[str, float]] = {}  # -> (class, value), module order
        self.attrs: Dict[str, List[Tuple[str, float]]] = {}
        for path, module in model.named_modules():
            found = eps_attributes(module)
            if found:
                self.attrs[path] = found
                for attr, value in found:
                    self.watched[(path, attr)] = (type(module).__name__, value)
        # (path, attr, factor key) -> (exceeds, probe name) of the best probe
        self.best: Dict[Tuple[str, str, str], Tuple[float, str]] = {}
        self.failed: Dict[Tuple[str, str], str] = {}  # a rerun that raised, the first reason

    def watches(self, path: str) -> bool:
        return path in self.attrs

    def check(self, path: str, module: nn.Module, forward: Callable[..., Any], args: Sequence[Any],
              kwargs: Mapping[str, Any], out: Any, probe: str, mask: Optional[Tensor]) -> None:
        """Reruns one call of the module at `path` with each constant changed by each factor."""
        want = [t for t in tensors(out) if t.is_floating_point()]
        for attr, _ in self.attrs[path]:
            value = getattr(module, attr)
            for key, factor in FACTORS:
                try:
                    changed = rerun(module, forward, args, kwargs, attr, value * factor)
                except Exception as e:  # a measurement must not fail the export: say so instead
                    self.failed.setdefault((path, attr), f"{type(e).__name__}: {e}"[:200])
                    continue
                got = [t for t in tensors(changed) if t.is_floating_point()]
                worst = 0.0
                for w, g in zip(want, got):
                    tol = self.tolerance.get(str(w.dtype).replace("torch.", ""), {"atol": 0.0, "rtol": 0.0})
                    worst = max(worst, exceeds(w, g, tol["atol"], tol["rtol"], _keep(w, mask)))
                if len(got) != len(want):
                    worst = math.inf
                best = self.best.get((path, attr, key))
                if best is None or worst > best[0]:
                    self.best[(path, attr, key)] = (worst, probe)

    def report(self) -> Tuple[List[Dict[str, Any]], List[Dict[str, str]]]:
        """(task.json "constants", "unseen_constants")."""
        checks: List[Dict[str, Any]] = []
        unseen: List[Dict[str, str]] = []
        for (path, attr), (cls, value) in self.watched.items():
            entry: Dict[str, Any] = {"module": path, "class": cls, "constant": attr, "value": value}
            moves = []
            for key, factor in FACTORS:
                best = self.best.get((path, attr, key))
                if best is not None:
                    entry[key] = {"probe": best[1], "exceeds": float(f"{min(best[0], EXCEEDS_CAP):.3g}")}
                    moves.append((key, best))
            checks.append(entry)
            if not moves and (path, attr) in self.failed:
                unseen.append({"module": path, "constant": attr,
                               "why": f"rerunning the module with {attr} changed failed: {self.failed[(path, attr)]}"})
            elif not moves:
                unseen.append({"module": path, "constant": attr, "why": "no probe runs this module"})
            elif all(best[0] == 0 for _, best in moves):
                unseen.append({"module": path, "constant": attr,
                               "why": f"changing {attr} does not change the module's outputs on any probe "
                                      "(its forward does not read this attribute?)"})
            elif any(best[0] <= 1 for _, best in moves):
                said = ", ".join(f"{'×1.5' if key == 'times_1.5' else '÷1.5'} by at most {best[0]:.2g}× "
                                 f"({best[1]})" for key, best in moves)
                unseen.append({"module": path, "constant": attr,
                               "why": f"{attr} {value:g} changed moves the outputs within the tolerance: {said}"})
        return checks, unseen


@contextlib.contextmanager
def _wrapped(model: nn.Module, hook: Callable[[str, nn.Module, Callable[..., Any], Tuple[Any, ...],
                                               Dict[str, Any], Any], None]) -> Iterator[None]:
    """Calls hook(path, module, forward, args, kwargs, out) after every call of a module that
    has eps-like constants, for the duration of the block."""
    saved: List[Tuple[nn.Module, Optional[Any]]] = []

    def wrap(path: str, module: nn.Module, orig: Callable[..., Any]) -> Callable[..., Any]:
        def forward(*args: Any, **kwargs: Any) -> Any:
            out = orig(*args, **kwargs)
            hook(path, module, orig, args, kwargs, out)
            return out
        return forward

    try:
        for path, module in model.named_modules():
            if eps_attributes(module):
                saved.append((module, module.__dict__.get("forward")))
                module.forward = wrap(path, module, module.forward)
        yield
    finally:
        for module, previous in saved:
            if previous is None:
                del module.forward
            else:
                module.forward = previous


def eps_sensitivity(model: nn.Module, run: Callable[[], Any]) -> Dict[str, float]:
    """Per module path: how much its outputs move (relative RMS, averaged over its calls and its
    constants) when each eps-like constant is ×1.5, while run() runs the model."""
    seen: Dict[str, List[float]] = {}

    def hook(path: str, module: nn.Module, forward: Callable[..., Any], args: Tuple[Any, ...],
             kwargs: Dict[str, Any], out: Any) -> None:
        want = tensors(out)
        for attr, value in eps_attributes(module):
            got = tensors(rerun(module, forward, args, kwargs, attr, value * 1.5))
            change = [relative_change(w, g) for w, g in zip(want, got) if w.is_floating_point()]
            if change:
                seen.setdefault(path, []).append(max(change))

    with torch.no_grad(), _wrapped(model, hook):
        run()
    return {path: statistics.fmean(v) for path, v in seen.items()}
