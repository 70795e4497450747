"""Mutants of a functional solution, made mechanically at the source level.

`fmx mutate PACK SOLUTION` asks this module for the mutants of a correct
solution, verifies each against every probe of the pack and reports which ones
the probes kill. Here only the mutants are made: Python's `ast` finds the
sites, and each mutant is the solution with one contiguous span of text
replaced, so it differs from the solution in exactly one place, keeps every
other line (and line number) as written, and is still valid Python.

Operators (one mutant per site and variant):

  constant     a numeric literal perturbed: floats x1.5 and /1.5, ints +1
  activation   an activation swapped for a near twin (F.gelu, F.gelu tanh,
               F.silu, F.relu); torch.tanh <-> torch.erf in a GELU formula;
               a call to a function named *gelu* replaced by F.gelu (erf; the
               tanh approximation when that function is the erf formula)
  residual     one operand of a sum of two tensors `a + b` dropped (a, then b)
  bias         a bias read (`weights.get(..."bias")`, a bias argument of a
               linear/norm/addmm call) replaced by None or zeros
  norm         a call to a function named *norm* replaced by its first argument
  scale        a scaling factor removed (`* D**-0.5`, `/ sqrt(...)`, `* SCALE`)
  rope_halves  rotate-half's halves swapped (torch.cat((-x2, x1)) -> (x1, -x2))
  rope         a call to a function named *rope*/*rotary* replaced by its first argument
  softmax_dim  softmax over the wrong dim (-1 -> -2)
  transpose    a .transpose(...)/.permute(...) dropped
  repeat       x.repeat_interleave(n, dim=d) <-> x.repeat(1, .., n, .., 1)
  cast_order   `w * x.to(dt)` -> `(w * x).to(dt)` (the cast back moved outside)
  upcast       a float32 upcast removed (.float(), .to(torch.float32), dtype=torch.float32)

Decode-step operators (a KV cache in the flat convention of docs/pack-format.md,
"Generation"; only in a file where some function takes a `past...` parameter):

  positions    `positions` off by one: read as positions + 1 and positions - 1
  cache_order  the cache appended before the rotary embedding: a statement
               `k = torch.cat((past_k, k), ...)` moved above the rope call before it
  mask_extend  the attention mask not extended over the cache: an entry's read of
               `attention_mask` cut to its last new-token columns
  window       the sliding window not applied to the cache: `x[:, :, -WINDOW:]` kept whole

Sites inside `def tap`, the `if __name__ == "__main__":` block and
docstrings are never mutated. With an entry function only the functions it
reaches (it and what it calls, transitively) and the top-level constants they
read are mutated.

    python3 -m fmx.mutate examples/solutions/qwen2.py --entry forward --json
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import json
import sys
from typing import Dict, List, Optional, Sequence, Set, Tuple

OPERATORS = ("constant", "activation", "residual", "bias", "norm", "scale", "rope_halves", "rope",
             "softmax_dim", "transpose", "repeat", "cast_order", "upcast", "positions", "cache_order",
             "mask_extend", "window")

# Activation variants: the call for an argument's text.
ACTIVATIONS = {
    "gelu": "F.gelu({})",
    "gelu_tanh": 'F.gelu({}, approximate="tanh")',
    "silu": "F.silu({})",
    "relu": "F.relu({})",
}
FLOAT32 = ("torch.float32", "torch.float")
SHAPE_ATTRS = {"shape", "dtype", "device", "ndim", "is_cuda"}
SHAPE_CALLS = {"size", "dim", "numel", "ndimension"}
# Calls whose positional argument 2 (or keyword `bias`) is a bias.
BIAS_CALLS = {"linear", "layer_norm", "group_norm", "conv1d", "conv2d", "batch_norm"}


class MutateError(Exception):
    """A bad request (unreadable or invalid solution, unknown entry): one line, exit 2."""


@dataclasses.dataclass
class Edit:
    operator: str
    start: int  # character offsets into the source
    end: int
    text: str  # replacement for source[start:end]
    description: str
    function: Optional[str]


# --------------------------------------------------------------------------- precedence

def _prec(node: ast.AST) -> int:
    """Binding strength of an expression (higher binds tighter), for parenthesizing."""
    if isinstance(node, ast.BinOp):
        if isinstance(node.op, (ast.Add, ast.Sub)):
            return 11
        if isinstance(node.op, ast.Pow):
            return 14
        if isinstance(node.op, (ast.LShift, ast.RShift)):
            return 10
        if isinstance(node.op, (ast.BitAnd, ast.BitXor, ast.BitOr)):
            return 9
        return 12
    if isinstance(node, ast.UnaryOp):
        return 6 if isinstance(node.op, ast.Not) else 13
    if isinstance(node, ast.Compare):
        return 7
    if isinstance(node, ast.BoolOp):
        return 5
    if isinstance(node, (ast.IfExp, ast.Lambda, ast.NamedExpr)):
        return 2
    if isinstance(node, ast.Tuple):
        return 1
    return 16


def _fmt_float(v: float) -> str:
    s = f"{v:.6g}"
    return s if any(c in s for c in ".enia") else s + ".0"


def _dotted(node: ast.AST) -> str:
    """`F.gelu` for F.gelu, `gelu_new` for gelu_new, '' for anything else."""
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        inner = _dotted(node.value)
        return f"{inner}.{node.attr}" if inner else ""
    return ""


def _call_name(call: ast.Call) -> str:
    """The called function's own name: `gelu` for F.gelu and x.gelu, `rope` for rope."""
    f = call.func
    if isinstance(f, ast.Name):
        return f.id
    if isinstance(f, ast.Attribute):
        return f.attr
    return ""


def _is_module_call(call: ast.Call) -> bool:
    """torch.x(...) / F.x(...) rather than a method call on a tensor."""
    return isinstance(call.func, ast.Attribute) and _dotted(call.func.value) in (
        "torch", "F", "nn.functional", "torch.nn.functional")


def _int_value(node: ast.AST) -> Optional[int]:
    if isinstance(node, ast.Constant) and type(node.value) is int:
        return node.value
    if (isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub)
            and isinstance(node.operand, ast.Constant) and type(node.operand.value) is int):
        return -node.operand.value
    return None


def _float_value(node: ast.AST) -> Optional[float]:
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return float(node.value)
    if (isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd))
            and isinstance(node.operand, ast.Constant) and type(node.operand.value) in (int, float)):
        v = float(node.operand.value)
        return -v if isinstance(node.op, ast.USub) else v
    return None


def _arg(call: ast.Call, index: int, name: str) -> Optional[ast.AST]:
    """Argument `name` of a call, given by keyword or at positional `index`."""
    for kw in call.keywords:
        if kw.arg == name:
            return kw.value
    if 0 <= index < len(call.args):
        return call.args[index]
    return None


def _contains_gelu_hint(text: str) -> bool:
    return "0.044715" in text


# --------------------------------------------------------------------------- the generator


class _Generator:
    def __init__(self, source: str, filename: str):
        self.source = source
        self.filename = filename
        try:
            self.tree = ast.parse(source, filename=filename)
        except SyntaxError as e:
            raise MutateError(f"{filename}:{e.lineno}: {e.msg}") from None
        self.line_starts = [0]
        for line in source.splitlines(keepends=True):
            self.line_starts.append(self.line_starts[-1] + len(line))
        self.lines_bytes = [line.encode("utf-8") for line in source.splitlines(keepends=True)]
        self.defs = {n.name: n for n in self.tree.body if isinstance(n, ast.FunctionDef)}
        # decode code: some function takes a KV cache (a parameter named past...)
        self.has_cache = any(a.arg.startswith("past") for f in self.defs.values()
                             for a in f.args.posonlyargs + f.args.args + f.args.kwonlyargs)
        self.edits: List[Edit] = []
        self.function: Optional[str] = None
        self.taint: Set[str] = set()

    # ---- positions

    def _offset(self, lineno: int, col: int) -> int:
        """ast's (line, utf-8 byte column) as a character offset into the source."""
        line = self.lines_bytes[lineno - 1] if lineno - 1 < len(self.lines_bytes) else b""
        return self.line_starts[lineno - 1] + len(line[:col].decode("utf-8", errors="replace"))

    def span(self, node: ast.AST) -> Tuple[int, int]:
        return (self._offset(node.lineno, node.col_offset),
                self._offset(node.end_lineno, node.end_col_offset))

    def seg(self, node: ast.AST) -> str:
        a, b = self.span(node)
        return self.source[a:b]

    def wrapped(self, node: ast.AST, min_prec: int) -> str:
        text = self.seg(node)
        return f"({text})" if _prec(node) < min_prec else text

    def add(self, operator: str, node_or_span, text: str, description: str) -> None:
        if isinstance(node_or_span, tuple):
            start, end = node_or_span
        else:
            start, end = self.span(node_or_span)
        if self.source[start:end] == text:
            return
        self.edits.append(Edit(operator, start, end, text, description, self.function))

    def replace_with(self, operator: str, node: ast.AST, keep: ast.AST, description: str) -> None:
        """Replaces node by one of its subexpressions, parenthesized where needed."""
        self.add(operator, node, self.wrapped(keep, _prec(node)), description)

    # ---- scope

    def select(self, entry: Optional[str]) -> Tuple[List[ast.FunctionDef], List[ast.stmt]]:
        """The functions and top-level constant assignments to mutate."""
        functions: Dict[str, ast.FunctionDef] = {}
        constants: Dict[str, ast.stmt] = {}
        for node in self.tree.body:
            if isinstance(node, ast.FunctionDef) and node.name != "tap":
                functions[node.name] = node
            elif isinstance(node, (ast.Assign, ast.AnnAssign)):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                for t in targets:
                    for n in ast.walk(t):
                        if isinstance(n, ast.Name):
                            constants[n.id] = node
        if entry is None:
            return list(functions.values()), list(dict.fromkeys(constants.values()))
        if entry not in functions:
            raise MutateError(f"{self.filename} has no function {entry!r}; it defines: "
                              f"{', '.join(functions) or 'none'}")
        reached: Dict[str, ast.FunctionDef] = {}
        used: Dict[int, ast.stmt] = {}
        todo: List[ast.AST] = [functions[entry]]
        reached[entry] = functions[entry]
        while todo:
            node = todo.pop()
            for n in ast.walk(node):
                if not isinstance(n, ast.Name):
                    continue
                if n.id in functions and n.id not in reached:
                    reached[n.id] = functions[n.id]
                    todo.append(functions[n.id])
                elif n.id in constants and id(constants[n.id]) not in used:
                    used[id(constants[n.id])] = constants[n.id]
                    todo.append(constants[n.id])
        funcs = [f for f in functions.values() if f.name in reached]
        consts = [c for c in dict.fromkeys(constants.values()) if id(c) in used]
        return funcs, consts

    # ---- tensor taint: which names hold tensors derived from the inputs

    def _tainted(self, node: ast.AST) -> bool:
        if isinstance(node, ast.Attribute) and node.attr in SHAPE_ATTRS:
            return False
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in SHAPE_CALLS:
            return False
        if isinstance(node, ast.Name):
            return node.id in self.taint
        return any(self._tainted(c) for c in ast.iter_child_nodes(node))

    def _compute_taint(self, fn: ast.FunctionDef) -> None:
        args = fn.args.posonlyargs + fn.args.args + fn.args.kwonlyargs
        self.taint = {a.arg for a in args if a.annotation is not None and "Tensor" in ast.unparse(a.annotation)}
        assigns = [n for n in ast.walk(fn) if isinstance(n, (ast.Assign, ast.AnnAssign, ast.AugAssign, ast.For))]
        changed = True
        while changed:
            changed = False
            for n in assigns:
                if isinstance(n, ast.For):
                    value, targets = n.iter, [n.target]
                elif isinstance(n, ast.Assign):
                    value, targets = n.value, n.targets
                else:
                    value, targets = n.value, [n.target]
                if value is None or not self._tainted(value):
                    continue
                for t in targets:
                    for name in ast.walk(t):
                        if isinstance(name, ast.Name) and name.id not in self.taint:
                            self.taint.add(name.id)
                            changed = True

    # ---- operators

    def run(self, entry: Optional[str]) -> List[Edit]:
        functions, constants = self.select(entry)
        self.function = None
        self.taint = set()
        for stmt in constants:
            self._constants(stmt)
        for fn in functions:
            self.function = fn.name
            self._compute_taint(fn)
            body = fn.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
                    and isinstance(body[0].value.value, str):
                body = body[1:]  # the docstring
            for stmt in body:
                self._visit(stmt)
            if self.has_cache:
                self._decode(fn)
        return self.edits

    # ---- decode-step operators (module docstring)

    def _decode(self, fn: ast.FunctionDef) -> None:
        parents = {id(c): n for n in ast.walk(fn) for c in ast.iter_child_nodes(n)}

        def loads(name: str) -> List[ast.Name]:
            """Reads of `name` as a tensor (not of its shape or dtype)."""
            out = []
            for n in ast.walk(fn):
                if isinstance(n, ast.Name) and n.id == name and isinstance(n.ctx, ast.Load):
                    up = parents.get(id(n))
                    if not (isinstance(up, ast.Attribute) and up.attr in SHAPE_ATTRS):
                        out.append(n)
            return out

        for n in loads("positions"):
            self.add("positions", n, "(positions + 1)", "positions off by one (+1)")
            self.add("positions", n, "(positions - 1)", "positions off by one (-1)")
        params = [a.arg for a in fn.args.posonlyargs + fn.args.args + fn.args.kwonlyargs]
        ids = next((a for a in params if a.endswith("input_ids")), None)
        if ids is not None and "attention_mask" in params:
            for n in loads("attention_mask"):
                self.add("mask_extend", n, f"attention_mask[:, -{ids}.shape[1]:]",
                         "the attention mask not extended over the cache (the new tokens' columns only)")
        for n in ast.walk(fn):
            if isinstance(n, ast.Subscript) and any(_is_window_cut(e) for e in (
                    n.slice.elts if isinstance(n.slice, ast.Tuple) else [n.slice])):
                self.replace_with("window", n, n.value, "the sliding window not applied to the cache")
        for node in ast.walk(fn):
            for field in ("body", "orelse"):
                body = getattr(node, field, None)
                if isinstance(body, list) and body and isinstance(body[0], ast.stmt):
                    self._cache_order(body)

    def _cache_order(self, body: List[ast.stmt]) -> None:
        for i, stmt in enumerate(body):
            if not (isinstance(stmt, ast.Assign) and _appends_cache(stmt.value)):
                continue
            rope = [j for j in range(i) if any(
                isinstance(c, ast.Call) and any(w in _call_name(c).lower() for w in ("rope", "rotary"))
                for c in ast.walk(body[j]))]
            if not rope:
                continue
            first = body[rope[-1]]
            start = self.span(first)[0]
            indent = self.source[self.line_starts[first.lineno - 1]:start]
            moved = self.source[start:self.span(body[i - 1])[1]]
            self.add("cache_order", (start, self.span(stmt)[1]), f"{self.seg(stmt)}\n{indent}{moved}",
                     "the cache appended before the rotary embedding")

    def _visit(self, stmt: ast.AST) -> None:
        gelu_context = "gelu" in (self.function or "").lower() or _contains_gelu_hint(self.seg(stmt))
        for node in ast.walk(stmt):
            if isinstance(node, ast.Call):
                self._call(node, gelu_context)
            elif isinstance(node, ast.BinOp):
                self._binop(node)
        self._constants(stmt)

    def _constants(self, stmt: ast.AST) -> None:
        for node in ast.walk(stmt):
            if not isinstance(node, ast.Constant) or type(node.value) not in (int, float):
                continue
            old = self.seg(node)
            if type(node.value) is float:
                if node.value == 0.0:
                    continue
                for factor, how in ((1.5, "x1.5"), (1 / 1.5, "/1.5")):
                    new = _fmt_float(node.value * factor)
                    self.add("constant", node, new, f"{old} -> {new} ({how})")
            else:
                new = str(node.value + 1)
                self.add("constant", node, new, f"{old} -> {new} (+1)")

    def _call(self, call: ast.Call, gelu_context: bool) -> None:
        name = _call_name(call)
        lname = name.lower()
        dotted = _dotted(call.func)
        first = call.args[0] if call.args else None

        # activation: F.gelu / F.silu / F.relu swapped for their twins
        if name in ("gelu", "silu", "relu") and (_is_module_call(call) or dotted in ("torch.relu",)) and first:
            kind = name
            approx = _arg(call, -1, "approximate")
            if name == "gelu" and isinstance(approx, ast.Constant) and approx.value == "tanh":
                kind = "gelu_tanh"
            for other, template in ACTIVATIONS.items():
                if other != kind:
                    self.add("activation", call, template.format(self.seg(first)),
                             f"{kind} -> {other}")
        # activation: tanh <-> erf inside a GELU formula
        if dotted in ("torch.tanh", "torch.erf") and gelu_context:
            other = "torch.erf" if dotted == "torch.tanh" else "torch.tanh"
            self.add("activation", call.func, other, f"{dotted} -> {other} in a GELU formula")
        # activation: a call to a GELU helper replaced by the exact (erf) GELU, or
        # by the tanh approximation when the helper is the erf formula itself
        if isinstance(call.func, ast.Name) and "gelu" in lname and first is not None:
            helper = self.defs.get(name)
            if helper is not None and any(isinstance(n, ast.Attribute) and n.attr == "erf" for n in ast.walk(helper)):
                self.add("activation", call, ACTIVATIONS["gelu_tanh"].format(self.seg(first)),
                         f"{name}(x) -> F.gelu(x, approximate=\"tanh\")")
            else:
                self.add("activation", call, ACTIVATIONS["gelu"].format(self.seg(first)),
                         f"{name}(x) -> F.gelu(x) (erf)")

        # norm dropped: the call replaced by the tensor it normalizes
        if "norm" in lname and first is not None and not dotted.startswith("torch.linalg"):
            self.replace_with("norm", call, first, f"{name}(x, ...) -> x")

        # rotary removed
        if ("rope" in lname or "rotary" in lname) and first is not None:
            self.replace_with("rope", call, first, f"{name}(x, ...) -> x")

        # rotate-half halves swapped: torch.cat((-x2, x1)) -> torch.cat((x1, -x2))
        if dotted == "torch.cat" and first is not None and isinstance(first, (ast.Tuple, ast.List)) \
                and len(first.elts) == 2 and any(isinstance(e, ast.UnaryOp) and isinstance(e.op, ast.USub)
                                                 for e in first.elts):
            a, b = first.elts
            start, _ = self.span(a)
            _, end = self.span(b)
            self.add("rope_halves", (start, end), f"{self.seg(b)}, {self.seg(a)}",
                     "rotate-half halves swapped")

        # softmax over the wrong dim
        if lname in ("softmax", "log_softmax"):
            dim = _arg(call, 1 if _is_module_call(call) else 0, "dim")
            d = _int_value(dim) if dim is not None else None
            if d is not None:
                new = d - 1 if d < 0 or d > 0 else 1
                self.add("softmax_dim", dim, str(new), f"softmax dim {d} -> {new}")

        # transpose / permute dropped
        if name in ("transpose", "permute", "t") and isinstance(call.func, ast.Attribute):
            if _is_module_call(call):
                if first is not None:
                    self.replace_with("transpose", call, first, f"torch.{name}(x, ...) -> x")
            else:
                self.replace_with("transpose", call, call.func.value, f".{name}(...) dropped")

        # repeat_interleave <-> repeat (kv heads tiled instead of interleaved, and back)
        if name == "repeat_interleave" and isinstance(call.func, ast.Attribute) and not _is_module_call(call):
            n = _arg(call, 0, "repeats")
            dim = _int_value(_arg(call, 1, "dim") or ast.Constant(None))
            if n is not None and dim is not None and -4 <= dim < 4:
                reps = ["1"] * 4
                reps[dim % 4] = self.seg(n)
                recv = self.wrapped(call.func.value, 16)
                self.add("repeat", call, f"{recv}.repeat({', '.join(reps)})",
                         "repeat_interleave -> repeat (tiled, not interleaved)")
        if name == "repeat" and isinstance(call.func, ast.Attribute) and not call.keywords and len(call.args) > 1:
            not_one = [i for i, a in enumerate(call.args) if _int_value(a) != 1]
            if len(not_one) == 1:
                i = not_one[0]
                recv = self.wrapped(call.func.value, 16)
                self.add("repeat", call, f"{recv}.repeat_interleave({self.seg(call.args[i])}, dim={i})",
                         "repeat -> repeat_interleave (interleaved, not tiled)")

        # upcast removed
        if isinstance(call.func, ast.Attribute) and not _is_module_call(call):
            recv = call.func.value
            if name == "float" and not call.args and not call.keywords:
                self.replace_with("upcast", call, recv, ".float() removed")
            elif name == "to":
                dt = _arg(call, 0, "dtype")
                if dt is not None and _dotted(dt) in FLOAT32 and len(call.args) + len(call.keywords) == 1:
                    self.replace_with("upcast", call, recv, f".to({_dotted(dt)}) removed")
        for i, kw in enumerate(call.keywords):
            if kw.arg == "dtype" and _dotted(kw.value) in FLOAT32:
                prev = call.keywords[i - 1] if i else (call.args[-1] if call.args else None)
                if prev is not None:
                    start = self.span(prev)[1]
                    self.add("upcast", (start, self.span(kw)[1]), "",
                             f"{name}(..., dtype={_dotted(kw.value)}) -> {name}(...)")

        # bias dropped
        self._bias(call, name)

    def _bias(self, call: ast.Call, name: str) -> None:
        def mentions_bias(node: Optional[ast.AST]) -> bool:
            return node is not None and any(
                isinstance(n, ast.Constant) and isinstance(n.value, str) and "bias" in n.value
                for n in ast.walk(node))

        if name == "get" and isinstance(call.func, ast.Attribute) and call.args and mentions_bias(call.args[0]):
            self.add("bias", call, "None", f"{self.seg(call)} -> None")
        if name in BIAS_CALLS:
            b = _arg(call, 3 if name == "layer_norm" else 2, "bias")
            if isinstance(b, ast.Subscript) and mentions_bias(b.slice):
                self.add("bias", b, "None", "bias argument -> None")
        if name in ("addmm", "baddbmm", "addmv") and call.args and isinstance(call.args[0], ast.Subscript) \
                and mentions_bias(call.args[0].slice):
            b = call.args[0]
            self.add("bias", b, f"torch.zeros_like({self.seg(b)})", f"{name} bias -> zeros")

    def _binop(self, node: ast.BinOp) -> None:
        left, right = node.left, node.right
        # residual: one operand of a sum of two tensors dropped
        if isinstance(node.op, ast.Add) and self._tainted(left) and self._tainted(right):
            self.replace_with("residual", node, left, "a + b -> a")
            self.replace_with("residual", node, right, "a + b -> b")
        # scale dropped
        if isinstance(node.op, ast.Mult):
            if _is_scale(left) and not _is_scale(right):
                self.replace_with("scale", node, right, f"{self.seg(left)} * x -> x")
            elif _is_scale(right):
                self.replace_with("scale", node, left, f"x * {self.seg(right)} -> x")
        if isinstance(node.op, ast.Div) and _mentions_scale(right):
            self.replace_with("scale", node, left, f"x / {self.seg(right)} -> x")
        # cast order: w * x.to(dt) -> (w * x).to(dt)
        if isinstance(node.op, ast.Mult):
            for cast, other, cast_left in ((right, left, False), (left, right, True)):
                if isinstance(cast, ast.Call) and isinstance(cast.func, ast.Attribute) and cast.func.attr == "to":
                    recv = cast.func.value
                    args = self.source[self.span(cast.func)[1]:self.span(cast)[1]]
                    a = self.wrapped(other, 13)
                    x = self.wrapped(recv, 13)
                    prod = f"{x} * {a}" if cast_left else f"{a} * {x}"
                    self.add("cast_order", node, f"({prod}).to{args}",
                             f"cast moved outside the product: ({prod}).to{args}")


def _is_window_cut(node: ast.AST) -> bool:
    """`-WINDOW:` (a slice keeping the last WINDOW positions; any name with "window" in it)."""
    return (isinstance(node, ast.Slice) and node.upper is None and node.step is None
            and isinstance(node.lower, ast.UnaryOp) and isinstance(node.lower.op, ast.USub)
            and isinstance(node.lower.operand, ast.Name) and "window" in node.lower.operand.id.lower())


def _appends_cache(node: ast.AST) -> bool:
    """A torch.cat of a past cache tensor (a name starting with "past") and new ones."""
    for c in ast.walk(node):
        if isinstance(c, ast.Call) and _call_name(c).endswith("cat") and c.args and \
                isinstance(c.args[0], (ast.Tuple, ast.List)) and any(
                    isinstance(e, ast.Name) and e.id.startswith("past") for e in c.args[0].elts):
            return True
    return False


def _is_scale(node: ast.AST) -> bool:
    """A scaling factor: x**±0.5, sqrt(...)/rsqrt(...) of no tensor, or a name with 'scale'."""
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Pow):
        e = _float_value(node.right)
        return e is not None and abs(abs(e) - 0.5) < 1e-12
    if isinstance(node, ast.Call) and _call_name(node) in ("sqrt", "rsqrt") and _dotted(node.func).startswith("math."):
        return True
    if isinstance(node, (ast.Name, ast.Attribute)):
        return "scale" in (node.id if isinstance(node, ast.Name) else node.attr).lower()
    return False


def _mentions_scale(node: ast.AST) -> bool:
    return any(_is_scale(n) or (isinstance(n, ast.Call) and _call_name(n) in ("sqrt", "rsqrt"))
               for n in ast.walk(node))


# --------------------------------------------------------------------------- API


def _one_line(text: str) -> str:
    return " ".join(text.split())


def generate(source: str, entry: Optional[str] = None, filename: str = "<solution>") -> List[Dict[str, object]]:
    """The mutants of `source`, in source order: dicts with id, operator, line,
    description, before, after, function and source (the whole mutated file)."""
    gen = _Generator(source, filename)
    edits = sorted(gen.run(entry), key=lambda e: (e.start, OPERATORS.index(e.operator), e.end))
    seen = {source}
    mutants: List[Dict[str, object]] = []
    for e in edits:
        mutated = source[:e.start] + e.text + source[e.end:]
        if mutated in seen:
            continue
        try:
            ast.parse(mutated)
        except SyntaxError:  # a generator bug; never hand out invalid Python
            continue
        seen.add(mutated)
        line = source.count("\n", 0, e.start) + 1
        first = gen.line_starts[line - 1]
        end_line = source.count("\n", 0, max(e.end, e.start + 1) - 1) + 1
        last = gen.line_starts[end_line] if end_line < len(gen.line_starts) else len(source)
        new_last = last + len(e.text) - (e.end - e.start)
        mutants.append({
            "id": f"m{len(mutants) + 1}",
            "operator": e.operator,
            "line": line,
            "function": e.function,
            "description": e.description,
            "before": _one_line(source[first:last]),
            "after": _one_line(mutated[first:new_last]),
            "source": mutated,
        })
    return mutants


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python3 -m fmx.mutate",
                                description="Print the mutants of a functional solution (see fmx mutate).")
    p.add_argument("solution", metavar="SOLUTION", help="the solution file (candidate language)")
    p.add_argument("--entry", metavar="NAME", help="mutate only what this function reaches")
    p.add_argument("--json", action="store_true", help="print the mutants as a JSON list")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = _parser().parse_args(argv)
    try:
        try:
            with open(args.solution, encoding="utf-8") as f:
                source = f.read()
        except (OSError, UnicodeDecodeError) as e:
            raise MutateError(f"cannot read {args.solution}: {getattr(e, 'strerror', None) or e}") from None
        mutants = generate(source, args.entry, args.solution)
    except MutateError as e:
        print(f"fmx.mutate: error: {e}", file=sys.stderr)
        return 2
    if args.json:
        json.dump(mutants, sys.stdout)
        sys.stdout.write("\n")
    else:
        for m in mutants:
            print(f"{m['id']:>5} {m['operator']:<12} L{m['line']:<4} {m['before']}\n"
                  f"{'':>24}-> {m['after']}")
        counts: Dict[str, int] = {}
        for m in mutants:
            counts[str(m["operator"])] = counts.get(str(m["operator"]), 0) + 1
        print(f"{len(mutants)} mutants: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
