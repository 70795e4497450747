"""`fmx mutate` as a task author runs it: are a pack's probes strong enough?

The mutant generator (`python3 -m fmx.mutate`) is driven as a subprocess and
its JSON read back: it makes each operator's mutants on the example solutions,
every mutant is valid Python differing from the solution in one statement,
and an entry function limits it to what that function reaches. `fmx mutate`
(through FMX_BIN, like test_verify.py) verifies every mutant on every probe:
the examples' packs (exported with their shipped equivalent lists) kill every
counted mutant, listed equivalents and invalid mutants are reported apart and
not counted, and a solution that does not pass is refused.
"""
import ast
import json
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
FMX = os.environ.get("FMX_BIN", str(ROOT / "build" / "fmx"))
PYTHON = os.environ.get("FMX_PYTHON", "/usr/bin/python3")
EXAMPLES = ("qwen2", "gpt2")
VERDICTS = {"killed", "survived", "equivalent", "invalid"}


def fmx(*args, cwd=ROOT):
    return subprocess.run([FMX, *map(str, args)], cwd=cwd, capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, timeout=600)


def solution(ex):
    return ROOT / "examples" / "solutions" / f"{ex}.py"


def equivalents(ex):
    return ROOT / "examples" / "solutions" / f"{ex}.equivalent.json"


def generate(path, *args):
    """The generator's mutants of a solution file, as its --json prints them."""
    env = dict(os.environ, PYTHONPATH=str(ROOT / "python"))
    res = subprocess.run([PYTHON, "-m", "fmx.mutate", str(path), "--json", *args], cwd=ROOT, env=env,
                         capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=120)
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)


def mutate(pack, source, *args):
    """Runs fmx mutate --json; returns (completed process, report or None)."""
    res = fmx("mutate", pack, source, "--json", *args)
    report = json.loads(res.stdout) if res.stdout.strip().startswith("{") else None
    return res, report


@pytest.fixture(scope="session")
def packs(example_packs):
    """The example packs as scripts/demo.sh exports them (with their equivalent lists)."""
    made = {}
    for ex in EXAMPLES:
        made[ex] = example_packs.pack(ex, "--equivalent", str(equivalents(ex)))
    return made


@pytest.fixture(scope="session")
def reports(packs):
    """fmx mutate --json on each example's whole model, run once."""
    return {ex: mutate(packs[ex], solution(ex)) for ex in EXAMPLES}


# ---- the generator ----

# (example, operator, a substring of the solution line, a substring of the mutant line)
EXPECTED = [
    ("gpt2", "activation", "torch.tanh(inner)", "torch.erf(inner)"),                 # tanh vs erf GELU
    ("gpt2", "activation", "x = gelu_new(conv1d(", "x = F.gelu(conv1d("),             # gelu_new -> exact GELU
    ("qwen2", "activation", "F.silu(linear(x", 'approximate="tanh"'),
    ("qwen2", "rope", "rope(q, cos, sin)", "q, k = q, rope(k, cos, sin)"),            # rotary removed
    ("qwen2", "rope_halves", "torch.cat((-x[..., half:], x[..., :half])",
     "torch.cat((x[..., :half], -x[..., half:])"),
    ("qwen2", "constant", "EPS = 1e-6", "EPS = 1.5e-06"),                            # RMSNorm eps
    ("qwen2", "constant", "* D**-0.5", "* D**-0.75"),                                 # attention scale changed
    ("qwen2", "scale", "* D**-0.5", "torch.matmul(q, k.transpose(2, 3)) + attention_mask"),
    ("gpt2", "scale", "v.shape[-1] ** 0.5", "scores = scores"),
    ("qwen2", "repeat", ".repeat_interleave(N_HEADS // N_KV_HEADS, dim=1)", ".repeat(1, N_HEADS // N_KV_HEADS, 1, 1)"),
    ("qwen2", "cast_order", 'weights[prefix + "weight"] * x.to(hidden_states.dtype)',
     '(weights[prefix + "weight"] * x).to(hidden_states.dtype)'),
    ("qwen2", "softmax_dim", "F.softmax(scores, dim=-1", "F.softmax(scores, dim=-2"),
    ("gpt2", "softmax_dim", "F.softmax(scores + attention_mask, dim=-1)", "dim=-2"),
    ("qwen2", "residual", "return h + mlp(x", "return h"),
    ("gpt2", "residual", "h = h + F.embedding(pos", "h = h"),
    ("qwen2", "bias", 'weights.get(prefix + "bias")', "None)"),
    ("gpt2", "bias", "torch.addmm(weights[", "torch.addmm(torch.zeros_like("),
    ("qwen2", "norm", 'x = rms_norm(hidden_states, weights, prefix + "input_layernorm.")', "x = hidden_states"),
    ("gpt2", "norm", 'return layer_norm(h, weights, prefix + "ln_f.")', "return h"),
    ("qwen2", "transpose", "out.transpose(1, 2).reshape(B, T, C)", "out.reshape(B, T, C)"),
    ("gpt2", "transpose", "q.view(B, T, N_HEADS, -1).permute(0, 2, 1, 3)", "q = q.view(B, T, N_HEADS, -1)"),
    ("qwen2", "upcast", "x = hidden_states.float()", "x = hidden_states"),
    ("qwen2", "upcast", "dtype=torch.float32)", "F.softmax(scores, dim=-1).to(q.dtype)"),
]


@pytest.mark.parametrize("ex,operator,before,after", EXPECTED,
                         ids=[f"{e[0]}-{e[1]}-{i}" for i, e in enumerate(EXPECTED)])
def test_generator_makes_each_operators_mutant(ex, operator, before, after):
    found = [m for m in generate(solution(ex)) if m["operator"] == operator
             and before in m["before"] and after in m["after"]]
    assert found, f"no {operator} mutant turning {before!r} into {after!r}"


SYNTHETIC = """import math
import torch
import torch.nn.functional as F
from torch import Tensor
from typing import Dict

SCALE = 0.125


def erf_gelu(x: Tensor) -> Tensor:
    return 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0)))


def forward(x: Tensor, k: Tensor, weights: Dict[str, Tensor]) -> Tensor:
    y = F.linear(x, weights["w"], weights["bias"])
    y = F.layer_norm(y, [y.shape[-1]], weights["ln.weight"], weights["ln.bias"], 1e-5)
    s = torch.matmul(x, torch.transpose(k, -1, -2)) * SCALE
    p = s.softmax(-1).to(torch.float32)
    return p.permute(0, 1, 3, 2) * k.repeat(1, 2, 1, 1) + F.gelu(y, approximate="tanh") + erf_gelu(y)
"""


@pytest.mark.parametrize("operator,after", [
    ("activation", "+ F.gelu(y) +"), ("activation", "+ F.silu(y) +"), ("activation", "+ F.relu(y) +"),
    ("activation", "(1.0 + torch.tanh(x / math.sqrt(2.0)))"),
    ("activation", 'F.gelu(y, approximate="tanh") + F.gelu(y, approximate="tanh")'),  # erf_gelu()
    ("scale", "s = torch.matmul(x, torch.transpose(k, -1, -2))"),
    ("scale", "torch.erf(x))"),
    ("transpose", "torch.matmul(x, k) * SCALE"), ("transpose", "return p * k.repeat("),
    ("repeat", "k.repeat_interleave(2, dim=1)"),
    ("upcast", "p = s.softmax(-1)"), ("softmax_dim", "s.softmax(-2)"),
    ("bias", 'F.linear(x, weights["w"], None)'), ("bias", 'weights["ln.weight"], None, 1e-5)'),
    ("norm", "y = y"), ("constant", "SCALE = 0.1875"), ("constant", "1.5e-05)"),
])
def test_generator_operators_beyond_the_examples(tmp_path, operator, after):
    path = tmp_path / "synthetic.py"
    path.write_text(SYNTHETIC)
    assert any(m["operator"] == operator and after in m["after"] for m in generate(path)), after


def _line_of(text, offset):
    return text.count("\n", 0, offset) + 1


def _simple_statements(tree):
    return [n for n in ast.walk(tree) if isinstance(n, ast.stmt)
            and not isinstance(n, (ast.FunctionDef, ast.For, ast.If, ast.While, ast.With))]


@pytest.mark.parametrize("ex", EXAMPLES)
def test_every_mutant_is_valid_python_and_differs_in_one_statement(ex):
    src = solution(ex).read_text()
    statements = _simple_statements(ast.parse(src))
    mutants = generate(solution(ex))
    assert len(mutants) > 30
    assert len({m["source"] for m in mutants}) == len(mutants), "duplicate mutants"
    assert [m["id"] for m in mutants] == [f"m{i + 1}" for i in range(len(mutants))]
    for m in mutants:
        mut = m["source"]
        ast.parse(mut)
        assert mut != src and m["operator"] and m["description"]
        p = 0
        while p < min(len(src), len(mut)) and src[p] == mut[p]:
            p += 1
        q = 0
        while q < min(len(src), len(mut)) - p and src[-1 - q] == mut[-1 - q]:
            q += 1
        start, end = p, len(src) - q  # the solution's changed span
        assert _line_of(src, start) == m["line"], m
        # one place: the change lies inside one simple statement (an assignment, a return)
        assert any(s.lineno <= _line_of(src, start) and _line_of(src, max(end - 1, start)) <= s.end_lineno
                   for s in statements), m
        first = " ".join(src.splitlines()[m["line"] - 1].split())
        assert m["before"].startswith(first)
        assert m["before"] != m["after"]


def test_sites_in_tap_main_block_and_docstrings_are_never_mutated(tmp_path):
    path = tmp_path / "sol.py"
    path.write_text('"""Docstring 1.5 with F.gelu(x) and 2 + 3."""\n'
                    "import torch\nfrom torch import Tensor\n\n"
                    "def tap(name: str, x: Tensor) -> Tensor:\n    return x * 1.0 + x\n\n"
                    "def forward(x: Tensor) -> Tensor:\n    \"\"\"Scale 0.5.\"\"\"\n"
                    "    return tap(\"a\", x) * 2.0\n\n"
                    "if __name__ == \"__main__\":\n    print(forward(torch.ones(3) + 7))\n")
    mutants = generate(path)
    assert [(m["operator"], m["after"]) for m in mutants] == [
        ("constant", 'return tap("a", x) * 3.0'), ("constant", 'return tap("a", x) * 1.33333')]


def test_entry_limits_mutants_to_reachable_functions_and_their_constants():
    by_fn = {m["function"] for m in generate(solution("qwen2"), "--entry", "mlp")}
    assert by_fn == {"mlp", "linear"}
    norm = generate(solution("qwen2"), "--entry", "rms_norm")
    assert {m["function"] for m in norm} == {"rms_norm", None}
    assert any(m["function"] is None and m["before"] == "EPS = 1e-6" for m in norm)
    assert not any("N_LAYERS" in m["before"] for m in norm)
    whole = generate(solution("qwen2"), "--entry", "forward")
    assert "silu" not in {m["function"] for m in whole}, "silu() is an entry of its own, not called"


def test_generator_refuses_an_unknown_entry():
    env = dict(os.environ, PYTHONPATH=str(ROOT / "python"))
    res = subprocess.run([PYTHON, "-m", "fmx.mutate", str(solution("qwen2")), "--entry", "main", "--json"],
                         env=env, capture_output=True, text=True, timeout=60)
    assert res.returncode == 2 and "decoder_layer" in res.stderr


# ---- fmx mutate ----

@pytest.mark.parametrize("ex", EXAMPLES)
def test_every_counted_mutant_is_killed_on_the_examples(reports, ex):
    """The issue's acceptance test: mutation score 100% on both example packs."""
    res, report = reports[ex]
    assert report is not None, res.stderr
    survivors = [f"{m['id']} {m['operator']} L{m['line']}: {m['before']} -> {m['after']}"
                 for m in report["mutants"] if m["verdict"] == "survived"]
    assert not survivors, "\n".join(survivors)
    assert res.returncode == 0 and report["status"] == "ok"
    assert report["summary"]["score"] == 1.0


@pytest.mark.parametrize("ex", EXAMPLES)
def test_json_report_schema_and_counts(reports, ex):
    res, report = reports[ex]
    assert res.returncode in (0, 1), res.stderr
    for key in ("status", "pack", "solution", "component", "entry", "engine", "device", "graded",
                "generator_ms", "total_ms", "mutants", "summary", "unused_equivalents"):
        assert key in report, key
    assert report["entry"] == "forward" and report["component"] == ""
    n = report["summary"]
    mutants = report["mutants"]
    assert n["mutants"] == len(mutants) == sum(n[v] for v in VERDICTS)
    for v in VERDICTS:
        assert n[v] == sum(m["verdict"] == v for m in mutants)
    assert n["score"] == pytest.approx(n["killed"] / (n["killed"] + n["survived"]))
    assert sum(o["mutants"] for o in n["operators"].values()) == len(mutants)
    assert (res.returncode == 1) == (n["survived"] > 0)
    for m in mutants:
        for key in ("id", "operator", "line", "function", "description", "before", "after",
                    "verdict", "decided_by", "ms"):
            assert key in m, (key, m)
        d = m["decided_by"]
        if m["verdict"] == "killed":
            assert d["kind"] in ("tap", "output", "outputs", "error") and d["probe"].startswith("p")
            if d["kind"] in ("tap", "output") and d.get("shape_ok", True) and d.get("dtype_ok", True):
                # failing means |got - want| > atol * rms + rtol * |want| somewhere
                # (max_rel is null when it is not finite: NaN/Inf outputs)
                assert d["name"] and (d["nonfinite"] > 0 or d["max_rel"] > min(d["atol"], d["rtol"])), d
            if d["kind"] == "error":
                assert d["stage"] in ("run", "bind") and d["message"]
        elif m["verdict"] == "invalid":
            assert d["kind"] == "compile" and d["message"]
        elif m["verdict"] == "survived":
            assert d["kind"] in ("tap", "output") and d["max_rel"] >= 0, d  # the closest call


def test_killed_mutants_name_the_first_divergence(reports):
    res, report = reports["qwen2"]
    by_after = {m["after"]: m for m in report["mutants"]}
    eps = by_after["EPS = 1.5e-06"]
    assert eps["verdict"] == "killed" and eps["decided_by"]["kind"] == "tap"
    assert eps["decided_by"]["name"] == "model.layers.0"
    layers = next(m for m in report["mutants"] if m["after"] == "N_LAYERS = 3")
    assert layers["decided_by"]["kind"] == "error" and "model.layers.2" in layers["decided_by"]["message"]


def test_invalid_mutants_are_reported_apart_and_not_counted(reports):
    res, report = reports["qwen2"]
    # a mutant is invalid when the file no longer loads as Python; graded
    # mutants are Python that runs (killed or survived), never invalid
    for m in report["mutants"]:
        if m["verdict"] == "invalid":
            assert m["decided_by"]["kind"] == "compile" and m["decided_by"]["message"], m
    n = report["summary"]
    assert n["killed"] + n["survived"] > 0
    assert n["score"] == pytest.approx(n["killed"] / (n["killed"] + n["survived"]))


def test_pack_equivalents_are_reported_with_their_reason(reports, packs):
    listed = json.loads(equivalents("qwen2").read_text())
    assert json.loads((packs["qwen2"] / "task.json").read_text())["equivalent_mutants"] == listed
    res, report = reports["qwen2"]
    eq = [m for m in report["mutants"] if m["verdict"] == "equivalent"]
    assert len(eq) == len(listed)
    for m in eq:
        assert m["equivalent"]["from"] == "task.json" and m["equivalent"]["reason"]
        assert m["equivalent"]["killed"] is False, "a listed equivalent that the probes kill is not equivalent"
    assert report["unused_equivalents"] == []


def test_equivalent_option_excludes_a_survivor(packs, tmp_path):
    """The MLP has no biases: dropping linear's bias survives there, until listed."""
    args = ("--component", "model.layers.0.mlp", "--entry", "mlp")
    res, report = mutate(packs["qwen2"], solution("qwen2"), *args)
    assert res.returncode == 1 and report["status"] == "survivors"
    [survivor] = [m for m in report["mutants"] if m["verdict"] == "survived"]
    assert survivor["operator"] == "bias" and survivor["function"] == "linear"
    assert {m["function"] for m in report["mutants"]} <= {"mlp", "linear"}
    eq = tmp_path / "eq.json"
    eq.write_text(json.dumps([{"operator": "bias", "line_contains": 'weights.get(prefix + "bias")',
                               "reason": "Qwen2MLP's projections have no bias"}]))
    res, report = mutate(packs["qwen2"], solution("qwen2"), *args, "--equivalent", eq)
    assert res.returncode == 0, res.stdout + res.stderr
    [m] = [m for m in report["mutants"] if m["verdict"] == "equivalent"]
    assert m["id"] == survivor["id"] and m["equivalent"]["from"] == str(eq)
    assert m["equivalent"]["reason"] == "Qwen2MLP's projections have no bias"
    n = report["summary"]
    assert n["survived"] == 0 and n["equivalent"] == 1 and n["score"] == 1.0
    assert n["killed"] == len(report["mutants"]) - 1 - n["invalid"]


def test_unused_equivalent_entry_is_listed(packs, tmp_path):
    eq = tmp_path / "eq.json"
    eq.write_text(json.dumps([{"after_contains": "no such code", "reason": "stale"}]))
    res, report = mutate(packs["gpt2"], solution("gpt2"), "--component", "transformer.h.0.mlp.act",
                         "--entry", "gelu_new", "--equivalent", eq)
    assert res.returncode == 0, res.stdout + res.stderr
    assert [u["reason"] for u in report["unused_equivalents"]] == ["stale"]
    assert {m["function"] for m in report["mutants"]} == {"gelu_new"}


def test_text_report_lists_mutants_and_ends_with_the_score(packs):
    res = fmx("mutate", packs["gpt2"], solution("gpt2"), "--component", "transformer.h.0.mlp",
              "--entry", "mlp")
    assert res.returncode == 0, res.stdout + res.stderr
    lines = res.stdout.strip().splitlines()
    assert lines[-1].startswith("mutation score 100.0%: ")
    assert "(1.0 + torch.tanh(inner))  ->  " in res.stdout and "killed" in res.stdout


def test_solution_that_does_not_pass_is_refused(packs, tmp_path):
    bad = tmp_path / "wrong.py"
    bad.write_text(solution("qwen2").read_text().replace("EPS = 1e-6", "EPS = 1e-3"))
    res, report = mutate(packs["qwen2"], bad)
    assert res.returncode == 2
    assert "does not pass" in res.stderr and "model.layers.0" in res.stderr
    assert report["status"] == "error" and report["error"]["stage"] == "solution"


@pytest.mark.parametrize("args,needle", [
    (["PACK"], "needs PACK and SOLUTION"),
    (["/nonexistent/pack", "SOL"], "task.json"),
    (["PACK", "/nonexistent.py"], "nonexistent.py"),
    (["PACK", "SOL", "--bogus"], "unknown option"),
    (["PACK", "SOL", "--entry", "main"], "main"),
    (["PACK", "SOL", "--equivalent", "BADEQ"], "needs a reason"),
])
def test_bad_command_lines_exit_2_with_a_message(packs, tmp_path, args, needle):
    bad_eq = tmp_path / "bad.json"
    bad_eq.write_text(json.dumps([{"operator": "bias", "line_contains": "bias"}]))
    subst = {"PACK": str(packs["qwen2"]), "SOL": str(solution("qwen2")), "BADEQ": str(bad_eq)}
    res = fmx("mutate", *[subst.get(a, a) for a in args])
    assert res.returncode == 2 and needle in res.stderr, res.stderr


def test_export_solution_prints_the_score_and_stores_equivalents(tmp_path):
    out = tmp_path / "gpt2"
    eq = tmp_path / "eq.json"
    eq.write_text(json.dumps([{"operator": "constant", "line_contains": "N_LAYERS = 2",
                               "reason": "demo entry"}]))
    res = fmx("export", "examples/models/gpt2.py:build", "-o", out, "--quiet", "--equivalent", eq,
              "--solution", solution("gpt2"))
    assert res.returncode == 0, res.stdout + res.stderr
    manifest = json.loads((out / "task.json").read_text())
    assert manifest["equivalent_mutants"] == json.loads(eq.read_text())
    assert f"{out}: mutation score 100.0%" in res.stdout
    assert "1 equivalent" in res.stdout


def test_export_refuses_a_bad_equivalent_file(tmp_path):
    eq = tmp_path / "eq.json"
    eq.write_text(json.dumps([{"operator": "bias", "reason": "names no mutant"}]))
    res = fmx("export", "examples/models/gpt2.py:build", "-o", tmp_path / "p", "--quiet",
              "--equivalent", eq)
    assert res.returncode == 2 and "line_contains or after_contains" in res.stderr
    assert not (tmp_path / "p").exists()


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
