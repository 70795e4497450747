"""The example models (examples/models) and their reference functional
solutions (examples/solutions) agree, and the checks can tell a wrong program
from a right one.

What a user relies on here: the full-model entry reproduces the logits of the
class-based model on left- and right-padded batches in float32 and bfloat16;
every component entry named in <example>.entries.json reproduces its module's
real call (inputs captured by name, as the exporter captures them); the
solutions stay within the candidate language (and compile with TorchScript's
C++ parser, as the engine compiles them) and within 150 logical lines; and
plausible mistakes (mutants) fail the same tolerances the solutions pass.

It is not a test of the exporter or the engine: it needs only torch.
Run: /usr/bin/python3 -m pytest tests/python/test_examples.py
"""

import ast
import importlib.util
import inspect
import json
import math
import re
import types
import typing
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Dict, List, Tuple

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
MODELS = ROOT / "examples" / "models"
SOLUTIONS = ROOT / "examples" / "solutions"
EXAMPLES = ["qwen2", "gpt2"]
DTYPES = [torch.float32, torch.bfloat16]
SEED = 0
BATCH, SEQ = 2, 11

# Max |got - want| over graded elements, in units of RMS(want). A faithful
# rewrite matched bit for bit on torch 1.13 CPU (measured 0.0 in both dtypes);
# the bf16 bound is below one bf16 ulp (2**-8) of a typical element, so it is
# "bit-exact but for the smallest elements", and still far below the error of
# the weakest mutant below (about 4e-2).
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-3}
MAX_LOGICAL_LINES = 150


# ---------------------------------------------------------------- loading


def _load_file(path: Path, name: str) -> types.ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@lru_cache(maxsize=None)
def _model_module(example: str) -> types.ModuleType:
    return _load_file(MODELS / f"{example}.py", f"fmx_example_model_{example}")


@lru_cache(maxsize=None)
def _solution(example: str) -> types.ModuleType:
    return _load_file(SOLUTIONS / f"{example}.py", f"fmx_example_solution_{example}")


def _entries(example: str) -> Dict[str, str]:
    return json.loads((SOLUTIONS / f"{example}.entries.json").read_text())


def _mutant(example: str, old: str, new: str) -> types.ModuleType:
    """The solution with one source substring replaced, loaded as a module."""
    path = SOLUTIONS / f"{example}.py"
    source = path.read_text()
    assert source.count(old) == 1, f"mutant anchor not found exactly once in {path}: {old!r}"
    module = types.ModuleType(f"fmx_example_mutant_{example}")
    exec(compile(source.replace(old, new), str(path), "exec"), module.__dict__)
    return module


def _build(example: str, dtype: torch.dtype = torch.float32, **overrides) -> torch.nn.Module:
    torch.manual_seed(SEED)
    return _model_module(example).build(**overrides).to(dtype)


def _weights(module: torch.nn.Module) -> Dict[str, torch.Tensor]:
    """Parameters and buffers keyed relative to the module, tied names included
    (state_dict lists a shared parameter under every name; named_buffers adds
    the non-persistent buffers such as inv_freq and GPT-2's causal `bias`)."""
    weights = dict(module.state_dict())
    weights.update(dict(module.named_buffers()))
    return weights


def _inputs(padding: str) -> Tuple[torch.Tensor, torch.Tensor]:
    """(B, T) token ids and keep mask; row 0 has 3 padding tokens, row 1 has 1."""
    generator = torch.Generator().manual_seed(SEED + 1)
    input_ids = torch.randint(0, 512, (BATCH, SEQ), generator=generator)
    mask = torch.ones(BATCH, SEQ, dtype=torch.long)
    if padding == "left":
        mask[0, :3] = 0
        mask[1, :1] = 0
    elif padding == "right":
        mask[0, SEQ - 3 :] = 0
        mask[1, SEQ - 1 :] = 0
    return input_ids, mask


def _rel_error(got: torch.Tensor, want: torch.Tensor, keep: torch.Tensor) -> float:
    """max |got - want| / RMS(want) over graded elements: where keep is 1 for
    token-aligned (B, T, ...) outputs, everywhere otherwise. inf if got has
    NaN/Inf there or the shapes differ."""
    if got.shape != want.shape or got.dtype != want.dtype:
        return float("inf")
    got, want = got.double(), want.double()
    if want.dim() >= 2 and tuple(want.shape[:2]) == tuple(keep.shape):
        got, want = got[keep.bool()], want[keep.bool()]
    if not torch.isfinite(got).all():
        return float("inf")
    scale = max(want.pow(2).mean().sqrt().item(), 1e-30)
    return (got - want).abs().max().item() / scale


def _logits(model: torch.nn.Module, input_ids, mask) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=input_ids, attention_mask=mask).logits


# ---------------------------------------------------------------- the full model


@pytest.mark.parametrize("padding", ["left", "right"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("example", EXAMPLES)
def test_solution_forward_matches_model_logits(example, dtype, padding):
    model = _build(example, dtype)
    input_ids, mask = _inputs(padding)
    want = _logits(model, input_ids, mask)
    with torch.no_grad():
        got = _solution(example).forward(input_ids=input_ids, attention_mask=mask,
                                         weights=_weights(model))
    assert want.dtype == dtype and want.shape == (BATCH, SEQ, 512)
    error = _rel_error(got, want, mask)
    assert error <= TOLERANCE[dtype], f"{example} {dtype} {padding}: rel error {error:.3e}"


@pytest.mark.parametrize("example", EXAMPLES)
def test_padding_changes_the_logits_it_should(example):
    # The probes are only meaningful if the mask matters: the same ids with and
    # without left padding give different logits at the kept positions.
    model = _build(example)
    input_ids, mask = _inputs("left")
    padded = _logits(model, input_ids, mask)
    unpadded = _logits(model, input_ids, torch.ones_like(mask))
    assert _rel_error(padded, unpadded, mask) > 1e-2


# ---------------------------------------------------------------- components


def _flatten_tensors(value: Any, name: str, out: Dict[str, torch.Tensor]) -> None:
    """Tensors of a call's inputs or outputs by name; tuples and lists become
    NAME_0, NAME_1, ... (nested: NAME_0_1); None, caches and other values are
    skipped. ModelOutputs flatten by field name."""
    if isinstance(value, torch.Tensor):
        out[name] = value
    elif hasattr(value, "to_tuple") and hasattr(value, "keys"):
        for key in value.keys():
            _flatten_tensors(value[key], key, out)
    elif isinstance(value, (tuple, list)):
        for i, item in enumerate(value):
            _flatten_tensors(item, f"{name}_{i}" if name else str(i), out)


def _capture_calls(model: torch.nn.Module,
                   run: Callable[[], Any]) -> List[Tuple[str, Any, Dict, Any]]:
    """Runs `run` with every module's forward wrapped, returning one
    (path, module, {param name: bound value}, output) per call. Binding with
    inspect.signature is how the exporter names inputs (torch 1.13 has no
    forward pre-hooks with kwargs)."""
    calls = []

    def wrap(path, module, forward):
        signature = inspect.signature(forward)

        def wrapper(*args, **kwargs):
            bound = signature.bind(*args, **kwargs)
            output = forward(*args, **kwargs)
            calls.append((path, module, dict(bound.arguments), output))
            return output

        return wrapper

    modules = list(model.named_modules())
    for path, module in modules:
        module.forward = wrap(path, module, module.forward)
    try:
        with torch.no_grad():
            run()
    finally:
        for _, module in modules:
            del module.forward  # drop the instance attribute: the class method is back
    return calls


def _call_entry(fn: Callable, inputs: Dict[str, torch.Tensor], weights) -> Dict[str, torch.Tensor]:
    """Calls an entry as fmx does: the declared parameters by name, `weights`
    when declared; parameters with defaults (prefix) are left to them.
    Returns the tensor results in order (named by position)."""
    kwargs = {}
    for name, param in inspect.signature(fn).parameters.items():
        if name == "weights":
            kwargs[name] = weights
        elif name in inputs:
            kwargs[name] = inputs[name]
        elif param.default is inspect.Parameter.empty:
            raise AssertionError(f"{fn.__name__} needs {name!r}; the call has {sorted(inputs)}")
    with torch.no_grad():
        result = fn(**kwargs)
    outputs: Dict[str, torch.Tensor] = {}
    _flatten_tensors(result if isinstance(result, tuple) else (result,), "", outputs)
    return outputs


@pytest.mark.parametrize("example", EXAMPLES)
def test_entries_cover_every_module_class(example):
    model = _build(example)
    containers = (torch.nn.ModuleList, torch.nn.ModuleDict)  # never called themselves
    classes = {type(m).__name__ for m in model.modules() if not isinstance(m, containers)}
    entries = _entries(example)
    assert set(entries) == classes
    solution = _solution(example)
    for cls, fn in entries.items():
        assert callable(getattr(solution, fn, None)), f"{cls}: {fn} is not in the solution"
    assert entries[type(model).__name__] == "forward"


@pytest.mark.parametrize("padding", ["left", "right"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("example", EXAMPLES)
def test_component_entries_match_every_module_call(example, dtype, padding):
    model = _build(example, dtype)
    input_ids, mask = _inputs(padding)
    calls = _capture_calls(model, lambda: model(input_ids=input_ids, attention_mask=mask))
    solution, entries = _solution(example), _entries(example)
    checked = set()
    for path, module, bound, output in calls:
        inputs: Dict[str, torch.Tensor] = {}
        for name, value in bound.items():
            if name == "kwargs" and isinstance(value, dict):
                for key, item in value.items():
                    _flatten_tensors(item, key, inputs)
            else:
                _flatten_tensors(value, name, inputs)
        want: Dict[str, torch.Tensor] = {}
        _flatten_tensors(output if isinstance(output, tuple) else (output,), "", want)
        fn = getattr(solution, entries[type(module).__name__])
        got = list(_call_entry(fn, inputs, _weights(module)).values())
        assert len(got) == len(want), f"{path}: {len(got)} outputs, the module has {list(want)}"
        for value, (name, expected) in zip(got, want.items()):
            error = _rel_error(value, expected, mask)
            assert error <= TOLERANCE[dtype], f"{path} output {name}: rel error {error:.3e}"
        checked.add(type(module).__name__)
    assert checked == set(entries)


# ---------------------------------------------------------------- mutants

# (example, what the mistake is, dtype that exposes it, anchor, replacement).
# Each must fail the tolerance the real solution passes, on left-padded input.
MUTANTS = [
    ("qwen2", "RMSNorm weight applied before the cast back", torch.bfloat16,
     'return weights[prefix + "weight"] * x.to(hidden_states.dtype)',
     'return (weights[prefix + "weight"] * x).to(hidden_states.dtype)'),
    ("qwen2", "no rotary embedding", torch.float32,
     "q, k = rope(q, cos, sin), rope(k, cos, sin)", "q, k = q, k"),
    ("qwen2", "padding mask ignored", torch.float32,
     " & (attention_mask[:, None, None, :] != 0)", ""),
    ("qwen2", "mask of -inf instead of finfo.min (NaN from padded rows)", torch.float32,
     '.to(h.dtype).nan_to_num()', ".to(h.dtype)"),
    ("gpt2", "erf GELU instead of the tanh approximation", torch.float32,
     "return 0.5 * input * (1.0 + torch.tanh(inner))", "return F.gelu(input)"),
    ("gpt2", "attention scores not scaled", torch.float32,
     "scores = scores / torch.full", "scores = scores + 0.0 * torch.full"),
    ("gpt2", "padding mask ignored", torch.float32,
     "F.softmax(scores + attention_mask, dim=-1)", "F.softmax(scores, dim=-1)"),
    ("gpt2", "Conv1D as matmul then bias (two roundings, not addmm's one)", torch.bfloat16,
     'torch.addmm(weights[prefix + "bias"], x2d, weights[prefix + "weight"])',
     'x2d @ weights[prefix + "weight"] + weights[prefix + "bias"]'),
]


@pytest.mark.parametrize("example,what,dtype,old,new", MUTANTS,
                         ids=[f"{m[0]}: {m[1]}" for m in MUTANTS])
def test_mutant_is_detected(example, what, dtype, old, new):
    model = _build(example, dtype)
    input_ids, mask = _inputs("left")
    want = _logits(model, input_ids, mask)
    with torch.no_grad():
        got = _mutant(example, old, new).forward(input_ids=input_ids, attention_mask=mask,
                                                 weights=_weights(model))
    error = _rel_error(got, want, mask)
    assert error > TOLERANCE[dtype], f"{what}: rel error {error:.3e} passes"


# ---------------------------------------------------------------- the candidate language

ALLOWED_IMPORTS = {
    "import math", "import torch", "import torch.nn.functional as F",
    "from torch import Tensor",
}
ALLOWED_TYPING = {"Dict", "List", "Optional", "Tuple"}


def _is_docstring(node: ast.stmt) -> bool:
    return (isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant)
            and isinstance(node.value.value, str))


def logical_lines(source: str) -> int:
    """fmx's LOC measure: the number of ast.stmt nodes anywhere in the file
    (defs, returns, assignments, loops and the statements nested in them,
    imports included), except docstrings. A statement split over several
    physical lines counts once; `a = 1; b = 2` counts twice."""
    return sum(1 for node in ast.walk(ast.parse(source))
               if isinstance(node, ast.stmt) and not _is_docstring(node))


@pytest.mark.parametrize("example", EXAMPLES)
def test_solution_is_at_most_150_logical_lines(example):
    assert logical_lines((SOLUTIONS / f"{example}.py").read_text()) <= MAX_LOGICAL_LINES


def test_logical_lines_counts_nested_statements_not_docstrings():
    source = '"""doc"""\nimport torch\ndef f(x):\n    """doc"""\n    for i in range(2):\n' \
             "        x = (x +\n             1)\n    return x\n"
    assert logical_lines(source) == 5  # import, def, for, assign, return


@pytest.mark.parametrize("example", EXAMPLES)
def test_solution_uses_only_the_candidate_language(example):
    source = (SOLUTIONS / f"{example}.py").read_text()
    tree = ast.parse(source)
    for node in tree.body:
        if _is_docstring(node):
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            text = ast.get_source_segment(source, node)
            typing_ok = (isinstance(node, ast.ImportFrom) and node.module == "typing"
                         and {a.name for a in node.names} <= ALLOWED_TYPING)
            assert text in ALLOWED_IMPORTS or typing_ok, f"import not allowed: {text}"
        elif isinstance(node, ast.Assign):
            assert len(node.targets) == 1 and isinstance(node.targets[0], ast.Name)
            assert node.targets[0].id.isupper(), "top-level names are CONSTANTS"
        else:
            assert isinstance(node, ast.FunctionDef), f"line {node.lineno}: only defs at top level"
            assert not node.decorator_list, f"{node.name}: no decorators"
            args = node.args.args + node.args.kwonlyargs
            assert all(a.annotation is not None for a in args), f"{node.name}: untyped parameter"
            assert node.returns is not None, f"{node.name}: no return annotation"
    for node in ast.walk(tree):
        where = f"line {getattr(node, 'lineno', '?')}"
        assert not isinstance(node, (ast.ClassDef, ast.AugAssign, ast.Lambda, ast.Global)), where
        # the C++ TorchScript parser has no f-strings: use "{}".format(...)
        assert not isinstance(node, ast.JoinedStr), f"{where}: f-string"
        if isinstance(node, ast.Assign):
            assert not any(isinstance(t, ast.Subscript) for t in node.targets), f"{where}: x[...] ="
        if isinstance(node, ast.Attribute):
            in_place = node.attr.endswith("_") and not node.attr.startswith("_")
            assert not in_place and node.attr not in ("item", "tolist"), f"{where}: .{node.attr}"


def _compile_torchscript(example: str) -> torch._C.CompilationUnit:
    """Compiles the solution with TorchScript's C++ parser the way the engine
    does: imports stripped, top-level constants inlined (TorchScript refuses
    global numbers), every def compiled together."""
    source = (SOLUTIONS / f"{example}.py").read_text()
    tree = ast.parse(source)
    solution = _solution(example)
    constants = {n.targets[0].id: getattr(solution, n.targets[0].id)
                 for n in tree.body if isinstance(n, ast.Assign)}
    defs = [ast.get_source_segment(source, n) for n in tree.body if isinstance(n, ast.FunctionDef)]
    body = "\n\n".join(defs) + "\n"
    for name, value in constants.items():
        body = re.sub(rf"\b{name}\b", repr(value), body)
    scope = {"torch": torch, "F": torch.nn.functional, "math": math, "Tensor": torch.Tensor,
             **{name: getattr(typing, name) for name in ALLOWED_TYPING}}
    unit = torch._C.CompilationUnit()
    unit.define(body, lambda name: scope.get(name))
    return unit


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("example", EXAMPLES)
def test_solution_compiles_with_torchscript_and_matches(example, dtype):
    # Run with the graph executor's optimizations off, as the engine must: on,
    # TorchScript's DecomposeOps rewrites aten::addmm into mm + add, which
    # rounds twice (GPT-2's Conv1D then misses the model by ~6e-2 in bf16).
    unit = _compile_torchscript(example)
    model = _build(example, dtype)
    input_ids, mask = _inputs("left")
    optimize = torch._C._get_graph_executor_optimize()
    torch._C._set_graph_executor_optimize(False)
    try:
        with torch.no_grad():
            got = unit.find_function("forward")(input_ids=input_ids, attention_mask=mask,
                                                weights=_weights(model))
    finally:
        torch._C._set_graph_executor_optimize(optimize)
    error = _rel_error(got, _logits(model, input_ids, mask), mask)
    assert error <= TOLERANCE[dtype], f"scripted {example} {dtype}: rel error {error:.3e}"


# ---------------------------------------------------------------- builds

QWEN25_05B = dict(num_hidden_layers=1, hidden_size=896, num_attention_heads=14,
                  num_key_value_heads=2, intermediate_size=4864, vocab_size=151936,
                  tie_word_embeddings=True, rope_theta=1000000.0,
                  max_position_embeddings=32768)


def test_qwen2_builds_at_qwen25_05b_dimensions_and_solution_scales():
    # One layer of Qwen2.5-0.5B (the full model has 24): builds, runs T=4, and
    # the solution with its constants set to these dims gives the same logits.
    model = _build("qwen2", **QWEN25_05B)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert model.model.layers[0].self_attn.k_proj.weight.shape == (128, 896)
    input_ids = torch.randint(0, 151936, (1, 4), generator=torch.Generator().manual_seed(3))
    mask = torch.ones(1, 4, dtype=torch.long)
    want = _logits(model, input_ids, mask)
    assert want.shape == (1, 4, 151936) and torch.isfinite(want).all()
    solution = _load_file(SOLUTIONS / "qwen2.py", "fmx_example_solution_qwen2_05b")
    solution.N_LAYERS, solution.N_HEADS, solution.N_KV_HEADS = 1, 14, 2
    solution.ROPE_THETA = QWEN25_05B["rope_theta"]
    with torch.no_grad():
        got = solution.forward(input_ids=input_ids, attention_mask=mask, weights=_weights(model))
    assert _rel_error(got, want, mask) <= TOLERANCE[torch.float32]


@pytest.mark.parametrize("example", EXAMPLES)
def test_build_rejects_unknown_overrides_naming_valid_keys(example):
    with pytest.raises(ValueError, match="valid keys") as info:
        _model_module(example).build(not_a_key=1)
    assert "not_a_key" in str(info.value)


@pytest.mark.parametrize("example", EXAMPLES)
def test_build_is_seeded_eval_and_has_no_constant_parameters(example):
    a, b = _build(example), _build(example)
    assert not a.training
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(pa, pb), f"{name}: not reproducible from the seed"
        if pa.is_floating_point() and pa.numel() > 1:  # spread >= 5% of the magnitude
            assert pa.std() > 0.05 * pa.abs().mean(), f"{name}: (nearly) constant, so an op could hide"
