"""`fmx export` + `fmx verify` as a user runs them, on the two example models.

The packs are exported once per session through the real CLI. Each test runs
`fmx verify` as a subprocess and reads its exit status and --json report:
reference solutions match (whole model and every component class), mutants
of them fail and the report names the module where they first diverge, and
every candidate-language rule and bad input gives a clear error with its line.
"""
import json
import os
import pathlib
import subprocess

import pytest

from fmx import safetensors

ROOT = pathlib.Path(__file__).resolve().parents[2]
FMX = os.environ.get("FMX_BIN", str(ROOT / "build" / "fmx"))
EXAMPLES = ("qwen2", "gpt2")


def fmx(*args, cwd=ROOT):
    return subprocess.run([FMX, *map(str, args)], cwd=cwd, capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, timeout=300)


def verify(pack, source, *args, tmp_path=None):
    """Runs fmx verify --json on a candidate given as a path or as source text."""
    path = source
    if tmp_path is not None:
        path = tmp_path / "candidate.py"
        path.write_text(source)
    res = fmx("verify", pack, path, "--json", *args)
    report = json.loads(res.stdout) if res.stdout.strip().startswith("{") else None
    return res, report


@pytest.fixture(scope="session")
def packs(example_packs):
    tasks = example_packs.tasks("qwen2", "gpt2", **{"qwen2-bf16": ("qwen2", "--dtype", "bfloat16")})
    return {name: tasks / name for name in ("qwen2", "gpt2", "qwen2-bf16")}


def solution(ex):
    return ROOT / "examples" / "solutions" / f"{ex}.py"


def entries(ex):
    return json.loads((ROOT / "examples" / "solutions" / f"{ex}.entries.json").read_text())


def first_instance(pack, cls):
    """Path of the first module of class cls that ran on the probes."""
    manifest = json.loads((pack / "task.json").read_text())
    called = {c["module"] for c in manifest["calls"]}
    return next(m["path"] for m in manifest["modules"] if m["class"] == cls and m["path"] in called)


# ---- reference solutions ----

@pytest.mark.parametrize("ex", EXAMPLES)
def test_reference_solution_matches_whole_model_on_every_probe(packs, ex):
    res, report = verify(packs[ex], solution(ex), "--probes", "all")
    assert res.returncode == 0, res.stdout + res.stderr
    assert report["status"] == "match"
    manifest = json.loads((packs[ex] / "task.json").read_text())
    # every probe but the generation steps (the decode task's: test_decode.py)
    assert report["graded"] == len([p for p in manifest["probes"] if "generation" not in p])
    for probe in report["probes"]:
        assert probe["pass"] and probe["outputs"][0]["name"] == "logits"
        # one tap per decoder layer, each graded against that layer's capture
        assert len(probe["taps"]) == 2 and all(t["pass"] for t in probe["taps"])


@pytest.mark.parametrize("ex,cls", [(ex, cls) for ex in EXAMPLES for cls in entries(ex)])
def test_reference_solution_matches_every_component_class(packs, ex, cls):
    path = first_instance(packs[ex], cls)
    res, report = verify(packs[ex], solution(ex), "--component", path, "--entry", entries(ex)[cls],
                         "--probes", "all")
    assert res.returncode == 0, res.stdout + res.stderr
    assert report["status"] == "match" and report["class"] == cls


def test_reference_solution_matches_bfloat16_export(packs):
    res, report = verify(packs["qwen2-bf16"], solution("qwen2"), "--probes", "all")
    assert res.returncode == 0, res.stdout + res.stderr
    assert report["probes"][0]["outputs"][0]["want_dtype"] == "bfloat16"


def test_text_report_names_probes_taps_and_verdict(packs):
    res = fmx("verify", packs["qwen2"], solution("qwen2"))
    assert res.returncode == 0
    assert "tap model.layers.1" in res.stdout and "out logits" in res.stdout
    visible = sum(p["visible"] and "generation" not in p
                  for p in json.loads((packs["qwen2"] / "task.json").read_text())["probes"])
    assert f"MATCH: {visible}/{visible} visible probe calls" in res.stdout
    assert "[hidden]" not in res.stdout  # visible probes only by default


# ---- mutants: they fail, and the report names where ----

def mutate(ex, old, new, count=1):
    src = solution(ex).read_text()
    assert src.count(old) >= count, old
    return src.replace(old, new)


MUTANTS = [
    ("wrong_eps", "qwen2", "EPS = 1e-6", "EPS = 1e-3", "model.layers.0"),
    ("missing_mlp_residual", "qwen2", 'return h + mlp(x, weights, prefix + "mlp.")',
     'return mlp(x, weights, prefix + "mlp.")', "model.layers.0"),
    ("rotary_halves_swapped", "qwen2", "torch.cat((-x[..., half:], x[..., :half]), dim=-1)",
     "torch.cat((x[..., :half], -x[..., half:]), dim=-1)", "model.layers.0"),
    ("kv_heads_tiled_not_interleaved", "qwen2",
     ".repeat_interleave(N_HEADS // N_KV_HEADS, dim=1)", ".repeat(1, N_HEADS // N_KV_HEADS, 1, 1)",
     "model.layers.0"),
    ("conv1d_weight_not_transposed", "gpt2", 'return conv1d(out, weights, prefix + "c_proj.")',
     'return F.linear(out, weights[prefix + "c_proj.weight"], weights[prefix + "c_proj.bias"])',
     "transformer.h.0"),
    ("final_norm_skipped", "gpt2", 'return layer_norm(h, weights, prefix + "ln_f.")', "return h",
     "output"),
]


@pytest.mark.parametrize("name,ex,old,new,where", MUTANTS, ids=[m[0] for m in MUTANTS])
def test_mutant_fails_and_first_divergence_is_named(packs, tmp_path, name, ex, old, new, where):
    res, report = verify(packs[ex], mutate(ex, old, new), tmp_path=tmp_path)
    assert res.returncode == 1, res.stdout + res.stderr
    assert report["status"] == "mismatch"
    assert report["first_divergence"]["name"] == where
    text = fmx("verify", packs[ex], tmp_path / "candidate.py").stdout
    assert f"first divergence at {where}" in text


def test_mutant_fails_component_verify_too(packs, tmp_path):
    src = mutate("qwen2", "EPS = 1e-6", "EPS = 1e-3")
    res, report = verify(packs["qwen2"], src, "--component", "model.layers.1.mlp", "--entry",
                         "mlp", tmp_path=tmp_path)
    assert res.returncode == 0, "the MLP has no norm: an eps mutant must still pass there"
    res, report = verify(packs["qwen2"], src, "--component", "model.norm", "--entry", "rms_norm",
                         tmp_path=tmp_path)
    assert res.returncode == 1 and report["first_divergence"]["name"] == "model.norm"


RMSNORM_CAST_BEFORE_WEIGHT = ('return weights[prefix + "weight"] * x.to(hidden_states.dtype)',
                              'return (weights[prefix + "weight"] * x).to(hidden_states.dtype)')


def test_rmsnorm_cast_order_bug_caught_in_bfloat16_only(packs, tmp_path):
    """The seed's bug: weight applied before the cast back to the input dtype.

    In float32 the cast is a no-op, so only the pack's bfloat16 probes see it."""
    src = mutate("qwen2", *RMSNORM_CAST_BEFORE_WEIGHT)
    res, report = verify(packs["qwen2"], src, "--probes", "all", tmp_path=tmp_path)
    assert res.returncode == 1, res.stdout
    failing = {p["dtype"] for p in report["probes"] if not p["pass"]}
    passing = {p["dtype"] for p in report["probes"] if p["pass"]}
    assert failing == {"bfloat16"} and passing == {"float32"}
    res, report = verify(packs["qwen2-bf16"], src, "--probes", "all", tmp_path=tmp_path)
    assert res.returncode == 1, res.stdout
    assert report["first_divergence"]["name"] == "model.layers.0"


# ---- the candidate language: every rule and bad input has a clear error ----

HEADER = """import torch
import torch.nn.functional as F
from torch import Tensor
from typing import Dict

"""


def candidate(body):
    return HEADER + body


@pytest.mark.parametrize("body,stage,needle,line", [
    ("def forward(input_ids: Tensor) -> Tensor:\n    return input_ids +\n", "compile",
     "SyntaxError", 7),
    ("import os\n", "compile", "import not allowed", 6),
    ("from os import path\n", "compile", "import not allowed", 6),
    # Python, run in the sandbox: no file can be opened or written
    ("def forward(input_ids: Tensor) -> Tensor:\n"
     "    return torch.from_file('/etc/passwd', size=4)\n", "run", "from_file", 7),
    ("def forward(input_ids: Tensor) -> Tensor:\n"
     "    torch.save(input_ids, '/tmp/x')\n    return input_ids\n", "run", "save", 7),
    ("def forward(input_ids: Tensor) -> Tensor:\n"
     "    return __import__('os').listdir('/')\n", "run", "import", 7),
], ids=["syntax_error", "import_not_allowed", "from_import", "from_file", "save",
        "dynamic_import"])
def test_refused_with_its_line(packs, tmp_path, body, stage, needle, line):
    res, report = verify(packs["qwen2"], candidate(body), tmp_path=tmp_path)
    assert res.returncode == 2, res.stdout + res.stderr
    assert report["status"] == "error" and report["error"]["stage"] == stage
    msg = report["error"]["message"]
    assert needle in msg
    assert f"candidate.py:{line}" in msg, msg


def test_torch_ops_run_with_their_python_meaning(packs, tmp_path):
    # torch.ops.aten.* is ordinary Python: graded on what it computes
    res, report = verify(packs["qwen2"], candidate(
        "def forward(input_ids: Tensor) -> Tensor:\n"
        "    return torch.ops.aten.relu(input_ids)\n"), tmp_path=tmp_path)
    assert res.returncode == 1, res.stdout + res.stderr
    assert report["status"] == "mismatch"


def test_missing_weight_key_names_the_key_and_line(packs, tmp_path):
    src = candidate("def forward(input_ids: Tensor, weights: Dict[str, Tensor]) -> Tensor:\n"
                    "    return F.embedding(input_ids, weights['model.embed.weight'])\n")
    res, report = verify(packs["qwen2"], src, tmp_path=tmp_path)
    assert res.returncode == 2
    assert report["error"]["stage"] == "run"
    assert "model.embed.weight" in report["error"]["message"]
    assert "candidate.py:7" in report["error"]["message"]


def test_runtime_shape_error_names_the_line(packs, tmp_path):
    src = candidate("def forward(input_ids: Tensor, weights: Dict[str, Tensor]) -> Tensor:\n"
                    "    h = F.embedding(input_ids, weights['model.embed_tokens.weight'])\n"
                    "    return h @ weights['model.embed_tokens.weight']\n")
    res, report = verify(packs["qwen2"], src, tmp_path=tmp_path)
    assert res.returncode == 2
    assert report["error"]["stage"] == "run" and "candidate.py:8" in report["error"]["message"]


def test_wrong_number_of_outputs_is_a_mismatch(packs, tmp_path):
    src = mutate("qwen2", 'return linear(model(input_ids, attention_mask, weights, "model."), '
                 'weights, "lm_head.")',
                 'y = linear(model(input_ids, attention_mask, weights, "model."), weights, '
                 '"lm_head.")\n    return y, y')
    src = src.replace("weights: Dict[str, Tensor]) -> Tensor:\n    y =",
                      "weights: Dict[str, Tensor]) -> Tuple[Tensor, Tensor]:\n    y =")
    res, report = verify(packs["qwen2"], src, tmp_path=tmp_path)
    assert res.returncode == 1, res.stdout + res.stderr
    assert "returned 2 outputs" in report["probes"][0]["error"]
    assert "Qwen2ForCausalLM returns 1 (logits)" in report["probes"][0]["error"]


def test_nan_output_never_passes(packs, tmp_path):
    src = mutate("qwen2", 'return linear(model(input_ids, attention_mask, weights, "model."), '
                 'weights, "lm_head.")',
                 'return linear(model(input_ids, attention_mask, weights, "model."), weights, '
                 '"lm_head.") * float("nan")')
    res, report = verify(packs["qwen2"], src, "--atol", "1e30", "--rtol", "1e30",
                         tmp_path=tmp_path)
    assert res.returncode == 1
    out = report["probes"][0]["outputs"][0]
    assert out["nonfinite"] == out["compared"] > 0 and not out["pass"]


def test_shape_mismatch_reported_as_such(packs, tmp_path):
    src = mutate("qwen2", 'return linear(model(input_ids, attention_mask, weights, "model."), '
                 'weights, "lm_head.")',
                 'return linear(model(input_ids, attention_mask, weights, "model."), weights, '
                 '"lm_head.")[:, :-1]')
    res, report = verify(packs["qwen2"], src, tmp_path=tmp_path)
    assert res.returncode == 1
    out = report["probes"][0]["outputs"][0]
    assert out["shape_ok"] is False and out["got_shape"][1] == out["want_shape"][1] - 1


def test_parameter_that_is_not_an_input_is_explained(packs, tmp_path):
    src = candidate("def forward(hidden: Tensor, weights: Dict[str, Tensor]) -> Tensor:\n"
                    "    return hidden\n")
    res, report = verify(packs["qwen2"], src, tmp_path=tmp_path)
    assert res.returncode == 2
    msg = report["error"]["message"]
    assert report["error"]["stage"] == "bind" and "'hidden'" in msg and "input_ids" in msg


def test_unknown_component_suggests_nearest(packs):
    res, report = verify(packs["qwen2"], solution("qwen2"), "--component", "model.layer.0.mlp")
    assert res.returncode == 2
    assert "model.layers.0.mlp" in report["error"]["message"]


def test_unknown_entry_lists_functions(packs):
    res, report = verify(packs["qwen2"], solution("qwen2"), "--entry", "main")
    assert res.returncode == 2
    assert "decoder_layer" in report["error"]["message"]


@pytest.mark.parametrize("args,needle", [
    (["/nonexistent/pack", "x.py"], "task.json"),
    (["PACK", "/nonexistent.py"], "nonexistent.py"),
    (["PACK"], "needs PACK and FILE"),
    (["PACK", "SOL", "--probes", "some"], "--probes"),
    (["PACK", "SOL", "--atol", "-1", "--rtol", "1"], "non-negative"),
    (["PACK", "SOL", "--bogus"], "unknown option"),
])
def test_bad_command_lines_exit_2_with_a_message(packs, args, needle):
    args = [str(packs["qwen2"]) if a == "PACK" else str(solution("qwen2")) if a == "SOL" else a
            for a in args]
    res = fmx("verify", *args)
    assert res.returncode == 2 and needle in res.stderr, res.stderr


# ---- packs round-trip: what the exporter wrote is what the C loader reads ----

@pytest.mark.parametrize("name", ["qwen2", "gpt2", "qwen2-bf16"])
def test_pack_tensors_read_back_bit_exact(packs, name):
    pack = packs[name]
    manifest = json.loads((pack / "task.json").read_text())
    weights = safetensors.load_file(str(pack / "weights.safetensors"))
    captures = safetensors.load_file(str(pack / "probes.safetensors"))
    keys = sorted(weights)[:3] + [manifest["probes"][1]["mask"]]
    keys += [io["key"] for io in manifest["calls"][-1]["outputs"] if io["kind"] == "tensor"]
    for key in keys:
        res = fmx("info", pack, "--tensor", key)
        assert res.returncode == 0, res.stderr
        got = json.loads(res.stdout)
        want = weights.get(key, captures.get(key))
        assert got["shape"] == list(want.shape)
        assert bytes.fromhex(got["hex"]) == safetensors.tensor_bytes(want).tobytes()


def test_pack_sources_and_coverage_intact(packs):
    manifest = json.loads((packs["qwen2"] / "task.json").read_text())
    res = fmx("info", packs["qwen2"], "--json")
    info = json.loads(res.stdout)
    assert info["files"] == manifest["files"] and info["classes"] == manifest["classes"]
    assert [m["path"] for m in info["modules"]] == [m["path"] for m in manifest["modules"]]
