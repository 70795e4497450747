"""Dataflow op traces: which value every op read and wrote, generalized over probes.

While the exporter traces a module's first call, a `Flow` names every tensor the
call sees: its inputs (`{"in": "hidden_states"}`), its parameters and buffers
relative to the module (`{"w": "q_proj.weight"}`), and each op's results
(`{"v": 3}`, numbered in the order they appear). Each op record gets its
arguments in that vocabulary (`x`, `kw`) and the values it made (`y`); a child
module's call record gets the values it was handed and the ones it returned.

One probe's trace holds that probe's shapes and dtypes as plain numbers. The
exporter traces several probes (other batch and sequence sizes, a bfloat16 copy)
and `generalize` keeps what stayed the same and explains what changed: an int
that followed a tensor's size becomes `{"dim": [ref, d]}` (or a product or
offset of sizes), a dtype that followed a tensor's becomes `{"dtype_of": ref}`,
a float that was the dtype's lowest finite value `{"finfo_min": ref}`; devices
are always `{"device_of": ref}`. What cannot be explained stays
`{"varies": [...]}` and the module says why in `dataflow`. The format is
documented in docs/pack-format.md ("Op traces").
"""

from __future__ import annotations

import math
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

CONST_MAX = 4096  # an untracked tensor up to this many elements is recorded by value
_VIEW_OPS = ("torch.Tensor.view", "torch.Tensor.reshape", "torch.reshape")


def _dtype(t: Tensor) -> str:
    return str(t.dtype).replace("torch.", "")


def _key(ref: Dict[str, Any]) -> str:
    if "v" in ref:
        return f"v{ref['v']}"
    if "in" in ref:
        return f"in:{ref['in']}"
    return f"w:{ref['w']}"


def module_tensors(module: nn.Module) -> Iterator[Tuple[str, Tensor]]:
    """Every parameter and buffer the module sees, by name relative to it (tied ones under each name)."""
    for mpath, sub in module.named_modules(remove_duplicate=False):
        for table in (sub._parameters, sub._buffers):
            for name, t in table.items():
                if t is not None:
                    yield (f"{mpath}.{name}" if mpath else name), t


class Flow:
    """The dataflow of one traced module call: tensor -> reference, and each reference's shape and dtype."""

    def __init__(self, module: nn.Module, inputs: Sequence[Tuple[str, str, Any]],
                 ops: Optional[List[Dict[str, Any]]] = None) -> None:
        self.ops = ops if ops is not None else []  # the call's op records (a view found late is added)
        self.refs: Dict[int, Dict[str, Any]] = {}
        self.info: Dict[str, Tuple[List[int], str]] = {}
        self.order: List[str] = []  # input keys, in order, then values as they appear
        self.keep: List[Any] = []   # every mapped tensor stays alive, so no id() is reused
        self.count = 0
        self.aliases: Dict[str, str] = {}  # value -> the reference it is the same tensor as (x.float() of a float)
        self.returns: Optional[List[Any]] = None
        self.return_names: List[str] = []
        self.inputs = [leaf for leaf, kind, _ in inputs if kind == "tensor"]
        self.weights: List[Tuple[str, Tensor]] = []  # (name, tensor): no constant may hold their values
        for name, t in module_tensors(module):
            if id(t) not in self.refs:
                self._bind(t, {"w": name})
                self.weights.append((name, t))
        for leaf, kind, payload in inputs:
            if kind == "tensor":
                self._bind(payload, {"in": leaf})
                self.order.append(_key({"in": leaf}))

    def _bind(self, t: Tensor, ref: Dict[str, Any]) -> None:
        self.refs[id(t)] = ref
        self.keep.append(t)
        self.info[_key(ref)] = (list(t.shape), _dtype(t))

    def new_value(self, t: Tensor) -> int:
        n = self.count
        self.count += 1
        same = self.refs.get(id(t))
        if same is not None:  # an op that handed back its input: either name is right on this probe
            self.aliases[f"v{n}"] = self.aliases.get(_key(same), _key(same))
        self._bind(t, {"v": n})
        self.order.append(f"v{n}")
        return n

    def encode(self, value: Any) -> Any:
        """One argument in the trace's vocabulary (JSON)."""
        if isinstance(value, Tensor):
            ref = self.refs.get(id(value))
            if ref is not None:
                return dict(ref)
            view = self._late_view(value)
            if view is not None:
                return view
            if value.numel() <= CONST_MAX and value.layout == torch.strided and not value.is_complex():
                const = {"const": value.detach().cpu().tolist(), "shape": list(value.shape), "dtype": _dtype(value)}
                weight = self.weight_of(value)
                if weight is not None:  # the trace missed how the weight was read: never bake it in
                    const["weight"] = weight
                return const
            return {"unknown": list(value.shape), "dtype": _dtype(value)}
        if isinstance(value, bool) or value is None or isinstance(value, (int, str)):
            return value
        if isinstance(value, float):  # integral ones tagged: JSON readers may make them ints
            return value if math.isfinite(value) and not value.is_integer() else {"float": repr(value)}
        if isinstance(value, torch.dtype):
            return {"dtype": str(value).replace("torch.", "")}
        if isinstance(value, torch.device):
            return {"device": str(value)}
        if isinstance(value, slice):
            return {"slice": [self.encode(value.start), self.encode(value.stop), self.encode(value.step)]}
        if value is Ellipsis:
            return {"ellipsis": True}
        if isinstance(value, tuple):
            return {"tuple": [self.encode(v) for v in value]}
        if isinstance(value, list):
            return {"list": [self.encode(v) for v in value]}
        return {"repr": repr(value)[:120]}

    def weight_of(self, t: Tensor) -> Optional[str]:
        """The name of a parameter or buffer whose memory or values `t` holds (a view the trace did not
        see, or a copy of one), else None."""
        if t.numel() < 2:
            return None
        for name, w in self.weights:
            if w.numel() < 2 or w.device != t.device:
                continue
            if w.data_ptr() <= t.data_ptr() < w.data_ptr() + w.numel() * w.element_size():
                return name
            if w.numel() == t.numel() and w.dtype == t.dtype:
                flat = t.detach().reshape(-1)
                if torch.equal(flat, w.detach().reshape(-1)) or (
                        w.dim() == 2 and torch.equal(flat, w.detach().t().reshape(-1))):
                    return name
        return None

    def _late_view(self, t: Tensor) -> Optional[Dict[str, Any]]:
        """A view of a known tensor made where the trace could not see it (torch 1.13 indexes x[None]
        without dispatching): when it holds the same elements in the same order, it is written as
        `view(base, sizes)` before the op that reads it."""
        base = getattr(t, "_base", None)
        ref = self.refs.get(id(base)) if base is not None else None
        if ref is None or base is None or not (t.is_contiguous() and base.is_contiguous()) or \
                t.numel() != base.numel() or t.storage_offset() != base.storage_offset():
            return None
        n = self.new_value(t)
        self.ops.append({"op": "torch.Tensor.view", "in": [list(base.shape)], "out": [list(t.shape)],
                         "x": [dict(ref)] + list(t.shape), "kw": {}, "y": [n], "late": True})
        return {"v": n}

    def outputs(self, out: Any) -> List[int]:
        """Fresh values for the tensors in an op's result, in order."""
        if isinstance(out, Tensor):
            return [self.new_value(out)]
        if isinstance(out, (tuple, list)):
            return [n for v in out for n in self.outputs(v)]
        return []


_INPLACE_DUNDERS = {f"__i{op}__" for op in ("add", "sub", "mul", "div", "truediv", "floordiv", "mod", "pow",
                                             "matmul", "and", "or", "xor", "lshift", "rshift")}


def is_inplace(name: str) -> bool:
    short = name.rsplit(".", 1)[-1]
    return short == "__setitem__" or short in _INPLACE_DUNDERS or (short.endswith("_") and not short.endswith("__"))


def record_op(flow: Flow, name: str, args: Sequence[Any], kwargs: Dict[str, Any], out: Any) -> Dict[str, Any]:
    """The dataflow fields of one op record; an in-place op's target gets a fresh value."""
    rec: Dict[str, Any] = {"x": [flow.encode(a) for a in args],
                           "kw": {k: flow.encode(v) for k, v in kwargs.items() if not k.startswith("_")}}
    if is_inplace(name) and args and isinstance(args[0], Tensor):
        rec["inplace"] = True
        rec["y"] = [flow.new_value(args[0])]
    else:
        rec["y"] = flow.outputs(out)
        if not rec["y"] and out is not None:
            rec["result"] = flow.encode(out)  # a Python value (a host sync): later uses see a constant
    return rec


# --------------------------------------------------------------------------- generalize


def _skeleton(ops: Sequence[Dict[str, Any]]) -> List[Tuple[Any, ...]]:
    return [(r.get("op"), r.get("call"), len(r.get("x") or ()), tuple(sorted(r.get("kw") or ())),
             len(r.get("y") or ())) for r in ops]


class _Scope:
    """What an op may refer to: inputs and earlier values, with their shapes and dtypes on every probe."""

    def __init__(self, traces: Sequence[Dict[str, Any]], upto: int, weight_sizes: bool = False) -> None:
        self.traces = traces
        self.weight_sizes = weight_sizes
        base = traces[0]
        self.keys = [k for k in base["order"] if not k.startswith("v") or int(k[1:]) < upto]
        self.weights = [k for k in base["info"] if k.startswith("w:")]
        self._atoms: Optional[List[Tuple[Tuple[int, ...], Any]]] = None

    def canonical(self, t: int, key: str) -> str:
        return self.traces[t].get("aliases", {}).get(key, key)

    def info(self, t: int, key: str) -> Optional[Tuple[List[int], str]]:
        return self.traces[t]["info"].get(key)

    @staticmethod
    def ref(key: str) -> Dict[str, Any]:
        if key.startswith("v"):
            return {"v": int(key[1:])}
        kind, _, name = key.partition(":")
        return {kind: name}

    def atoms(self) -> List[Tuple[Tuple[int, ...], Any]]:
        """(sizes on every probe, expression) of every dimension in scope, first one of each pattern."""
        if self._atoms is None:
            seen: Dict[Tuple[int, ...], Any] = {}
            for key in self.keys + (self.weights if self.weight_sizes else []):
                shapes = [self.info(t, key) for t in range(len(self.traces))]
                if any(s is None or len(s[0]) != len(shapes[0][0]) for s in shapes):
                    continue
                for d in range(len(shapes[0][0])):
                    sizes = tuple(s[0][d] for s in shapes)
                    if len(set(sizes)) > 1 and sizes not in seen:
                        seen[sizes] = {"dim": [self.ref(key), d]}
            self._atoms = list(seen.items())
        return self._atoms

    def size_expr(self, vals: Sequence[int]) -> Optional[Any]:
        target = tuple(vals)
        atoms = self.atoms()
        for sizes, expr in atoms:
            if sizes == target:
                return expr
        for i, (a, ea) in enumerate(atoms):
            for b, eb in atoms[i:]:
                if tuple(x * y for x, y in zip(a, b)) == target:
                    return {"mul": [ea, eb]}
        for sizes, expr in atoms:
            ratio = {v // s if s and v % s == 0 else None for v, s in zip(target, sizes)}
            if len(ratio) == 1 and None not in ratio:
                return {"mul": [expr, ratio.pop()]}
        for sizes, expr in atoms:
            diff = {v - s for v, s in zip(target, sizes)}
            if len(diff) == 1:
                return {"add": [expr, diff.pop()]}
        for sizes, expr in atoms:  # a constant minus a size: max(0, c - seq) while seq <= c
            total = {v + s for v, s in zip(target, sizes)}
            if len(total) == 1 and min(target) >= 0:
                return {"rsub": [total.pop(), expr]}
        for sizes, expr in atoms:  # a size floor-divided by a constant (chunks, patches)
            for c in range(2, max(sizes) + 1):
                if all(s // c == v for v, s in zip(target, sizes)):
                    return {"floordiv": [expr, c]}
        return None

    def dtype_expr(self, vals: Sequence[str]) -> Optional[Any]:
        for key in self.keys + self.weights:
            infos = [self.info(t, key) for t in range(len(self.traces))]
            if all(i is not None and i[1] == v for i, v in zip(infos, vals)):
                return {"dtype_of": self.ref(key)}
        return None

    def finfo_expr(self, vals: Sequence[float]) -> Optional[Any]:
        for kind in ("min", "max"):
            for key in self.keys + self.weights:
                infos = [self.info(t, key) for t in range(len(self.traces))]
                try:
                    ok = all(i is not None and getattr(torch.finfo(getattr(torch, i[1])), kind) == v
                             for i, v in zip(infos, vals))
                except (TypeError, AttributeError):
                    ok = False
                if ok:
                    return {f"finfo_{kind}": self.ref(key)}
        return None

    def device_expr(self) -> Optional[Any]:
        keys = self.keys + self.weights
        return {"device_of": self.ref(keys[0])} if keys else None


def _is_ref(v: Any) -> bool:
    return isinstance(v, dict) and len(v) == 1 and next(iter(v)) in ("v", "in", "w")


def _unify(vals: List[Any], scope: _Scope, errors: List[str]) -> Any:
    first = vals[0]
    if all(_is_ref(v) for v in vals) and any(v != first for v in vals):
        # x.float() is x itself on a float32 probe: a later read of x shows as that op's value
        # there and as x on a bfloat16 probe; a reference that is right on every probe will do
        canon = [scope.canonical(t, _key(v)) for t, v in enumerate(vals)]
        for cand in vals:
            if all(scope.canonical(t, _key(cand)) == c for t, c in enumerate(canon)):
                return cand
    if isinstance(first, dict) and "device" in first and all(isinstance(v, dict) and "device" in v for v in vals):
        return scope.device_expr() or first
    if all(v == first and type(v) is type(first) for v in vals):
        return first
    if all(isinstance(v, int) and not isinstance(v, bool) for v in vals):
        expr = scope.size_expr(vals)
        if expr is None:
            errors.append(f"an int that took the values {vals} matches no size of the tensors in scope")
            return {"varies": vals}
        return expr
    nums = [float(v["float"]) if isinstance(v, dict) and set(v) == {"float"} else v for v in vals]
    if all(isinstance(v, float) for v in nums):
        expr = scope.finfo_expr(nums)
        if expr is None:
            errors.append(f"a float that took the values {vals} is no dtype's finfo limit")
            return {"varies": vals}
        return expr
    if all(isinstance(v, dict) for v in vals) and all(v.keys() == first.keys() for v in vals):
        if "dtype" in first and len(first) == 1:
            expr = scope.dtype_expr([v["dtype"] for v in vals])
            if expr is None:
                errors.append(f"a dtype that took the values {[v['dtype'] for v in vals]} follows no tensor")
                return {"varies": vals}
            return expr
        if "const" in first:
            if any(v["shape"] != first["shape"] for v in vals):
                errors.append("a constant tensor changed shape between probes")
                return {"varies": [v["shape"] for v in vals]}
            if all(v["dtype"] == first["dtype"] for v in vals):
                if any(v["const"] != first["const"] for v in vals):
                    errors.append("a constant tensor changed value between probes")
                return first
            expr = scope.dtype_expr([v["dtype"] for v in vals])
            if expr is None:
                errors.append("a constant tensor's dtype follows no tensor")
            return dict(first, cast=expr) if expr else first
        for kind in ("tuple", "list", "slice"):
            if kind in first:
                if any(len(v[kind]) != len(first[kind]) for v in vals):
                    errors.append(f"a {kind} changed length between probes")
                    return {"varies": vals}
                return {kind: [_unify([v[kind][i] for v in vals], scope, errors) for i in range(len(first[kind]))]}
    errors.append(f"an argument changed between probes: {vals!r}"[:200])
    return {"varies": vals}


def _minus_one(rec: Dict[str, Any]) -> None:
    """view/reshape: one size nothing explains, and no -1 yet, becomes -1."""
    if rec.get("op") not in _VIEW_OPS:
        return
    sizes, first = rec["x"], 1  # view(x, a, b, c) ...
    if len(sizes) == 2 and isinstance(sizes[1], dict) and ("tuple" in sizes[1] or "list" in sizes[1]):
        sizes, first = next(iter(sizes[1].values())), 0  # ... or view(x, (a, b, c))
    varies = [i for i in range(first, len(sizes)) if isinstance(sizes[i], dict) and "varies" in sizes[i]]
    if len(varies) == 1 and -1 not in sizes[first:]:
        sizes[varies[0]] = -1


def _first_output(ops: Sequence[Dict[str, Any]], i: int, count: int) -> int:
    for rec in ops[i:]:
        if rec.get("y"):
            return rec["y"][0]
    return count


_CAST_METHODS = {"torch.Tensor.float": "float32", "torch.Tensor.double": "float64", "torch.Tensor.half": "float16",
                 "torch.Tensor.bfloat16": "bfloat16"}
_DTYPE_CASTS = ("torch.Tensor.to", "torch.Tensor.type")


def _renumber(value: Any, table: Dict[int, int]) -> Any:
    if isinstance(value, dict):
        if set(value) == {"v"}:
            return {"v": table[value["v"]]}
        return {k: _renumber(v, table) for k, v in value.items()}
    if isinstance(value, list):
        return [_renumber(v, table) for v in value]
    return value


def with_casts(trace: Dict[str, Any], other: Dict[str, Any]) -> Optional[Dict[str, Any]]:
    """`trace` (a probe that skipped a dtype-dependent cast: `if w.dtype == bfloat16: x = x.to(w.dtype)`
    on float32) rewritten with the ops of `other` (the bfloat16 probe that took it), numbered as in
    `other`: each op only `other` ran must be a cast of one tensor, and in `trace` it becomes the
    identity cast (to the dtype its input has there), which is what skipping it did. None when the
    traces differ in anything else."""
    import difflib

    a, b = trace["ops"], other["ops"]
    table: Dict[int, int] = {}
    new_ops: List[Dict[str, Any]] = []
    inserted: List[Tuple[Dict[str, Any], int]] = []
    matcher = difflib.SequenceMatcher(None, _skeleton(a), _skeleton(b), autojunk=False)
    for tag, i1, i2, j1, j2 in matcher.get_opcodes():
        if tag == "equal":
            for i, j in zip(range(i1, i2), range(j1, j2)):
                for x, y in zip(a[i].get("y") or [], b[j].get("y") or []):
                    table[x] = y
                new_ops.append(a[i])
        elif tag == "insert":
            for j in range(j1, j2):
                rec = b[j]
                xs = rec.get("x") or []
                if not (rec.get("op") in _CAST_METHODS or rec.get("op") in _DTYPE_CASTS) or \
                        len(rec.get("y") or []) != 1 or not xs or not _is_ref(xs[0]):
                    return None
                new_ops.append(rec)
                inserted.append((rec, len(new_ops) - 1))
        else:
            return None
    if len(table) != sum(len(r.get("y") or []) for r in a if "y" in r):
        return None
    back = {v: k for k, v in table.items()}
    out_ops = []
    info = {(f"v{table[int(k[1:])]}" if k.startswith("v") else k): v for k, v in trace["info"].items()
            if not k.startswith("v") or int(k[1:]) in table}
    aliases = {}
    for k, v in (trace.get("aliases") or {}).items():
        if k.startswith("v") and int(k[1:]) in table:
            aliases[f"v{table[int(k[1:])]}"] = f"v{table[int(v[1:])]}" if v.startswith("v") and int(v[1:]) in table else v
    casts = {id(rec) for rec, _ in inserted}
    for rec in new_ops:
        if id(rec) not in casts:
            rec = _renumber(rec, table)
            if "y" in rec:
                rec["y"] = [table[y] for y in rec["y"]]
            out_ops.append(rec)
            continue
        src = rec["x"][0]  # in `other`'s numbering, which is now this trace's
        key = _key(src) if not src.get("v") in back else f"v{src['v']}"
        shape_dtype = info.get(key)
        if shape_dtype is None:
            return None
        dtype = shape_dtype[1]
        if rec["op"] in _CAST_METHODS and _CAST_METHODS[rec["op"]] != dtype:
            return None  # x.bfloat16() is no identity on a float32 probe
        fixed = dict(rec)
        fixed["x"] = [src] + [{"dtype": dtype} if isinstance(v, dict) and set(v) == {"dtype"} else v
                              for v in rec["x"][1:]]
        fixed["kw"] = {k: ({"dtype": dtype} if isinstance(v, dict) and set(v) == {"dtype"} else v)
                       for k, v in (rec.get("kw") or {}).items()}
        y = rec["y"][0]
        info[f"v{y}"] = shape_dtype
        aliases[f"v{y}"] = aliases.get(key, key)
        out_ops.append(fixed)
    order = [k for k in trace["order"] if not k.startswith("v")] + [f"v{n}" for n in range(other["count"])]
    return dict(trace, ops=out_ops, info=info, aliases=aliases, order=order, count=other["count"],
                returns=_renumber(trace["returns"], table))


def _repeats(skel: Sequence[Any], start: int, length: int) -> int:
    """How many times skel[start:start + length] repeats back to back from `start`."""
    block, k = list(skel[start:start + length]), 0
    if len(block) < length or length < 1:
        return 0
    while list(skel[start + k * length:start + (k + 1) * length]) == block:
        k += 1
    return k


def _walk(values: Sequence[Any], fn: Any) -> Any:
    """fn(list of one argument across iterations) -> the rolled argument, recursing into lists and
    dicts that are not references; raises ValueError where the iterations do not line up."""
    first = values[0]
    if isinstance(first, dict) and not _is_ref(first) and "loopvar" not in first:
        if any(not isinstance(v, dict) or v.keys() != first.keys() for v in values):
            return fn(values)
        return {k: _walk([v[k] for v in values], fn) for k in first}
    if isinstance(first, list):
        if any(not isinstance(v, list) or len(v) != len(first) for v in values):
            raise ValueError("lists of other lengths")
        return [_walk([v[i] for v in values], fn) for i in range(len(first))]
    return fn(values)


def _rolled(trace: Dict[str, Any], start: int, length: int, k: int) -> Dict[str, Any]:
    """`trace` with its k repeats of ops[start:start + length] (one Python loop's steps) as one
    loop record followed by the first step's ops; raises ValueError when the steps are not one
    program: each step may read what the step before made (carried), the step's own values,
    and values from before the loop; ints that grow by one per step are the loop variable."""
    ops = trace["ops"]
    steps = [ops[start + i * length:start + (i + 1) * length] for i in range(k)]
    slot: Dict[int, Tuple[int, int, int]] = {}  # value -> (step, op in step, output)
    for i, step in enumerate(steps):
        for j, rec in enumerate(step):
            for o, y in enumerate(rec.get("y") or []):
                slot[y] = (i, j, o)
    first_y = {(j, o): y for (i, j, o), y in ((v, y) for y, v in slot.items()) if i == 0}
    carried: Dict[int, Any] = {}  # first step's value -> what it is before the loop

    def roll(at: int) -> Any:
        def fn(vals: List[Any]) -> Any:
            if all(v == vals[0] and type(v) is type(vals[0]) for v in vals) and not (
                    _is_ref(vals[0]) and "v" in vals[0] and vals[0]["v"] in slot):
                return vals[0]  # the same on every step: a weight, an input, a value from before
            if all(isinstance(v, int) and not isinstance(v, bool) for v in vals) and \
                    all(v == vals[0] + i for i, v in enumerate(vals)):
                return {"loopvar": vals[0]}
            if not all(_is_ref(v) and "v" in v for v in vals[1:]):
                raise ValueError(f"an argument changes between steps: {vals[:3]!r}"[:200])
            where = [slot.get(v["v"]) for v in vals[1:]]
            if any(w is None for w in where):
                raise ValueError("a step reads a value made after the loop")
            if all(w[0] == i for i, w in enumerate(where)) and len({w[1:] for w in where}) == 1 and \
                    _is_ref(vals[0]) and not ("v" in vals[0] and vals[0]["v"] in slot):
                if where[0][1] < at:
                    raise ValueError("a step reads the step before's value after remaking it")
                y = first_y[where[0][1:]]
                if carried.setdefault(y, vals[0]) != vals[0]:
                    raise ValueError("one carried value starts from two values")
                return {"v": y}  # what the step before made (before the loop: its start value)
            own = [slot.get(v["v"]) if "v" in v else None for v in vals]
            if all(w is not None and w[0] == i for i, w in enumerate(own)) and len({w[1:] for w in own}) == 1:
                return {"v": first_y[own[0][1:]]}  # this step's own value
            raise ValueError("a step reads values of other steps")
        return fn

    body = []
    for j, rec in enumerate(steps[0]):
        recs = [step[j] for step in steps]
        new = dict(rec)
        if "x" in rec:
            new["x"] = _walk([r["x"] for r in recs], roll(j))
        if "kw" in rec:
            new["kw"] = _walk([r["kw"] for r in recs], roll(j))
        body.append(new)
    last = {y: first_y[(j, o)] for y, (i, j, o) in slot.items() if i == k - 1}

    def after(value: Any) -> Any:
        if isinstance(value, dict):
            if set(value) == {"v"} and value["v"] in slot:
                if value["v"] not in last:
                    raise ValueError("code after the loop reads a value of an earlier step")
                return {"v": last[value["v"]]}
            return {key: after(v) for key, v in value.items()}
        if isinstance(value, list):
            return [after(v) for v in value]
        return value

    suffix = [dict(r, x=after(r.get("x")), kw=after(r.get("kw"))) if "x" in r else r
              for r in ops[start + k * length:]]
    loop = {"loop": len(body), "x": [k], "carried": [[{"v": y}, init] for y, init in sorted(carried.items())]}
    out = dict(trace, ops=list(ops[:start]) + [loop] + body + suffix, returns=after(trace["returns"]))
    return _canonical(out)


def _canonical(trace: Dict[str, Any]) -> Dict[str, Any]:
    """Values renumbered 0, 1, ... in the order ops make them (rolled traces of several probes then
    name their values alike)."""
    table: Dict[int, int] = {}
    for rec in trace["ops"]:
        for y in rec.get("y") or []:
            table[y] = len(table)
    ops = []
    for rec in trace["ops"]:
        rec = _renumber(rec, table)
        if "y" in rec:
            rec["y"] = [table[y] for y in rec["y"]]
        ops.append(rec)
    info = {(f"v{table[int(k[1:])]}" if k.startswith("v") else k): v for k, v in trace["info"].items()
            if not k.startswith("v") or int(k[1:]) in table}
    aliases = {f"v{table[int(k[1:])]}": (f"v{table[int(v[1:])]}" if v.startswith("v") else v)
               for k, v in (trace.get("aliases") or {}).items()
               if int(k[1:]) in table and (not v.startswith("v") or int(v[1:]) in table)}
    order = [k for k in trace["order"] if not k.startswith("v")] + [f"v{n}" for n in range(len(table))]
    return dict(trace, ops=ops, info=info, aliases=aliases, order=order, count=len(table),
                returns=_renumber(trace["returns"], table))


def roll_time_loop(traces: Sequence[Dict[str, Any]]) -> Optional[List[Dict[str, Any]]]:
    """Traces of probes that differ only in how many times one block of ops repeats (a Python
    loop over time steps), each with that block rolled into a loop record (`{"loop": n_ops, "x":
    [steps], "carried": [[value, start], ...]}` before the first step's ops); None when no such
    block explains them or its steps are not one program."""
    skels = [_skeleton(t["ops"]) for t in traces]
    longest = max(range(len(traces)), key=lambda i: len(skels[i]))
    s = skels[longest]
    if len(s) > 4000:  # (the search is cubic in the ops)
        return None
    for start in range(len(s)):
        for length in range(1, (len(s) - start) // 2 + 1):
            k = _repeats(s, start, length)
            if k < 2:
                continue
            tail = s[start + k * length:]
            counts = []
            for sk in skels:
                m = _repeats(sk, start, length) if sk[:start] == s[:start] else 0
                if m < 2 or sk[start + m * length:] != tail:  # (two steps to tell what is carried)
                    break
                counts.append(m)
            if len(counts) != len(traces) or len(set(counts)) < 2:
                continue
            try:
                return [_rolled(t, start, length, m) for t, m in zip(traces, counts)]
            except (ValueError, KeyError):
                continue
    return None


def generalize(traces: Sequence[Dict[str, Any]], weight_sizes: bool = False) -> Dict[str, Any]:
    """The module's ops with probe-dependent numbers replaced by expressions (see the module doc).

    `traces` are the same module's call on several probes (the one the pack shows first), each
    {"ops", "info", "order", "count", "aliases", "returns", "return_names", "inputs"}. Returns
    {"ops", "returns", "return_names", "inputs", "dataflow"}: `dataflow` is "general"
    when every difference was explained, else why not. With `weight_sizes` a number may also
    be a weight's size: the traces are then instances of one class (module paths), not probes.
    """
    longest = max(traces, key=lambda t: len(t["ops"]))
    if any(_skeleton(t["ops"]) != _skeleton(longest["ops"]) for t in traces):  # a dtype-dependent cast?
        fixed = [t if _skeleton(t["ops"]) == _skeleton(longest["ops"]) else with_casts(t, longest) for t in traces]
        if all(t is not None for t in fixed):
            traces = fixed  # type: ignore[assignment]
        elif not weight_sizes:
            rolled = roll_time_loop(traces)
            if rolled is not None:
                traces = rolled
    base = traces[0]
    usable = [t for t in traces[1:] if _skeleton(t["ops"]) == _skeleton(base["ops"])
              and len(t["returns"] or ()) == len(base["returns"] or ())]
    all_t = [base] + usable
    errors: List[str] = []
    ops = []
    for i, rec in enumerate(base["ops"]):
        recs = [t["ops"][i] for t in all_t]
        new = dict(rec)
        if "x" in rec:
            scope = _Scope(all_t, _first_output(base["ops"], i, base["count"]), weight_sizes)
            op_errors: List[str] = []
            if isinstance(rec["x"], dict):  # a child call's inputs by name
                new["x"] = {k: _unify([r["x"][k] for r in recs], scope, op_errors) for k in rec["x"]}
            else:
                new["x"] = [_unify([r["x"][j] for r in recs], scope, op_errors) for j in range(len(rec["x"]))]
            if "kw" in rec:
                new["kw"] = {k: _unify([r["kw"][k] for r in recs], scope, op_errors) for k in rec["kw"]}
            if op_errors and "op" in new:
                _minus_one(new)
                if "varies" not in repr(new["x"]) + repr(new.get("kw")):
                    op_errors = []
            reads = [f"{r['op']} at op {j}" for j, r in enumerate(base["ops"][:i]) if "result" in r and r.get("op")]
            if op_errors and reads:  # (an MoE's per-expert counts from .tolist(), handed to split)
                op_errors[-1] += (f"; the model read tensor values into Python before it ({reads[-1]}): an int "
                                  "that follows the data, not a shape, which no program with fixed ops can hold")
            errors += [f"op {i} ({rec.get('op') or rec.get('call')}): {e}" for e in op_errors]
        ops.append(new)
    scope = _Scope(all_t, base["count"], weight_sizes)
    returns = None
    if base["returns"] is not None:
        returns = [_unify([t["returns"][j] for t in all_t], scope, errors) for j in range(len(base["returns"]))]
    if len(usable) < len(traces) - 1:
        status = (f"the ops differed on {len(traces) - 1 - len(usable)} of {len(traces) - 1} other probes: "
                  "sizes and dtypes that vary may be written as the first traced probe's numbers")
    elif not usable:
        status = "traced on one probe only: sizes and dtypes that vary may be written as its numbers"
    elif errors:
        status = "; ".join(errors[:3]) + (f" (and {len(errors) - 3} more)" if len(errors) > 3 else "")
    else:
        status = "general"
    return {"ops": ops, "returns": returns, "return_names": base["return_names"], "inputs": base["inputs"],
            "dataflow": status}
