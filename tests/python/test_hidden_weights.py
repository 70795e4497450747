"""The hidden weight set and the constants the probes see (python/fmx/hidden.py,
python/fmx/constants.py, their use in python/fmx/export.py, and env/pack.c's check
of the hidden set at open, through `fmx info`).

The example packs (examples/models: Qwen2 with RMSNorm, GPT-2 with LayerNorm) are
exported once per module; the numbers a test recomputes it computes itself, from
the example model and the pack's files, not from what the exporter wrote.
Run from the repository root:
FMX_BIN=build/fmx PYTHONPATH=python /usr/bin/python3 -m pytest tests/python/test_hidden_weights.py
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from typing import Any, Dict

import pytest
import torch

from fmx.export import export, load_spec
from fmx.safetensors import load_file, read_header, save_file

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
TINY = os.path.join(HERE, "tiny_model.py")
EXAMPLES = os.path.join(ROOT, "examples", "models")
FMX = os.environ.get("FMX_BIN", os.path.join(ROOT, "build", "fmx"))
NORMS = {"qwen2": "Qwen2RMSNorm", "gpt2": "LayerNorm"}

sys.path.insert(0, HERE)
from test_export import _calls, _named, load_pack_model  # noqa: E402


def _exceeds(want: torch.Tensor, got: torch.Tensor, atol: float, rtol: float, keep: torch.Tensor) -> float:
    """The worst kept element's |got - want| / (atol·RMS(want) + rtol·|want|), as the verifier grades."""
    w, g = want.double()[keep], got.double()[keep]
    allow = atol * w.pow(2).mean().sqrt() + rtol * w.abs()
    return float(((g - w).abs() / allow).max())


@pytest.fixture(scope="module", params=["qwen2", "gpt2"])
def pack(request, tmp_path_factory) -> Dict[str, Any]:
    name = request.param
    spec = f"{os.path.join(EXAMPLES, name)}.py:build"
    out = str(tmp_path_factory.mktemp("hidden") / name)
    m = export(spec, out, quiet=True)
    return {"name": name, "dir": out, "m": m, "build": load_spec(spec)[1],
            "probes": load_file(os.path.join(out, "probes.safetensors")),
            "weights": load_file(os.path.join(out, "weights.safetensors")),
            "hidden": load_file(os.path.join(out, "weights_hidden.safetensors"))}


def _root_kwargs(m: Dict[str, Any], probes: Dict[str, torch.Tensor], probe: int) -> Dict[str, Any]:
    call = _calls(m, "", probe)[0]
    return {e["name"]: probes[e["key"]] if e["kind"] == "tensor" else e.get("value")
            for e in call["inputs"] if not e.get("default")}


def _fmx(*args: str) -> subprocess.CompletedProcess:
    if not os.path.exists(FMX):
        pytest.skip(f"{FMX} not built")
    return subprocess.run([FMX, *args], capture_output=True, text=True, cwd=ROOT, stdin=subprocess.DEVNULL)


# --------------------------------------------------------------------------- the hidden weight set


def test_hidden_set_has_the_public_layout_and_other_values(pack):
    m = pack["m"]
    assert m["hidden_weights"] == "weights_hidden.safetensors"
    assert m["hidden_init"]["kind"] == "model" and m["hidden_init"]["seed"] != m["seed"]
    public, _ = read_header(os.path.join(pack["dir"], "weights.safetensors"))
    hidden, _ = read_header(os.path.join(pack["dir"], "weights_hidden.safetensors"))
    assert {k: (v["dtype"], v["shape"]) for k, v in hidden.items() if k != "__metadata__"} == \
        {k: (v["dtype"], v["shape"]) for k, v in public.items() if k != "__metadata__"}
    for alias in m["weights"]["aliases"]:  # tied tensors stay stored once, under the same name
        assert alias not in hidden
    buffers = set(m["weights"]["buffers"])
    for name, w in pack["weights"].items():
        h = pack["hidden"][name]
        if name in buffers or not w.is_floating_point():
            assert torch.equal(h, w), name  # buffers (rotary inv_freq, causal masks) as the model made them
        else:
            assert not torch.equal(h, w), name
            assert bool(torch.isfinite(h).all()), name


def test_hidden_probes_are_captured_under_the_hidden_weights(pack):
    m, probes = pack["m"], pack["probes"]
    public = load_pack_model(pack["dir"], pack["build"])
    secret = load_pack_model(pack["dir"], pack["build"], hidden=True)
    tol = m["tolerance"]["float32"]
    hidden_probes = [i for i, p in enumerate(m["probes"]) if not p["visible"] and "dtype" not in p]
    assert hidden_probes
    for i, p in enumerate(m["probes"]):
        if "dtype" in p or "generation" in p:
            continue  # reduced-precision reruns: test_export's _rerun_root covers them; decode steps
            # take the cache convention (test_decode.py), their inner modules are checked below
        kwargs = _root_kwargs(m, probes, i)
        logits = _named(_calls(m, "", i)[0]["outputs"])["logits"]
        want = probes[logits["key"]]
        with torch.no_grad():
            under_public = public(**kwargs).logits
            under_hidden = secret(**kwargs).logits
        keep = probes[p["mask"]].bool()[..., None].expand(want.shape)
        if p["visible"]:
            assert torch.equal(under_public, want), p["name"]
        else:
            assert torch.equal(under_hidden, want), p["name"]
            # the public weights give another output, far past the tolerance
            assert _exceeds(want, under_public, tol["atol"], tol["rtol"], keep) > 100, p["name"]
    # every capture of a hidden probe comes from the hidden model: an inner module's too
    mlp = "model.layers.1.mlp" if pack["name"] == "qwen2" else "transformer.h.1.mlp"
    for i in hidden_probes:
        call = _calls(m, mlp, i)[0]
        x, want = probes[call["inputs"][0]["key"]], probes[call["outputs"][0]["key"]]
        with torch.no_grad():
            assert torch.equal(secret.get_submodule(mlp)(x), want)
            assert not torch.allclose(public.get_submodule(mlp)(x), want, rtol=1e-3, atol=0)


def test_hidden_outputs_are_finite_and_not_zero(pack):
    m, probes = pack["m"], pack["probes"]
    for i, p in enumerate(m["probes"]):
        if p["visible"]:
            continue
        for call in [c for c in m["calls"] if c["probe"] == i]:
            for e in call["outputs"]:
                if e["kind"] == "tensor" and probes[e["key"]].is_floating_point():
                    assert bool(torch.isfinite(probes[e["key"]]).all()), (p["name"], call["module"], e["name"])
        logits = probes[_named(_calls(m, "", i)[0]["outputs"])["logits"]["key"]]
        assert float(logits.float().abs().max()) > 0, p["name"]  # in bfloat16 too
        if p.get("dtype") == "bfloat16":
            assert logits.dtype == torch.bfloat16 and bool((logits != 0).float().mean() > 0.99)


# --------------------------------------------------------------------------- constants the probes see


def test_every_norm_eps_is_seen(pack):
    m, probes = pack["m"], pack["probes"]
    model = pack["build"]()
    norms = [path for path, mod in model.named_modules() if type(mod).__name__ == NORMS[pack["name"]]]
    assert len(norms) == 5
    assert m["unseen_constants"] == []
    assert [c["module"] for c in m["constants"]] == norms
    for c in m["constants"]:
        assert c["constant"] == ("variance_epsilon" if pack["name"] == "qwen2" else "eps")
        assert c["times_1.5"]["exceeds"] > 100 and c["over_1.5"]["exceeds"] > 100, c

    # Recomputed here: each norm with eps x1.5 on a probe's captured input, under that probe's weights.
    models = {True: load_pack_model(pack["dir"], pack["build"]),
              False: load_pack_model(pack["dir"], pack["build"], hidden=True)}
    for path in norms:
        best = {True: 0.0, False: 0.0}
        for i, p in enumerate(m["probes"]):
            if "dtype" in p:
                continue
            norm = models[p["visible"]].get_submodule(path)
            attr = "variance_epsilon" if pack["name"] == "qwen2" else "eps"
            call = _calls(m, path, i)[0]
            x, want = probes[call["inputs"][0]["key"]], probes[call["outputs"][0]["key"]]
            eps = getattr(norm, attr)
            with torch.no_grad():
                assert torch.equal(norm(x), want)
                setattr(norm, attr, eps * 1.5)
                got = norm(x)
                setattr(norm, attr, eps)
            keep = probes[p["mask"]].bool()[..., None].expand(want.shape)
            best[p["visible"]] = max(best[p["visible"]], _exceeds(want, got, 1e-5, 1e-5, keep))
        assert best[False] > 100, (path, best)  # the hidden set makes eps matter far past the tolerance
        assert best[False] > 10 * best[True], (path, best)


def test_unseen_constants_are_listed(tmp_path, capsys):
    src = tmp_path / "blind.py"
    src.write_text(textwrap.dedent('''
        import torch
        from torch import nn

        class FixedNorm(nn.Module):
            """A norm whose forward ignores its eps attribute."""
            def __init__(self, dim):
                super().__init__()
                self.weight = nn.Parameter(torch.ones(dim))
                self.eps = 1e-6

            def forward(self, x):
                return self.weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)

        class Blind(nn.Module):
            def __init__(self):
                super().__init__()
                self.in_norm = nn.LayerNorm(8)   # normalizes the input itself: no weight scales it
                self.proj = nn.Linear(8, 8)
                self.fixed = FixedNorm(8)

            def forward(self, pixels):
                return self.fixed(self.proj(self.in_norm(pixels)))

        def make():
            return Blind()

        def fmx_inputs(model, batch, seq, padding, generator):
            return {"pixels": torch.randn(batch, seq, 8, generator=generator)}
        '''))
    m = export(f"{src}:make", str(tmp_path / "b"), probes=1, hidden=1)
    unseen = {u["module"]: u for u in m["unseen_constants"]}
    assert set(unseen) == {"in_norm", "fixed"}
    assert "within the tolerance" in unseen["in_norm"]["why"] and "×1.5 by at most" in unseen["in_norm"]["why"]
    assert "does not change the module's outputs" in unseen["fixed"]["why"]
    err = capsys.readouterr().err
    assert "unseen constants (2 of 2)" in err and "  in_norm eps: " in err
    r = _fmx("info", str(tmp_path / "b"))
    assert r.returncode == 0, r.stderr
    assert "unseen constants (2 of 2)" in r.stdout and "  fixed eps: " in r.stdout


# --------------------------------------------------------------------------- how the set is drawn


def _noise_ratio(public: torch.Tensor, hidden: torch.Tensor) -> float:
    return float((hidden - public).std() / public.std())


def test_perturbed_set_for_a_model_handed_in(tmp_path):
    """A model object (pretrained weights, --hf): the hidden set is a perturbation of its own."""
    import tiny_model

    torch.manual_seed(3)
    model = tiny_model.build(num_hidden_layers=1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    m = export(model, str(tmp_path / "p"), quiet=True, probes=1, hidden=1)
    assert m["hidden_init"]["kind"] == "perturbed" and m["hidden_init"]["perturb"] == 0.25
    for k, v in model.state_dict().items():  # the caller's model holds its own weights again
        assert torch.equal(v, before[k]), k
    public = load_file(str(tmp_path / "p" / "weights.safetensors"))
    hidden = load_file(str(tmp_path / "p" / m["hidden_weights"]))
    scaled = {n: g["scale"] for g in m["hidden_init"]["norm_inputs"] for n in g["params"]}
    for n in m["hidden_init"]["residual"]:
        scaled[n] = m["hidden_init"]["residual_scale"]
    assert "model.embed_tokens.weight" in scaled and "model.layers.0.self_attn.o_proj.weight" in scaled
    up = public["model.layers.0.mlp.up_proj.weight"]  # not scaled: only the noise
    assert "model.layers.0.mlp.up_proj.weight" not in scaled
    assert 0.2 < _noise_ratio(up, hidden["model.layers.0.mlp.up_proj.weight"]) < 0.3
    emb = "model.embed_tokens.weight"  # the residual stream: noise, then the scale
    s = m["hidden_init"]["residual_scale"]
    assert s < 1 and 0.2 < _noise_ratio(public[emb] * s, hidden[emb]) < 0.3
    q = "model.layers.0.self_attn.q_proj.weight"  # feeds the q-norm: scaled by its own factor
    assert q in scaled and scaled[q] < 1
    assert m["unseen_constants"] == []


def test_sensitive_set_is_a_second_draw(tmp_path):
    m = export(f"{TINY}:build", str(tmp_path / "s"), quiet=True, probes=1, hidden=1, init=True, seed=4)
    assert m["hidden_init"]["kind"] == "sensitive" and m["hidden_init"]["seed"] == 4 + 0x68696464
    assert "perturb" not in m["hidden_init"]
    public = load_file(str(tmp_path / "s" / "weights.safetensors"))
    hidden = load_file(str(tmp_path / "s" / m["hidden_weights"]))
    w = "model.layers.0.mlp.up_proj.weight"  # an unscaled linear: an independent draw, same std
    assert abs(float(torch.corrcoef(torch.stack([public[w].flatten(), hidden[w].flatten()]))[0, 1])) < 0.1
    assert 0.9 < float(hidden[w].std() / public[w].std()) < 1.1
    again = export(f"{TINY}:build", str(tmp_path / "s2"), quiet=True, probes=1, hidden=1, init=True, seed=4)
    assert again["hidden_init"] == m["hidden_init"]
    assert all(torch.equal(t, load_file(str(tmp_path / "s2" / m["hidden_weights"]))[k]) for k, t in hidden.items())


# --------------------------------------------------------------------------- the C loader, through fmx info


def test_fmx_info_shows_the_hidden_set(pack):
    r = _fmx("info", pack["dir"])
    assert r.returncode == 0, r.stderr
    assert "hidden weights: weights_hidden.safetensors (hidden probes run under it)" in r.stdout
    assert "constants: each of 5 eps-like constants" in r.stdout
    r = _fmx("info", pack["dir"], "--json")
    info = json.loads(r.stdout)
    assert info["hidden_weights"] == "weights_hidden.safetensors"
    assert info["unseen_constants"] == [] and len(info["constants"]) == 5


def test_pack_without_a_hidden_set_still_opens(pack, tmp_path):
    copy = str(tmp_path / "old")
    shutil.copytree(pack["dir"], copy)
    m = json.load(open(os.path.join(copy, "task.json")))
    for key in ("hidden_weights", "hidden_init", "constants", "unseen_constants"):
        del m[key]
    json.dump(m, open(os.path.join(copy, "task.json"), "w"))
    os.remove(os.path.join(copy, "weights_hidden.safetensors"))
    r = _fmx("info", copy)
    assert r.returncode == 0, r.stderr
    assert "hidden weights: none (hidden probes run under the public weights)" in r.stdout
    assert "constants: not measured" in r.stdout
    assert json.loads(_fmx("info", copy, "--json").stdout)["hidden_weights"] is None


def test_hidden_set_with_a_wrong_shape_is_refused(pack, tmp_path):
    copy = str(tmp_path / "bad")
    shutil.copytree(pack["dir"], copy)
    hidden = dict(pack["hidden"])
    name = sorted(k for k, t in hidden.items() if t.dim() == 2)[0]
    hidden[name] = hidden[name].t().contiguous()  # same bytes, the shape transposed
    save_file(hidden, os.path.join(copy, "weights_hidden.safetensors"))
    r = _fmx("info", copy)
    assert r.returncode == 2
    rows, cols = pack["weights"][name].shape
    assert f"tensor '{name}' is float32 [{cols}, {rows}] here but float32 [{rows}, {cols}] in weights.safetensors" \
        in r.stderr, r.stderr
    del hidden[name]  # a tensor missing altogether
    save_file(hidden, os.path.join(copy, "weights_hidden.safetensors"))
    r = _fmx("info", copy)
    assert r.returncode == 2 and f"tensor '{name}' is missing here but in weights.safetensors" in r.stderr
