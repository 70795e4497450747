"""Correctness is graded on what the file means in Python (DESIGN.md, decision 1).

A differential corpus: each candidate is a rewrite of the Qwen2 example's MLP
written with one construct that TorchScript 1.13 refuses or reads differently.
Each runs in plain Python (imported here, called on the pack's visible probe
inputs with the pack's weights, compared with the references at the pack's
tolerance) and through `fmx verify`; the verdicts must be identical, or fmx
refuses with a clear message. Any divergence fails.
"""
import importlib.util
import json
import os
import pathlib
import subprocess
import sys

import pytest
import torch

from fmx import safetensors

ROOT = pathlib.Path(__file__).resolve().parents[2]
FMX = os.environ.get("FMX_BIN", str(ROOT / "build" / "fmx"))
MLP = "model.layers.0.mlp"
HEAD = "import math\nimport torch\nimport torch.nn.functional as F\nfrom torch import Tensor\n" \
       "from typing import Dict, List, Optional, Tuple\n\n"


def mlp(gate="F.linear(x, weights['gate_proj.weight'])",
        up="F.linear(x, weights['up_proj.weight'])", pre="", post="y"):
    body = f"    g = {gate}\n    u = {up}\n"
    body += "".join(f"    {line}\n" for line in pre.splitlines() if line.strip())
    body += f"    y = F.linear(F.silu(g) * u, weights['down_proj.weight'])\n    return {post}\n"
    return body


CASES = {
    # the five constructs TorchScript 1.13 refused or read differently
    "unannotated_float_param":
        "def scale(t, b):\n    return t * b\n\n\ndef forward(x, weights):\n" +
        mlp(post="scale(y, 1.0)"),
    "tensor_bool":
        "def forward(x, weights):\n" +
        mlp(pre="keep = (x == x).bool()", post="torch.where(keep[..., :1], y, -y)"),
    "expand_star_shape":
        "def forward(x, weights):\n" +
        mlp(pre="z = torch.zeros(*x.shape[:-1], 1, dtype=x.dtype)",
            post="y + z.expand(*x.shape[:-1], x.shape[-1])"),
    "math_log2_int":
        "def forward(x, weights):\n" + mlp(post="y * (math.log2(4) / 2)"),
    "dtype_view_roundtrip":
        "def forward(x, weights):\n" +
        mlp(post="y.float().view(torch.int32).view(torch.float32).to(y.dtype)"),
    # more Python that must mean what it means
    "int_and_float_division":
        "def forward(x, weights):\n" +
        mlp(pre="n = x.shape[-1] // 2\nhalf = x.shape[-1] / 2", post="y * (2 * half / (2 * n))"),
    "negative_indexing":
        "def forward(x, weights):\n" + mlp(post="torch.cat([y[..., :-1], y[..., -1:]], -1)"),
    "slicing_with_steps":
        "def forward(x, weights):\n" +
        mlp(post="torch.stack([y[..., ::2], y[..., 1::2]], -1).flatten(-2)"),
    "einsum":
        "def forward(x, weights):\n" +
        mlp(gate="torch.einsum('bti,oi->bto', x, weights['gate_proj.weight'])"),
    "comprehension":
        "def forward(x, weights):\n" +
        mlp(pre="g, u = [F.linear(x, weights[k + '_proj.weight']) for k in ('gate', 'up')]"),
    "optional_without_refinement":
        "def add(t, bias: Optional[Tensor] = None):\n    return t if bias is None else t + bias\n"
        "\n\ndef forward(x, weights):\n" + mlp(post="add(y)"),
    "tuple_return":
        "def forward(x, weights):\n" + mlp(post="(y,)"),
    "in_place_on_locals":
        "def forward(x, weights):\n" +
        mlp(pre="g = g.clone()\ng.mul_(1.0)\nu = u + 0\nu.add_(0.0)"),
    "keyword_arguments":
        "def forward(x, weights):\n" +
        mlp(gate="F.linear(input=x, weight=weights['gate_proj.weight'], bias=None)"),
    "default_arguments":
        "def act(t, kind='silu', alpha=1.0):\n    return t * alpha\n\n\ndef forward(x, weights):\n" +
        mlp(post="act(y)"),
    "nested_function":
        "def forward(x, weights):\n    def proj(name, t):\n"
        "        return F.linear(t, weights[name + '_proj.weight'])\n" +
        mlp(gate="proj('gate', x)", up="proj('up', x)"),
    "finfo":
        "def forward(x, weights):\n" + mlp(post="y + torch.finfo(y.dtype).tiny * 0"),
    "math_functions":
        "def forward(x, weights):\n" +
        mlp(post="y * (math.sqrt(16) / 4) * math.exp(0.0) * math.cos(0.0)"),
    "weights_annotated_dict":
        "def forward(x: Tensor, weights: Dict[str, Tensor]) -> Tensor:\n" + mlp(),
    "tap_identity":
        "def tap(name, t):\n    return t\n\n\ndef forward(x, weights):\n" +
        mlp(post="tap('down_proj', y)"),
    # wrong programs, written with the same constructs: both must say so
    "wrong_dtype_view_reinterprets":
        "def forward(x, weights):\n" + mlp(post="y.float().view(torch.int32).to(y.dtype)"),
    "wrong_true_division":
        "def forward(x, weights):\n" + mlp(post="y * (x.shape[-1] / 3)"),
    "wrong_step_slice":
        "def forward(x, weights):\n" + mlp(post="torch.cat([y[..., 1::2], y[..., ::2]], -1)"),
}
WRONG = {k for k in CASES if k.startswith("wrong_")}


@pytest.fixture(scope="module")
def pack(example_packs):
    return example_packs.tasks("qwen2") / "qwen2"


@pytest.fixture(scope="module")
def probes(pack):
    """(inputs, weights, want, mask, tolerance) of every visible call of the MLP."""
    man = json.loads((pack / "task.json").read_text())
    tensors = safetensors.load_file(pack / "probes.safetensors")
    weights = safetensors.load_file(pack / "weights.safetensors")
    prefix = MLP + "."
    calls = []
    for call in man["calls"]:
        probe = man["probes"][call["probe"]]
        if call["module"] != MLP or not probe["visible"]:
            continue
        dtype = getattr(torch, probe.get("dtype", man["dtype"]))
        w = {k[len(prefix):]: v.to(dtype) for k, v in weights.items() if k.startswith(prefix)}
        x = tensors[call["inputs"][0]["key"]]
        want = tensors[call["outputs"][0]["key"]]
        tol = man["tolerance"][str(want.dtype).replace("torch.", "")]
        calls.append((x, w, want, tensors.get(probe.get("mask")), tol))
    assert calls
    return calls


def plain_python(source, probes, tmp_path):
    """The verdict of plain Python: 'match' if every visible call is within the
    pack's tolerance (valid tokens only), 'mismatch', or 'error'."""
    path = tmp_path / "plain.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("plain_candidate", path)
    mod = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(mod)
        verdict = "match"
        for x, w, want, mask, tol in probes:
            with torch.no_grad():
                got = mod.forward(x=x.clone(), weights=dict(w))
            if isinstance(got, tuple):
                got = got[0] if len(got) == 1 else got
            if not isinstance(got, torch.Tensor) or got.shape != want.shape or \
                    got.dtype != want.dtype:
                return "mismatch"
            g, r = got.double(), want.double()
            if mask is not None and r.dim() >= 2 and tuple(r.shape[:2]) == tuple(mask.shape):
                keep = mask.bool()
                g, r = g[keep], r[keep]
            scale = max(float(r.pow(2).mean().sqrt()), 1e-30)
            atol, rtol = tol["atol"], tol["rtol"]
            if not bool(((g - r).abs() <= atol * scale + rtol * r.abs()).all()):
                verdict = "mismatch"
        return verdict
    except Exception:  # noqa: BLE001 — any error is the verdict "error"
        return "error"
    finally:
        sys.modules.pop("plain_candidate", None)


@pytest.mark.parametrize("name", sorted(CASES))
def test_fmx_grades_the_python_meaning(name, pack, probes, tmp_path):
    source = HEAD + CASES[name]
    expected = plain_python(source, probes, tmp_path)
    assert expected == ("mismatch" if name in WRONG else "match"), \
        f"the corpus file itself is off: plain Python says {expected}"
    cand = tmp_path / "candidate.py"
    cand.write_text(source)
    res = subprocess.run([FMX, "verify", pack, cand, "--component", MLP, "--json"], cwd=ROOT,
                         capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=300)
    report = json.loads(res.stdout)
    assert report["status"] == expected, json.dumps(report.get("error"), indent=1)
    assert res.returncode == (0 if expected == "match" else 1)


def test_a_dict_return_is_refused_with_a_clear_message(pack, tmp_path):
    cand = tmp_path / "candidate.py"
    cand.write_text(HEAD + "def forward(x, weights):\n" + mlp(post="{'out': y}"))
    res = subprocess.run([FMX, "verify", pack, cand, "--component", MLP, "--json"], cwd=ROOT,
                         capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=300)
    report = json.loads(res.stdout)
    assert res.returncode == 2 and report["error"]["stage"] == "run"
    assert "returned dict" in report["error"]["message"]
    assert "tuple of Tensors" in report["error"]["message"]


def test_compile_check_says_what_torchscript_makes_of_the_file(pack, tmp_path):
    """Correct files TorchScript refuses get correctness from Python and the
    refusal as the compile check's finding; a file TorchScript reads with
    another meaning is not counted as compiling."""
    def check(body):
        cand = tmp_path / "candidate.py"
        cand.write_text(HEAD + body)
        res = subprocess.run([FMX, "verify", pack, cand, "--component", MLP, "--json"],
                             cwd=ROOT, capture_output=True, text=True, stdin=subprocess.DEVNULL,
                             timeout=300)
        report = json.loads(res.stdout)
        return report["status"], report["compile_check"]

    status, cc = check("def forward(x: Tensor, weights: Dict[str, Tensor]) -> Tensor:\n" + mlp())
    assert status == "match" and cc["compiled"] and cc["ran"] and cc["same_meaning"]
    status, cc = check(CASES["tensor_bool"])  # weights unannotated: not TorchScript
    assert status == "match" and not cc["compiled"] and cc["error"]
    status, cc = check(
        "def forward(x: Tensor, weights: Dict[str, Tensor]) -> Tensor:\n" +
        mlp(post="y.float().view(torch.int32).view(torch.float32).to(y.dtype)"))
    assert status == "match"
    assert not (cc["compiled"] and cc["ran"] and cc["same_meaning"]), cc


def test_a_file_graded_again_reuses_its_compile_check_verdict(pack, tmp_path):
    """The compile check is a property of the file: graded again by the same
    process (here `fmx verify PACK A B A`), the verdict is reused, not run
    again, and says so; another file gets its own."""
    a = tmp_path / "a.py"
    a.write_text((ROOT / "examples" / "solutions" / "qwen2.py").read_text())
    b = tmp_path / "b.py"
    b.write_text(a.read_text().replace("def forward(", "def forward(  ", 1))
    res = subprocess.run([FMX, "verify", pack, a, b, a, "--json"], cwd=ROOT, capture_output=True,
                         text=True, stdin=subprocess.DEVNULL, timeout=300)
    assert res.returncode == 0, res.stderr
    first, other, again = [json.loads(line)["compile_check"] for line in res.stdout.splitlines()]
    assert first["compiled"] and other["compiled"]
    assert "reused" not in first and "reused" not in other and again["reused"] is True
    assert {k: v for k, v in again.items() if k != "reused"} == first
