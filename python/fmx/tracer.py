"""fmx.tracer — the automatic extractor: flat functional code from the tools alone, no LLM.

A baseline policy. It plays one episode through the server's tools:

1. `trace_ops` on the task's module and, depth first, on every child it calls
   (a ModuleList's items after the first are not read: they share its code);
   the exporter's op trace carries dataflow, with sizes, dtypes and devices
   written as expressions of the inputs (docs/pack-format.md, "Op traces");
2. `get_weight_info` once: the weights' shapes (instances of a class that
   differ only in sizes share one helper) and a check that every weight the
   entry reads exists;
3. writes one function per distinct module body: each op becomes a line of
   TorchScript-compatible Python, weights looked up by name relative to the
   module (`weights[prefix + "q_proj.weight"]`), single-op children (Linear,
   activations) inlined at their call, ops that only copy or are no-ops in
   eval dropped, values used once folded into their user, and a run of
   ModuleList calls that threads one value through (layers.0, layers.1, ...)
   rolled into `for i in range(N)`, values nothing reads left out;
4. `verify_component` on each helper's first instance (bottom up) and on the
   whole task, then `submit` — as far as the step budget goes (the submit
   always fits; what cannot be written is submitted as an empty function
   whose first comment says why).

    python3 -m fmx.tracer --connect ipc:///tmp/fmx.sock --task qwen2 [--print]
    fmx trace packs/qwen2 [--component model.layers.0.mlp] -o flat.py --verify

With --connect it prints one JSON line per episode (task, reward,
correctness, loc, steps) and, with --print, the code it wrote. With --pack
(`fmx trace PACK`) it needs no server: it reads the traces from the pack's
task.json, writes the code, and with --verify runs `fmx verify` on it.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

try:  # the server's client; --pack needs neither zmq nor msgpack
    from .client import Client, FmxError
except ImportError:  # pragma: no cover - a machine without python3-zmq
    Client = None  # type: ignore[assignment,misc]

    class FmxError(Exception):  # type: ignore[no-redef]
        pass

POLICY = "tracer"
_LAYER = re.compile(r"^(.*?)(\d+)$")
_NUMBER = re.compile(r"^-?[0-9.e+-]+$")
_IDENT = re.compile(r"^[A-Za-z_][A-Za-z_0-9]*$")
_ATOM = re.compile(r"^[A-Za-z_][A-Za-z_0-9.]*(\[[^\[\]]*\]|\([^()]*\))*$")
_INFIX = {"add": "+", "sub": "-", "mul": "*", "div": "/", "truediv": "/", "matmul": "@", "pow": "**",
          "floordiv": "//", "mod": "%", "and": "&", "or": "|", "xor": "^", "lt": "<", "le": "<=", "gt": ">",
          "ge": ">=", "eq": "==", "ne": "!="}
# keyword arguments left out at their default (every F function that takes them has these defaults)
_DEFAULTS = {"inplace": False, "padding_idx": None, "max_norm": None, "norm_type": {"float": "2.0"},
             "scale_grad_by_freq": False, "sparse": False}
_CASTS = {"bool": "bool", "long": "int64", "int": "int32", "half": "float16", "double": "float64",
          "bfloat16": "bfloat16", "byte": "uint8", "char": "int8", "short": "int16"}
_INFIX_METHODS = ("add", "sub", "mul", "div", "matmul", "pow")
_SIZE_ARGS = ("view", "reshape", "expand", "permute", "repeat", "tile", "new_zeros", "new_ones", "new_empty")
_IDENTITY = ("torch.Tensor.clone", "torch.Tensor.detach")  # (contiguous is kept: a view may need it)


_NO_DATAFLOW = "the pack's op traces have no dataflow (made by an older fmx export): export it again"


class TracerError(Exception):
    """What the trace does not allow the tracer to write (an unsupported op or an unexplained size)."""


# --------------------------------------------------------------------------- code model


class Stmt:
    """One line of a function body: `target = expr` (target None: a `return`), or a rolled loop."""

    def __init__(self, target: Optional[str], expr: str, atom: bool, loop: Optional[Tuple[str, str]] = None,
                 block: Optional[List["Stmt"]] = None):
        self.target, self.expr, self.atom, self.loop = target, expr, atom, loop  # loop: (range's bounds, var)
        self.block = block  # a loop over time steps: its lines (expr then holds their text, for readers)


class Body:
    """A function body under construction: values -> expressions, and its lines."""

    def __init__(self, prefix: str, inputs: Dict[str, str]) -> None:
        self.prefix = prefix  # code for the weight-key prefix ("prefix + " in helpers, "" in the entry)
        self.env: Dict[str, Tuple[str, bool]] = {}  # value key -> (expression, is atom)
        self.stmts: List[Stmt] = []
        self.used_inputs: List[str] = []
        self.inputs = inputs  # input leaf -> parameter name
        self.uses_weights = False
        self.count = 0
        self.fixed: Dict[str, str] = {}  # value key -> the name it must have (a loop's carried values)
        self.step = "t" if "t" not in inputs.values() else "t_"  # a loop over time steps' variable

    def weight(self, rel: str) -> str:
        self.uses_weights = True
        return f"weights[{self.prefix}{json.dumps(rel)}]"

    def assign(self, keys: Sequence[str], expr: str, atom: bool) -> str:
        """A line `names = expr`, a fresh name for each value key; returns the target text."""
        names = []
        for key in keys:
            if key in self.fixed:
                names.append(self.fixed[key])
            else:
                names.append(f"v{self.count}")
                self.count += 1
            self.env[key] = (names[-1], True)
        target = ", ".join(names)
        self.stmts.append(Stmt(target, expr, atom if len(names) == 1 else True))
        return target


def _snake(name: str) -> str:
    name = re.sub(r"[^A-Za-z0-9]", "_", name.rsplit(".", 1)[-1])
    # Qwen2RMSNorm -> qwen2_rms_norm, NewGELUActivation -> new_gelu_activation, Conv1D -> conv1d
    name = re.sub(r"(?<=[a-z])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])|(?<=[0-9])(?=[A-Z][A-Za-z])", "_", name)
    name = name.lower().strip("_")
    return name if _IDENT.match(name) and name not in ("forward", "tap") else f"m_{name}"


def _paren(expr: str, atom: bool) -> str:
    return expr if atom else f"({expr})"


class Writer:
    """Writes the program for one task from the traces (module path -> trace_ops data)."""

    def __init__(self, traces: Dict[str, Dict[str, Any]]) -> None:
        self.traces = traces
        self.helpers: Dict[str, str] = {}   # function name -> its source
        self.params: Dict[str, List[str]] = {}  # function name -> its parameters ("x: Tensor", ...)
        self.by_body: Dict[str, str] = {}   # body text -> function name
        self.instance: Dict[str, str] = {}  # function name -> the module path it was written from
        self.order: List[str] = []          # helpers, callees first

    # -- values
    def arg(self, value: Any, body: Body, ctx: "Ctx") -> Tuple[str, bool]:
        """(code, is atom) of one encoded argument."""
        if value is None or isinstance(value, bool):
            return repr(value), True
        if isinstance(value, (int, float)):
            return repr(value), value >= 0
        if isinstance(value, str):
            return json.dumps(value), True
        if not isinstance(value, dict):
            raise TracerError(f"cannot write the argument {value!r}")
        if "v" in value or "in" in value or "w" in value:
            return ctx.ref(value, body)
        if "float" in value:
            text = value["float"]
            return (text, not text.startswith("-")) if _NUMBER.match(text) else (f'float("{text}")', True)
        if "dtype" in value and len(value) == 1:
            return f"torch.{value['dtype']}", True
        if "dtype_of" in value:
            return f"{_paren(*ctx.ref(value['dtype_of'], body))}.dtype", True
        if "device_of" in value:
            return f"{_paren(*ctx.ref(value['device_of'], body))}.device", True
        if "device" in value:
            return f'torch.device("{value["device"]}")', True
        for kind in ("min", "max"):
            if f"finfo_{kind}" in value:
                return f"torch.finfo({_paren(*ctx.ref(value[f'finfo_{kind}'], body))}.dtype).{kind}", True
        if "dim" in value:
            ref, d = value["dim"]
            return f"{_paren(*ctx.ref(ref, body))}.size({d})", True
        if "mul" in value:
            a, b = (self.arg(v, body, ctx) for v in value["mul"])
            return f"{_paren(*a)} * {_paren(*b)}", False
        if "add" in value:
            a, c = self.arg(value["add"][0], body, ctx), value["add"][1]
            return f"{_paren(*a)} {'+' if c >= 0 else '-'} {abs(c)}", False
        if "loopvar" in value:  # the step of a loop over time steps, plus a constant
            c = value["loopvar"]
            return (body.step if c == 0 else f"{body.step} + {c}"), c == 0
        if "rsub" in value:
            c, a = value["rsub"][0], self.arg(value["rsub"][1], body, ctx)
            return f"{c} - {_paren(*a)}", False
        if "floordiv" in value:
            a, c = self.arg(value["floordiv"][0], body, ctx), value["floordiv"][1]
            return f"{_paren(*a)} // {c}", False
        if "tuple" in value or "list" in value:
            items = [self.arg(v, body, ctx)[0] for v in (value.get("tuple") or value.get("list") or [])]
            return "[" + ", ".join(items) + "]", True
        if "slice" in value:
            a, b, c = (("" if v is None else self.arg(v, body, ctx)[0]) for v in value["slice"])
            return (f"{a}:{b}" if c == "" else f"{a}:{b}:{c}"), True
        if "ellipsis" in value:
            return "...", True
        if "const" in value:
            if value.get("weight"):
                raise TracerError(f"a constant tensor holds the values of the weight {value['weight']!r}: the "
                                  "trace did not see how the model read it (an fmx exporter bug); weights are "
                                  "never written into the code")
            device = ctx.any_tensor(body)
            code = f"torch.tensor({value['const']!r}, dtype=torch.{value['dtype']}"
            code += f", device={device}.device)" if device else ")"
            if value.get("cast"):
                code += f".to({self.arg(value['cast'], body, ctx)[0]})"
            return code, True
        if "varies" in value:
            why = (self.traces.get(ctx.path) or {}).get("dataflow") or ""
            raise TracerError(f"a size or dtype the trace could not explain (values {value['varies']})"
                              + (f": {ctx.path or '(root)'}: {why}"[:600] if "follows the data" in why else ""))
        raise TracerError(f"cannot write the argument {value!r}"[:200])

    # -- ops
    def op(self, rec: Dict[str, Any], body: Body, ctx: "Ctx") -> None:
        name: str = rec["op"]
        xs: List[Any] = list(rec.get("x") or [])
        kw: Dict[str, Any] = dict(rec.get("kw") or {})
        ys: List[int] = rec.get("y") or []
        if not ys:
            if name.endswith("__setitem__"):
                raise TracerError("__setitem__ without a target")
            return  # a host read (item, tolist) or a no-op: later uses carry its value as a constant
        short = name.rsplit(".", 1)[-1]
        is_method = name.startswith("torch.Tensor.")
        if rec.get("inplace"):
            if short == "__setitem__":
                return self._setitem(rec, body, ctx)
            short = short[3:-2] if short.startswith("__i") else short[:-1]
            name = "torch.Tensor." + short
        if self._identity(name, short, xs, kw):
            ctx.alias(f"v{ys[0]}", xs[0], body)
            return
        code, atom = self._call(name, short, is_method, xs, kw, body, ctx)
        body.assign([ctx.key(f"v{y}") for y in ys], code, atom)

    @staticmethod
    def _identity(name: str, short: str, xs: List[Any], kw: Dict[str, Any]) -> bool:
        if name in _IDENTITY:
            return True
        if name == "torch.nn.functional.dropout":
            training = kw.get("training", xs[2] if len(xs) > 2 else True)
            p = kw.get("p", xs[1] if len(xs) > 1 else 0.5)
            return training is False or p == 0.0
        if short == "__getitem__" and len(xs) == 2 and isinstance(xs[1], dict) and "tuple" in xs[1]:
            return all(isinstance(s, dict) and "slice" in s and s["slice"][0] in (None, 0)
                       and s["slice"][1] is None and s["slice"][2] in (None, 1) for s in xs[1]["tuple"])
        return False

    def _call(self, name: str, short: str, is_method: bool, xs: List[Any], kw: Dict[str, Any], body: Body,
              ctx: "Ctx") -> Tuple[str, bool]:
        if name == "torch.nn.functional.linear" and len(xs) == 3 and xs[2] is None:
            xs = xs[:2]
        args = [self.arg(x, body, ctx) for x in xs]
        kws = [f"{k}={self.arg(v, body, ctx)[0]}" for k, v in kw.items()
               if not (k in _DEFAULTS and _DEFAULTS[k] == v)]
        if is_method:
            if not args:
                raise TracerError(f"{name} without a tensor")
            this = _paren(*args[0])
            rest = args[1:]
            if short == "__getitem__":
                index = xs[1]
                parts = ([self.arg(v, body, ctx)[0] for v in index["tuple"]]
                         if isinstance(index, dict) and "tuple" in index else [rest[0][0]])
                return f"{this}[{', '.join(parts) or '()'}]", True
            dunder = short.startswith("__") and short.endswith("__")
            core = short[2:-2] if dunder else short
            rev = dunder and core.startswith("r") and core[1:] in _INFIX
            if dunder and core in ("neg", "invert"):
                return f"{'-' if core == 'neg' else '~'}{this}", False
            if (dunder and (core in _INFIX or rev)) and len(rest) == 1 and not kws:
                sym = _INFIX[core[1:] if rev else core]
                a, b = (rest[0], args[0]) if rev else (args[0], rest[0])
                return f"{_paren(*a)} {sym} {_paren(*b)}", False
            if dunder:
                raise TracerError(f"cannot write {name}")
            if short in _CASTS and not rest and not kws:  # (TorchScript 1.13 lacks Tensor.bool() & co.)
                return f"{this}.to(torch.{_CASTS[short]})", True
            if short in _INFIX_METHODS and len(rest) == 1 and not kws:
                return f"{_paren(*args[0])} {_INFIX[short]} {_paren(*rest[0])}", False
            if short in _SIZE_ARGS and len(rest) > 1 and all(
                    isinstance(x, int) or (isinstance(x, dict) and not ({"tuple", "list", "v", "in", "w"} & x.keys()))
                    for x in xs[1:]):
                rest = [("[" + ", ".join(a for a, _ in rest) + "]", True)]
            return f"{this}.{short}({', '.join([a for a, _ in rest] + kws)})", True
        if name.startswith("torch.nn.functional."):
            fn = "F." + name[len("torch.nn.functional."):]
        elif name.startswith("torch.") and name.count(".") == 1:
            fn = name
        elif name.startswith(("torch.linalg.", "torch.special.", "torch.fft.")):
            fn = name
        else:
            raise TracerError(f"cannot write {name}")
        return f"{fn}({', '.join([a for a, _ in args] + kws)})", True

    def _setitem(self, rec: Dict[str, Any], body: Body, ctx: "Ctx") -> None:
        """x[:, a:b] = y without mutation: cat((x[:, :a], y, x[:, b:]), dim) on the one sliced dim
        (torch.slice_scatter would do, but torch 1.13's Python binding of it is broken)."""
        target, index, value = rec["x"]
        parts = index["tuple"] if isinstance(index, dict) and "tuple" in index else [index]
        if not all(isinstance(p, dict) and "slice" in p for p in parts):
            raise TracerError("cannot write an item assignment that is not one sliced dimension")
        sliced = [(d, p["slice"]) for d, p in enumerate(parts) if p["slice"] != [None, None, None]]
        if len(sliced) != 1 or sliced[0][1][2] not in (None, 1):
            raise TracerError("cannot write an item assignment that is not one sliced dimension")
        d, (start, end, _) = sliced[0]
        this = _paren(*self.arg(target, body, ctx))
        a = None if start in (None, 0) else self.arg(start, body, ctx)[0]
        b = None if end is None else self.arg(end, body, ctx)[0]
        lead = ":, " * d
        src = self.arg(value, body, ctx)
        shapes = rec.get("in") or []
        if not (isinstance(value, dict) and ({"v", "in", "w"} & value.keys())):
            src = (f"torch.full_like({this}[{lead}{a or ''}:{b or ''}], {src[0]})", True)
        elif len(shapes) > 1 and (len(shapes[1]) != len(shapes[0]) or any(
                x != y for i, (x, y) in enumerate(zip(shapes[0], shapes[1])) if i != d)):
            src = (f"{_paren(*src)}.expand_as({this}[{lead}{a or ''}:{b or ''}])", True)
        pieces = ([f"{this}[{lead}:{a}]"] if a else []) + [src[0]] + ([f"{this}[{lead}{b}:]"] if b else [])
        code = f"torch.cat([{', '.join(pieces)}], dim={d})" if len(pieces) > 1 else src[0]
        body.assign([ctx.key(f"v{rec['y'][0]}")], code, True)

    # -- modules
    def function(self, path: str, entry: Optional[str] = None) -> str:
        """The name of the function written for the module at `path` (written now if new)."""
        trace = self.traces[path]
        flow = trace.get("dataflow") or ""
        if flow.startswith(("the ops differed", "traced on one probe")):  # one probe's program, not the module's
            raise TracerError(f"{path or '(root)'}: {flow.split(':')[0]}: the module runs other ops on other "
                              "probes (a branch on a size, a loop whose steps are not one program), which "
                              "one program cannot be written from")
        inputs = {leaf: _param(leaf) for leaf in trace.get("inputs") or []}
        body = Body("prefix + " if entry is None else "", inputs)
        ctx = Ctx(self, path, "", None)
        self.emit_ops(trace, path, body, ctx)
        returns = [ctx.ref(r, body) for r in trace.get("returns") or []]
        if not returns:
            raise TracerError(f"{path or '(root)'} returns no tensor")
        ret = ", ".join(code for code, _ in returns)
        body.stmts.append(Stmt(None, ret, True))
        _fold(body)
        params = [f"{inputs[leaf]}: Tensor" for leaf in trace.get("inputs") or [] if leaf in body.used_inputs]
        if body.uses_weights:
            params.append("weights: Dict[str, Tensor]")
        if entry is None and body.uses_weights:  # (the weights' keys are relative to the caller's)
            params.append('prefix: str = ""')
        out_type = "Tensor" if len(returns) == 1 else "Tuple[" + ", ".join(["Tensor"] * len(returns)) + "]"
        lines = _render(body)
        text = "\n".join(lines)
        if entry is None and text in self.by_body and self.params[self.by_body[text]] == params:
            return self.by_body[text]
        base = entry or _snake(trace.get("class") or path)
        name = base
        n = 2
        while name in self.helpers:
            name, n = f"{base}_{n}", n + 1
        head = f"def {name}({', '.join(params)}) -> {out_type}:"
        self.helpers[name] = head + "\n" + text
        self.params[name] = params
        self.instance[name] = path
        if entry is None:
            self.by_body[text] = name
        self.order.append(name)
        return name

    def emit_ops(self, trace: Dict[str, Any], path: str, body: Body, ctx: "Ctx") -> None:
        ops = trace.get("ops") or []
        i = 0
        while i < len(ops):
            rec = ops[i]
            if "loop" in rec:
                self._time_loop(rec, ops[i + 1:i + 1 + rec["loop"]], path, body, ctx)
                i += 1 + rec["loop"]
                continue
            if "call" in rec:
                run = _layer_run(ops, i)
                if run > 1:
                    self._loop(ops[i:i + run], path, body, ctx)
                    i += run
                    continue
                self.call(rec, path, body, ctx)
            else:
                self.op(rec, body, ctx)
            i += 1

    def call(self, rec: Dict[str, Any], path: str, body: Body, ctx: "Ctx",
             prefix_code: Optional[str] = None) -> Optional[str]:
        """Writes a child module's call (inlined when it is one op); returns the call's code when
        `prefix_code` is given (a loop's body) instead of adding the line."""
        child = rec["call"]
        trace = self.traces.get(child)
        if trace is None:
            raise TracerError(f"no trace of {child}")
        rel = rec.get("as") or (child[len(path) + 1:] if path else child)
        ops = trace.get("ops") or []
        if len(ops) <= 1 and not any("call" in o for o in ops):  # a leaf: inline its op
            sub = Ctx(self, child, ctx.key_prefix + f"{rel}/", ctx, rec.get("x") or {}, rel)
            for op in ops:
                self.op(op, body, sub)
            for y, r in zip(rec.get("y") or [], trace.get("returns") or []):
                body.env[ctx.key(f"v{y}")] = sub.ref(r, body)
            return None
        name = self.function(child)
        params = self.params[name]
        args = []
        given = rec.get("x") or {}
        for leaf in trace.get("inputs") or []:
            if f"{_param(leaf)}: Tensor" in params:
                if not isinstance(given.get(leaf), dict):
                    raise TracerError(f"{child} is called without its input {leaf} ({given.get(leaf)!r})")
                args.append(self.arg(given[leaf], body, ctx)[0])
        if "weights: Dict[str, Tensor]" in params:
            body.uses_weights = True
            args.append("weights")
        key = prefix_code if prefix_code is not None else f"{body.prefix}{json.dumps(ctx.weight_rel + rel + '.')}"
        if 'prefix: str = ""' in params:
            args.append(key)
        code = f"{name}({', '.join(args)})"
        if prefix_code is not None:
            return code
        body.assign([ctx.key(f"v{y}") for y in rec.get("y") or []], code, True)
        return None

    def _time_loop(self, rec: Dict[str, Any], steps: Sequence[Dict[str, Any]], path: str, body: Body,
                   ctx: "Ctx") -> None:
        """`for t in range(T):` over one step's ops; each carried value starts from its value before
        the loop and keeps one name, which the step reads before it remakes it."""
        count = self.arg(rec["x"][0], body, ctx)[0]
        carried = [ctx.key(f"v{ref['v']}") for ref, _ in rec.get("carried") or []]
        for key, (_, init) in zip(carried, rec.get("carried") or []):
            body.fixed[key] = body.assign([key], self.arg(init, body, ctx)[0], True)
        outer, body.stmts = body.stmts, []
        for op in steps:
            if "call" in op:
                self.call(op, path, body, ctx)
            else:
                self.op(op, body, ctx)
        inner, body.stmts = body.stmts, outer
        for key in carried:
            del body.fixed[key]
        if any(s.loop or s.target is None for s in inner):
            raise TracerError(f"{path or '(root)'}: a loop inside a loop over time steps")
        body.stmts.append(Stmt("", f"{count}\n" + "\n".join(s.expr for s in inner), True, loop=(count, body.step),
                               block=inner))

    def _loop(self, run: Sequence[Dict[str, Any]], path: str, body: Body, ctx: "Ctx") -> None:
        first, last = run[0], run[-1]
        carried = _carried(run)
        m = _LAYER.match(first["call"])
        stem, start = m.group(1), int(m.group(2))  # type: ignore[union-attr]
        rel = (stem[len(path) + 1:] if path else stem)
        init = self.arg(first["x"][carried], body, ctx)[0]
        var = body.assign([ctx.key(f"v{last['y'][0]}")], init, True)
        rec = dict(first, x=dict(first["x"]))
        rec["x"][carried] = {"v": last["y"][0]}
        key = f"{body.prefix}{json.dumps(ctx.weight_rel + rel)} + str(i) + \".\""
        code = self.call(rec, path, body, ctx, prefix_code=key)
        bounds = str(len(run)) if start == 0 else f"{start}, {start + len(run)}"
        body.stmts.append(Stmt(var, code or "", True, loop=(bounds, "i")))


def _param(leaf: str) -> str:
    name = re.sub(r"[^A-Za-z0-9_]", "_", leaf)
    return name if _IDENT.match(name) and name not in ("weights", "prefix") else f"in_{name}"


def _layer_run(ops: Sequence[Dict[str, Any]], i: int) -> int:
    """How many calls from ops[i] on are consecutive items k, k+1, ... of one ModuleList that run
    one program (the exporter's `body`) and thread one value through."""
    m = _LAYER.match(ops[i]["call"])
    if not m or not m.group(1).endswith("."):
        return 1
    start, n = int(m.group(2)), 1
    while (i + n < len(ops) and "call" in ops[i + n] and ops[i + n]["call"] == f"{m.group(1)}{start + n}"
           and ops[i + n].get("body") == ops[i].get("body")):
        n += 1
    while n > 1 and _carried(ops[i:i + n]) is None:
        n -= 1
    return n


def _carried(run: Sequence[Dict[str, Any]]) -> Optional[str]:
    """The input each call takes from the one before (its only output); the rest must be the same."""
    carried = None
    for prev, rec in zip(run, run[1:]):
        if len(prev.get("y") or ()) != 1 or set(prev["x"]) != set(rec["x"]):
            return None
        diff = [k for k in rec["x"] if rec["x"][k] != prev["x"][k]]
        if len(diff) != 1 or rec["x"][diff[0]] != {"v": prev["y"][0]} or (carried and diff[0] != carried):
            return None
        carried = diff[0]
    if len(run[-1].get("y") or ()) != 1:
        return None
    return carried


class Ctx:
    """Where refs point while writing one module's ops into a body (a helper's, or inlined into a parent's)."""

    def __init__(self, writer: Writer, path: str, key_prefix: str, parent: Optional["Ctx"],
                 inputs: Optional[Dict[str, Any]] = None, rel: str = "") -> None:
        self.writer, self.path, self.key_prefix, self.parent = writer, path, key_prefix, parent
        self.call_inputs = inputs  # an inlined child's inputs, in the parent's refs
        self.weight_rel = (parent.weight_rel + rel + ".") if parent is not None else ""

    def key(self, k: str) -> str:
        return self.key_prefix + k

    def ref(self, ref: Dict[str, Any], body: Body) -> Tuple[str, bool]:
        if "w" in ref:
            name = self.weight_rel + ref["w"]
            return body.weight(name), True
        if "in" in ref:
            if self.call_inputs is not None:
                if ref["in"] not in self.call_inputs:
                    raise TracerError(f"{self.path}: input {ref['in']} was not passed")
                return self.parent.writer.arg(self.call_inputs[ref["in"]], body, self.parent)  # type: ignore
            if ref["in"] not in body.used_inputs:
                body.used_inputs.append(ref["in"])
            return body.inputs[ref["in"]], True
        key = self.key(f"v{ref['v']}")
        if key not in body.env:
            raise TracerError(f"{self.path}: value v{ref['v']} used before it is made")
        return body.env[key]

    def alias(self, key: str, src: Any, body: Body) -> None:
        body.env[self.key(key)] = self.writer.arg(src, body, self)

    def any_tensor(self, body: Body) -> Optional[str]:
        """A tensor of the function being written (its first input), for a device."""
        top = self
        while top.parent is not None:
            top = top.parent
        for leaf in body.inputs:
            return top.ref({"in": leaf}, body)[0]
        return None


# --------------------------------------------------------------------------- folding and text


def _drop_unused(body: Body) -> None:
    """Drops lines whose values nothing reads (a model's own checks, like `mask.sum() == n`, whose
    result only steered Python): every line is a pure op, so nothing else is lost."""
    changed = True
    while changed:
        changed = False
        for i, s in enumerate(body.stmts):
            if s.target is None or s.loop:
                continue
            names = [n.strip() for n in s.target.split(",")]
            read = any(re.search(rf"\b{re.escape(n)}\b", t.expr) for t in body.stmts for n in names if t is not s)
            if not read:
                body.stmts.pop(i)
                changed = True
                break


def _fold(body: Body, width: int = 100) -> None:
    """Folds each value used exactly once (in a later line of the same scope) into that line."""
    _drop_unused(body)
    changed = True
    while changed:
        changed = False
        for i, s in enumerate(body.stmts):
            if s.target is None or "," in s.target or s.loop:
                continue
            pat = re.compile(rf"\b{re.escape(s.target)}\b")
            users = [j for j, t in enumerate(body.stmts) if j != i and pat.search(t.expr)]
            count = sum(len(pat.findall(body.stmts[j].expr)) for j in users)
            redefined = any(t.target == s.target for t in body.stmts[i + 1:])
            if count != 1 or redefined or users[0] < i:
                continue
            user = body.stmts[users[0]]
            if user.loop:
                continue
            new = s.expr if user.expr == s.target else pat.sub(lambda m: _paren(s.expr, s.atom or _alone(m)),
                                                               user.expr)
            if len(new) > width:
                continue
            user.expr = new
            body.stmts.pop(i)
            changed = True
            break


def _alone(m: "re.Match[str]") -> bool:
    """Whether a match is a whole argument or item: (x) f(a, x) [x] k=x, where no parentheses are needed."""
    text, a, b = m.string, m.start(), m.end()
    before = text[a - 1:a] in ("(", "[", "=") and text[a - 2:a] not in ("==", "<=", ">=", "!=") or text[a - 2:a] == ", "
    return before and text[b:b + 1] in (")", "]", ",")


def _render(body: Body) -> List[str]:
    lines = []
    for s in body.stmts:
        if s.target is None:
            lines.append(f"    return {s.expr}")
        elif s.block is not None:
            lines.append(f"    for {s.loop[1]} in range({s.loop[0]}):")  # type: ignore[index]
            lines += [f"        {b.target} = {b.expr}" for b in s.block]
        elif s.loop:
            lines.append(f"    for {s.loop[1]} in range({s.loop[0]}):")
            lines.append(f"        {s.target} = {s.expr}")
        else:
            lines.append(f"    {s.target} = {s.expr}")
    return lines


def _tensor_args(value: Any, out: List[Optional[str]]) -> List[Optional[str]]:
    """The tensor arguments of an encoded op argument, in the order the trace's `in` shapes list
    them: a reference's key, or None for a constant."""
    if isinstance(value, dict):
        if {"v", "in", "w"} & value.keys():
            kind = next(k for k in ("v", "in", "w") if k in value)
            out.append(f"v{value['v']}" if kind == "v" else f"{kind}:{value[kind]}")
        elif "const" in value or "unknown" in value:
            out.append(None)
        elif "tuple" in value or "list" in value:
            for v in value.get("tuple") or value.get("list") or []:
                _tensor_args(v, out)
    elif isinstance(value, list):
        for v in value:
            _tensor_args(v, out)
    return out


def _instance_view(trace: Dict[str, Any], path: str, weights: Dict[str, List[int]]) -> Dict[str, Any]:
    """One module's trace in dataflow.generalize's form, with the sizes its op records and the
    weight list show (dtypes are not needed to compare instances of one class)."""
    stem = f"{path}." if path else ""
    info: Dict[str, Tuple[List[int], str]] = {
        f"w:{name[len(stem):]}": (shape, "?") for name, shape in weights.items() if name.startswith(stem)}
    count = 0
    for rec in trace.get("ops") or []:
        if "op" in rec:
            keys = _tensor_args(rec.get("x"), []) + _tensor_args(list((rec.get("kw") or {}).values()), [])
            for key, shape in zip(keys, rec.get("in") or []):
                if key is not None:
                    info.setdefault(key, (shape, "?"))
            for y, shape in zip(rec.get("y") or [], rec.get("out") or []):
                info[f"v{y}"] = (shape, "?")
        count = max([count] + [y + 1 for y in rec.get("y") or []])
    order = [f"in:{n}" for n in trace.get("inputs") or []] + [f"v{i}" for i in range(count)]
    return {"ops": trace.get("ops") or [], "info": info, "order": order, "count": count, "aliases": {},
            "returns": trace.get("returns"), "return_names": trace.get("return_names"),
            "inputs": trace.get("inputs")}


def share_bodies(traces: Dict[str, Dict[str, Any]], weights: Dict[str, List[int]]) -> List[str]:
    """Instances of one class whose traces differ only in numbers that are sizes of their inputs or
    weights (GPT-2's Conv1D: 192, 64 or 256 outputs) get one trace, those numbers as expressions,
    so they share one helper. Returns the classes it did this for."""
    by_class: Dict[str, List[str]] = {}
    for path, t in traces.items():
        ops = t.get("ops") or []
        if len(ops) > 1 or any("call" in o for o in ops):
            by_class.setdefault(t.get("class") or "", []).append(path)
    shared = []
    for cls, paths in by_class.items():
        if len(paths) < 2 or all(traces[p].get("ops") == traces[paths[0]].get("ops") for p in paths):
            continue
        from .dataflow import generalize  # (imports torch: only when there is something to share)

        g = generalize([_instance_view(traces[p], p, weights) for p in paths], weight_sizes=True)
        if g["dataflow"] != "general":
            continue
        for p in paths:
            traces[p] = dict(traces[p], ops=g["ops"], returns=g["returns"])
        shared.append(cls)
    return shared


def program(root: str, traces: Dict[str, Dict[str, Any]], title: str,
            weights: Optional[Dict[str, List[int]]] = None) -> Tuple[str, Dict[str, str]]:
    """(source, {helper name: the module path it was verified on}) for the task's module.
    `weights` (absolute name -> shape) lets instances of a class that differ in sizes share a helper."""
    if weights:
        traces = dict(traces)
        share_bodies(traces, weights)
    w = Writer(traces)
    w.function(root, entry="forward")
    head = [f'"""{title}: written by fmx\'s tracer from the op trace."""', "import torch",
            "import torch.nn.functional as F", "from torch import Tensor", "from typing import Dict, Tuple"]
    parts = ["\n".join(head)] + [w.helpers[name] for name in w.order]
    helpers = {name: w.instance[name] for name in w.order if name != "forward"}
    return "\n\n\n".join(parts) + "\n", helpers


# --------------------------------------------------------------------------- the policy


class Episode:
    """One episode of the tracer on one task, through a Client."""

    def __init__(self, env: Client, task: str, seed: Optional[int] = None, policy: str = POLICY) -> None:
        self.env = env
        self.policy = policy
        self.task = task
        self.seed = seed
        self.steps = 0
        self.left = 1 << 30  # steps the episode has left (from reset's budget, then each step's info)
        self.log: List[str] = []

    def step(self, tool: str, **args: Any) -> Tuple[Dict[str, Any], float, bool, Dict[str, Any]]:
        obs, reward, terminated, truncated, info = self.env.step({"tool": tool, "args": args})
        self.steps += 1
        self.left = int(info.get("steps_left", self.left - 1))
        if truncated:
            raise TracerError("the episode's step budget ran out")
        return obs, reward, terminated, info

    def trace_all(self, root: str) -> Dict[str, Dict[str, Any]]:
        traces: Dict[str, Dict[str, Any]] = {}
        todo = [root]
        while todo:
            path = todo.pop(0)
            if path in traces:
                continue
            if self.left < 2:  # the submit must still fit
                raise TracerError(f"the step budget ran out after reading {len(traces)} module traces "
                                  f"({len(todo) + 1} left to read)")
            obs, *_ = self.step("trace_ops", path=path)
            data = obs.get("data") or {}
            if data.get("ops") is None:
                raise TracerError(f"{path or '(root)'} has no op trace")
            if data.get("dataflow") is None:
                raise TracerError(_NO_DATAFLOW)
            if data.get("dataflow") not in (None, "general"):
                self.log.append(f"{path}: {data['dataflow']}")
            traces[path] = data
            bodies: Dict[str, Any] = {}  # ModuleList stem -> the body of the item read
            for rec in data["ops"]:
                child = rec.get("call")
                if child is None:
                    continue
                m = _LAYER.match(child)
                if m and m.group(1).endswith("."):
                    seen = bodies.setdefault(m.group(1), {})
                    if m.group(2) != "0" and rec.get("body", "?") in seen:
                        continue  # an item that runs the same program as one read (the loop's body)
                    seen[rec.get("body", "?")] = child
                if child not in traces and child not in todo:
                    todo.append(child)
        return traces

    def play(self) -> Dict[str, Any]:
        obs, info = self.env.reset(task=self.task, seed=self.seed, policy=self.policy)
        self.left = int((info.get("budget") or {}).get("max_steps") or self.left)
        root = info["task"]["module"]
        result: Dict[str, Any] = {"task": self.task, "episode": info["episode"], "policy": self.policy}
        code = None
        try:
            if info["task"].get("kind") == "decode":
                raise TracerError(DECODE_REFUSAL)
            traces = self.trace_all(root)
            winfo = self.step("get_weight_info", path=root)[0] if self.left >= 3 else {}
            listed = (winfo.get("data") or {}).get("weights") or []
            names = {w["name"] for w in listed}
            stem = f"{root}." if root else ""
            shapes = {stem + w["name"]: w.get("shape") for w in listed if isinstance(w.get("shape"), list)}
            code, helpers = program(root, traces, f"{info['task']['class']} ({self.task})", shapes)
            missing = sorted(set(_entry_weights(code)) - names) if names else []
            if missing:
                self.log.append(f"weights the code reads but the module lacks: {missing[:5]}")
            verified = {}
            # each helper on its module, then the task, then the submit: what the budget allows
            if self.left >= len(helpers) + 2:
                for name, path in helpers.items():
                    vobs, *_ = self.step("verify_component", path=path, code=code, entry=name)
                    verified[name] = _passed(vobs)
            elif helpers:
                self.log.append("the step budget left no room to verify the helpers one by one")
            if self.left >= 2:
                vobs, *_ = self.step("verify_component", path=root, code=code, entry="forward")
                verified["forward"] = _passed(vobs)
            result["verified"] = verified
        except (TracerError, FmxError) as e:
            self.log.append(f"{type(e).__name__}: {e}")
        if code is None:  # nothing to offer: submit so the episode is graded (0), with the reason in the log
            why = " ".join(self.log[-1:] or ["no code"]).replace("\n", " ")[:300]
            code = f"# fmx tracer: no code written: {why}\ndef forward() -> None:\n    pass\n"
        obs, reward, terminated, info = self.step("submit", code=code)
        grade = info.get("grade") or {}
        result.update(reward=reward, correctness=grade.get("correctness"), loc=grade.get("loc"),
                      target_loc=grade.get("target_loc"), steps=self.steps, notes=self.log)
        result["code"] = code
        return result


DECODE_REFUSAL = ("the tracer cannot write a decode task's code: op traces are recorded on full-sequence "
                  "probes only, so they hold no KV-cache update; write the decode step by hand "
                  "(docs/pack-format.md, Generation)")


def _passed(obs: Dict[str, Any]) -> bool:
    data = obs.get("data") or {}
    return bool(data.get("graded")) and data.get("passed") == data.get("graded") and not data.get("error")


def _entry_weights(code: str) -> List[str]:
    """The weight keys `forward` reads by name (helpers' keys carry their caller's prefix)."""
    entry = code.split("def forward(", 1)[1] if "def forward(" in code else ""
    return re.findall(r'weights\["([^"]+)"\]', entry)


def pack_traces(pack: str) -> Tuple[Dict[str, Dict[str, Any]], Dict[str, Any]]:
    """Every traced module of a pack as trace_ops would return it, and the manifest."""
    try:
        with open(os.path.join(pack, "task.json"), encoding="utf-8") as f:
            manifest = json.load(f)
        modules = manifest["modules"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise TracerError(f"{pack}: not a task pack ({e})") from None
    if not any(m.get("dataflow") for m in modules):
        raise TracerError(f"{pack}: {_NO_DATAFLOW}")
    keys = ("path", "class", "ops", "inputs", "returns", "return_names", "dataflow")
    return {m["path"]: {k: m.get(k) for k in keys} for m in modules if m.get("ops") is not None}, manifest


def write_pack(pack: str, component: str = "") -> Tuple[str, List[str]]:
    """(code, warnings) for a module of a pack, from its traces alone (no server)."""
    traces, manifest = pack_traces(pack)
    if component not in traces:
        paths = [m["path"] for m in manifest["modules"]]
        raise TracerError(f"{pack} has no module {component!r}" if component not in paths else
                          f"{component or '(root)'} has no op trace: it was not called on the traced probe")
    cls = traces[component].get("class") or component
    from .safetensors import read_header

    header, _ = read_header(os.path.join(pack, "weights.safetensors"))
    shapes = {k: v["shape"] for k, v in header.items() if k != "__metadata__"}
    for alias, stored in ((manifest.get("weights") or {}).get("aliases") or {}).items():
        if stored in shapes:
            shapes[alias] = shapes[stored]
    code, _ = program(component, traces, f"{cls} ({os.path.basename(os.path.normpath(pack))}"
                      + (f", {component})" if component else ")"), shapes)
    warnings = [f"{path or '(root)'}: {t['dataflow']}" for path, t in traces.items()
                if t.get("dataflow") not in (None, "general") and (path == component or path.startswith(
                    component + "." if component else ""))]
    return code, warnings


def _offline(args: argparse.Namespace) -> int:
    """fmx trace PACK: write (and with --verify, check) a pack's module without a server."""
    if args.decode:
        print(f"fmx trace: {DECODE_REFUSAL}", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    print(f"fmx trace: writing {args.component or 'the whole model'} of {args.pack} from its op "
          "traces", file=sys.stderr, flush=True)
    try:
        code, warnings = write_pack(args.pack, args.component)
    except TracerError as e:
        print(f"fmx trace: {e}", file=sys.stderr)
        return 2
    except ImportError as e:  # FMX_PYTHON names an interpreter without torch
        print(f"fmx trace: {sys.executable} cannot import {e.name or 'a module'} ({e}); set FMX_PYTHON to a "
              "python3 with torch", file=sys.stderr)
        return 2
    except Exception as e:  # noqa: BLE001 - a bug of the tracer's: one line, exit 2
        if os.environ.get("FMX_DEBUG"):
            raise
        print(f"fmx trace: {type(e).__name__}: {e} (FMX_DEBUG=1 shows the traceback)".splitlines()[0][:400],
              file=sys.stderr)
        return 2
    for w in warnings:
        print(f"fmx trace: warning: {w}", file=sys.stderr)
    print(f"fmx trace: wrote {code.count(chr(10))} lines in {time.perf_counter() - t0:.1f} s"
          + (f" to {args.output}" if args.output else ""), file=sys.stderr, flush=True)
    if args.output:
        with open(args.output, "w", encoding="utf-8") as f:
            f.write(code)
    else:
        sys.stdout.write(code)
    if not args.verify:
        return 0
    fmx = os.environ.get("FMX_BIN", "fmx")
    cmd = [fmx, "verify", args.pack, args.output, "--probes", "all"]
    if args.component:
        cmd += ["--component", args.component]
    print("fmx trace: verifying it on every probe (fmx verify --probes all)", file=sys.stderr,
          flush=True)
    sys.stdout.flush()
    return subprocess.run(cmd, stdin=subprocess.DEVNULL).returncode


def main(argv: Optional[Sequence[str]] = None) -> int:
    prog = "fmx trace" if "--pack" in (sys.argv if argv is None else argv) else "python3 -m fmx.tracer"
    ap = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    ap.add_argument("--connect", help="play episodes on the server at this address (tcp://, ipc://)")
    ap.add_argument("--pack", help="no server: write the code for a pack's module from its task.json")
    ap.add_argument("--component", default="", help="with --pack: the module path (default: the whole model)")
    ap.add_argument("-o", "--output", help="with --pack: write the code here (default: standard output)")
    ap.add_argument("--verify", action="store_true", help="with --pack and -o: then fmx verify it on every probe")
    ap.add_argument("--decode", action="store_true", help="with --pack: the decode task (refused: see DECODE_REFUSAL)")
    ap.add_argument("--task", action="append", help="task id (repeat; default: every task)")
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--episodes", type=int, default=1, help="episodes per task")
    ap.add_argument("--policy", default=POLICY, help=f"policy name in the episode log (default {POLICY})")
    ap.add_argument("--print", action="store_true", help="print the code written for each task")
    ap.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for a reply")
    args = ap.parse_args(argv)
    if (args.connect is None) == (args.pack is None):
        ap.error("give --connect ADDR (play episodes) or --pack DIR (write a pack's code)")
    if args.pack is not None:
        if args.verify and not args.output:
            ap.error("--verify needs -o FILE")
        return _offline(args)
    status = 0
    try:
        with Client(args.connect, timeout=args.timeout) as env:
            tasks = args.task or [t["id"] for t in env.list_tasks()]
            for task in tasks:
                for _ in range(args.episodes):
                    res = Episode(env, task, args.seed, args.policy).play()
                    code = res.pop("code")
                    print(json.dumps(res), flush=True)
                    if args.print:
                        print(code, flush=True)
    except FmxError as e:
        print(f"fmx-tracer: {e}", file=sys.stderr)
        status = 2
    return status


if __name__ == "__main__":
    sys.exit(main())
