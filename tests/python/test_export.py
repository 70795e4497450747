"""Tests for python/fmx: the safetensors reader/writer and the task-pack exporter.

Most tests share one export of tests/python/tiny_model.py (a module-scoped
fixture); the example models under examples/models are exported when present.
Run from the repository root: PYTHONPATH=python /usr/bin/python3 -m pytest tests/python/test_export.py
"""

from __future__ import annotations

import copy
import json
import os
import re
import subprocess
import sys
import textwrap
from typing import Any, Dict, List

import pytest
import torch

from fmx import __version__
from fmx.export import ExportError, export, main, op_name
from fmx.safetensors import Writer, load_file, read_header, save_file

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
TINY = os.path.join(HERE, "tiny_model.py")
EXAMPLES = os.path.join(ROOT, "examples", "models")


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The tensor reinterpreted as integers of the same width, for bit-exact comparison."""
    width = {8: torch.int64, 4: torch.int32, 2: torch.int16, 1: torch.uint8}[t.element_size()]
    return t.view(width) if t.dtype != torch.bool else t.to(torch.uint8)


def _all_dtypes() -> Dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    special = torch.tensor([0.0, -0.0, 1.5, float("inf"), float("-inf"), float("nan"), 1e-30, -3.25])
    out = {}
    for name, dt in [("f64", torch.float64), ("f32", torch.float32), ("f16", torch.float16), ("bf16", torch.bfloat16)]:
        out[name] = torch.cat([special, torch.randn(13, generator=g)]).to(dt).reshape(3, 7)
    out["i64"] = torch.tensor([-(2**63), 2**63 - 1, 0, -1, 5])
    out["i32"] = torch.tensor([-(2**31), 2**31 - 1, 7], dtype=torch.int32)
    out["i16"] = torch.tensor([-(2**15), 2**15 - 1, 3], dtype=torch.int16)
    out["i8"] = torch.tensor([-128, 127, 0], dtype=torch.int8)
    out["u8"] = torch.tensor([0, 255, 17], dtype=torch.uint8)
    out["bool"] = torch.tensor([True, False, True])
    out["scalar"] = torch.tensor(2.5)
    out["empty"] = torch.zeros(0, 4)
    out["strided"] = torch.arange(24, dtype=torch.float32).reshape(4, 6).t()  # not contiguous
    return out


def _check_layout(path: str) -> Dict[str, Any]:
    """The header, after checking the layout rules every safetensors reader relies on."""
    header, start = read_header(path)
    assert start % 8 == 0
    keys = [k for k in header if k != "__metadata__"]
    assert keys == sorted(keys)
    spans = sorted(tuple(header[k]["data_offsets"]) for k in keys)
    pos = 0
    for begin, end in spans:  # contiguous, no gaps, no overlaps
        assert begin == pos and end >= begin
        pos = end
    assert os.path.getsize(path) == start + pos
    sizes = {"F64": 8, "I64": 8, "F32": 4, "I32": 4, "F16": 2, "BF16": 2, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}
    for k in keys:
        assert (start + header[k]["data_offsets"][0]) % sizes[header[k]["dtype"]] == 0, k
    return header


def test_safetensors_roundtrip_all_dtypes(tmp_path):
    tensors = _all_dtypes()
    path = str(tmp_path / "t.safetensors")
    save_file(tensors, path, metadata={"who": "test"})
    header = _check_layout(path)
    assert header["__metadata__"] == {"who": "test"}
    assert header["bf16"]["dtype"] == "BF16" and header["bool"]["dtype"] == "BOOL"
    back = load_file(path)
    assert set(back) == set(tensors)
    for k, t in tensors.items():
        assert back[k].dtype == t.dtype and back[k].shape == t.shape, k
        assert torch.equal(_bits(back[k].contiguous()), _bits(t.contiguous())), k


def test_safetensors_streaming_writer_dedupes(tmp_path):
    tensors = _all_dtypes()
    path = str(tmp_path / "w.safetensors")
    w = Writer(path, metadata={"a": "b"})
    for k in sorted(tensors, reverse=True):  # arrival order differs from the sorted header
        assert w.add(k, tensors[k], dedupe=True) == k
    assert w.add("copy", tensors["f32"].clone(), dedupe=True) == "f32"
    assert w.add("other_shape", tensors["f32"].reshape(7, 3), dedupe=True) == "other_shape"
    with pytest.raises(KeyError):
        w.add("f32", tensors["f32"])
    w.close()
    assert not [f for f in os.listdir(tmp_path) if ".part" in f]
    _check_layout(path)
    back = load_file(path)
    assert "copy" not in back and set(back) == set(tensors) | {"other_shape"}
    for k, t in tensors.items():
        assert torch.equal(_bits(back[k].contiguous()), _bits(t.contiguous())), k


# --------------------------------------------------------------------------- the tiny model pack


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("packs") / "tiny")
    manifest = export(f"{TINY}:build", out, quiet=True)
    with open(os.path.join(out, "task.json")) as f:
        on_disk = json.load(f)
    assert on_disk == manifest
    return {"dir": out, "m": manifest, "probes": load_file(os.path.join(out, "probes.safetensors")),
            "weights": load_file(os.path.join(out, "weights.safetensors")),
            "hidden": load_file(os.path.join(out, manifest["hidden_weights"]))}


def _calls(m: Dict[str, Any], module: str, probe: int = 0) -> List[Dict[str, Any]]:
    return [c for c in m["calls"] if c["module"] == module and c["probe"] == probe]


def _named(entries: List[Dict[str, Any]]) -> Dict[str, Dict[str, Any]]:
    return {e["name"]: e for e in entries}


def _module(m: Dict[str, Any], path: str) -> Dict[str, Any]:
    return next(x for x in m["modules"] if x["path"] == path)


def test_manifest_header(tiny):
    m = tiny["m"]
    assert m["format"] == "fmx-pack" and m["version"] == 1
    assert m["name"] == "tiny" and m["dtype"] == "float32" and m["seed"] == 0
    assert m["created_by"] == {"fmx": __version__, "torch": torch.__version__, "device": "cpu"}
    assert m["source"]["kind"] == "file" and m["source"]["spec"].endswith("tiny_model.py:build")
    assert m["root_class"] == "TinyForCausalLM"
    assert m["config"]["vocab_size"] == 97 and m["config"]["extra"] == [1, 2]
    assert m["tolerance"]["float32"] == {"atol": 1e-5, "rtol": 1e-5}


def test_module_tree(tiny):
    import tiny_model

    m = tiny["m"]
    model = tiny_model.build()
    assert [x["path"] for x in m["modules"]] == [p for p, _ in model.named_modules()]
    root = m["modules"][0]
    assert root["path"] == "" and root["parent"] is None and root["children"] == ["model", "lm_head"]
    for x in m["modules"]:
        for child in x["children"]:
            assert _module(m, child)["parent"] == x["path"]
    layer = _module(m, "model.layers.0")
    assert layer["class"] == "TinyDecoderLayer"
    assert layer["forward_params"] == ["hidden_states", "attention_mask", "position_embeddings", "past_key_value", "**kwargs"]
    assert _module(m, "model.layers")["forward_params"] == []
    assert _module(m, "model.layers")["ops"] is None  # a ModuleList never runs


def test_every_tensor_key_is_stored_with_its_shape(tiny):
    m, probes = tiny["m"], tiny["probes"]
    n = 0
    for call in m["calls"]:
        for e in call["inputs"] + call["outputs"]:
            if e["kind"] == "tensor":
                t = probes[e["key"]]
                assert list(t.shape) == e["shape"], (call["module"], e["name"])
                assert {torch.float32: "F32", torch.bfloat16: "BF16", torch.int64: "I64"}[t.dtype] == e["dtype"]
                n += 1
            else:
                assert "key" not in e
    assert n > 100
    for p in m["probes"]:
        assert p["mask"] in probes


def test_calls_are_in_start_order_with_indices(tiny):
    m = tiny["m"]
    probes_seen = [c["probe"] for c in m["calls"]]
    assert probes_seen == sorted(probes_seen)
    for i in range(len(m["probes"])):
        calls = [c for c in m["calls"] if c["probe"] == i]
        assert calls[0]["module"] == ""  # the root starts first
        assert [c["module"] for c in calls[:3]] == ["", "model", "model.embed_tokens"]
        norms = _calls(m, "model.layers.1.self_attn.qk_norm", i)
        assert [c["index"] for c in norms] == [0, 1]  # one module, called twice per attention
    assert len(_calls(m, "model.layers.0", 0)) == 1


def test_inputs_are_named_as_in_forward(tiny):
    m = tiny["m"]
    attn = _calls(m, "model.layers.0.self_attn", 1)[0]
    assert [e["name"] for e in attn["inputs"]] == [
        "hidden_states", "position_embeddings_0", "position_embeddings_1", "attention_mask",
        "past_key_value", "output_attentions"]
    ins = _named(attn["inputs"])
    assert ins["position_embeddings_0"]["shape"] == [1, 13, 8]  # the (cos, sin) tuple, flattened
    assert ins["past_key_value"]["kind"] == "cache" and ins["past_key_value"]["repr"] == "TinyCache"
    assert ins["output_attentions"] == {"name": "output_attentions", "kind": "value", "value": False, "default": True}
    layer = _named(_calls(m, "model.layers.0", 1)[0]["inputs"])
    assert layer["use_cache"] == {"name": "use_cache", "kind": "value", "value": True}  # from **kwargs
    root = _named(_calls(m, "", 1)[0]["inputs"])
    assert root["input_ids"]["kind"] == "tensor" and root["input_ids"]["shape"] == [2, 13]
    assert root["position_ids"] == {"name": "position_ids", "kind": "none", "default": True}


def test_outputs_flattened_with_none_and_cache(tiny):
    m = tiny["m"]
    root = _calls(m, "", 0)[0]["outputs"]
    assert [(e["name"], e["kind"]) for e in root] == [("logits", "tensor"), ("past_key_values", "cache"), ("hidden_states", "none")]
    base = _named(_calls(m, "model", 0)[0]["outputs"])
    assert base["past_key_values"]["kind"] == "cache"  # a tuple of (k, v) tuples, by its name
    attn = _calls(m, "model.layers.0.self_attn", 0)[0]["outputs"]
    assert [(e["name"], e["kind"]) for e in attn] == [("0", "tensor"), ("1", "none")]
    rot = _calls(m, "model.rotary_emb", 0)[0]["outputs"]
    assert [e["name"] for e in rot] == ["0", "1"]
    layer = _calls(m, "model.layers.0", 0)[0]["outputs"]
    assert [e["name"] for e in layer] == ["0"]


def test_token_aligned_flags(tiny):
    m = tiny["m"]
    for probe, (b, t) in [(0, (1, 8)), (1, (2, 13))]:
        logits = _calls(m, "", probe)[0]["outputs"][0]
        assert logits["shape"] == [b, t, 97] and logits["token_aligned"] is True
        norm = _calls(m, "model.layers.0.self_attn.qk_norm", probe)[0]["outputs"][0]
        assert norm["shape"] == [b, 4, t, 8] and norm["token_aligned"] is False
    # (1, T, D) rotary tables line up with the tokens only when the batch is 1
    assert _calls(m, "model.rotary_emb", 0)[0]["outputs"][0]["token_aligned"] is True
    assert _calls(m, "model.rotary_emb", 1)[0]["outputs"][0]["token_aligned"] is False


def test_captured_values_are_consistent(tiny):
    import tiny_model

    m, probes = tiny["m"], tiny["probes"]
    for probe in range(len(m["probes"])):
        ln = _calls(m, "model.layers.0.input_layernorm", probe)[0]
        attn = _calls(m, "model.layers.0.self_attn", probe)[0]
        x = probes[ln["inputs"][0]["key"]]  # float32, or bfloat16 on the reduced-precision probes
        weights = tiny["weights"] if m["probes"][probe]["visible"] else tiny["hidden"]  # hidden probes: hidden set
        w = weights["model.layers.0.input_layernorm.weight"]
        ref = tiny_model.TinyRMSNorm(32, 1e-6)
        ref.weight.data.copy_(w)
        ref.to(x.dtype)  # the weight cast as the verifier casts it
        with torch.no_grad():
            assert torch.equal(ref(x), probes[ln["outputs"][0]["key"]])
        assert torch.equal(probes[attn["inputs"][0]["key"]], probes[ln["outputs"][0]["key"]])


def load_pack_model(pack: str, build, hidden: bool = False) -> torch.nn.Module:
    """A differently seeded model built by `build` holding the pack's weights (its hidden set with
    `hidden`), ties restored from the aliases."""
    with open(os.path.join(pack, "task.json")) as f:
        m = json.load(f)
    weights = dict(load_file(os.path.join(pack, m["hidden_weights"] if hidden else "weights.safetensors")))
    for alias, target in m["weights"]["aliases"].items():
        weights[alias] = weights[target]
    torch.manual_seed(12345)
    model = build()
    state = model.state_dict()
    persistent = {k: v for k, v in weights.items() if k in state}
    assert set(persistent) == set(state)
    model.load_state_dict(persistent)
    for name in m["weights"]["non_persistent"]:
        owner, _, leaf = name.rpartition(".")
        model.get_submodule(owner)._buffers[leaf].copy_(weights[name])
    return model


def _rerun_root(pack: str, build) -> None:
    """Load the pack's weights into a differently seeded model and rerun the root calls; a hidden
    probe reruns under the hidden weight set, a reduced-precision probe on a copy in its dtype
    (weights cast, as the verifier casts them)."""
    with open(os.path.join(pack, "task.json")) as f:
        m = json.load(f)
    probes = load_file(os.path.join(pack, "probes.safetensors"))
    models = {}
    for visible in (True, False):
        model = load_pack_model(pack, build, hidden=not visible)
        models[(visible, m["dtype"])] = model
        for p in m["probes"]:
            if p.get("dtype", m["dtype"]) != m["dtype"]:
                models[(visible, p["dtype"])] = copy.deepcopy(model).to(getattr(torch, p["dtype"]))
    for call in [c for c in m["calls"] if c["module"] == "" and "generation" not in m["probes"][c["probe"]]]:
        kwargs = {}
        for e in call["inputs"]:
            if e.get("default"):
                continue
            kwargs[e["name"]] = probes[e["key"]] if e["kind"] == "tensor" else e.get("value")
        probe = m["probes"][call["probe"]]
        with torch.no_grad():
            out = models[(probe["visible"], probe.get("dtype", m["dtype"]))](**kwargs)
        for e in call["outputs"]:
            if e["kind"] == "tensor":
                got = getattr(out, e["name"]) if not e["name"].isdigit() else out[int(e["name"])]
                assert torch.equal(got, probes[e["key"]]), (call["probe"], e["name"])


def test_root_output_reproduces_from_pack(tiny):
    import tiny_model

    _rerun_root(tiny["dir"], tiny_model.build)


def test_coverage(tiny):
    m = tiny["m"]
    files = m["files"]
    from fmx.export import display_path

    rel = display_path(TINY)
    assert list(files) == [rel]
    source = files[rel]["source"]
    lines = source.splitlines()
    with open(TINY) as f:
        assert f.read() == source
    cov = files[rel]["coverage"]

    def line_of(text: str) -> str:
        return str(next(i for i, s in enumerate(lines, 1) if text in s))

    # two layers x eight probes (six, and two reruns in bfloat16)
    assert cov[line_of("return out, None")] == 16
    assert cov[line_of("if output_attentions:")] == 16
    assert line_of("# never-runs") not in cov
    assert line_of("def forward(self, x: Tensor) -> Tensor:") not in cov  # def lines ran at import
    assert cov[line_of("var = hidden_states.pow(2)")] == 8 * (2 * 4 + 1)  # 4 norms per layer + the final
    # every covered line is inside the file
    assert all(1 <= int(n) <= len(lines) for n in cov)


def test_classes_point_at_class_lines(tiny):
    m = tiny["m"]
    lines = next(iter(m["files"].values()))["source"].splitlines()
    names = {x["class"] for x in m["modules"]}
    assert {"TinyForCausalLM", "TinyPreTrainedModel", "TinyAttention", "Linear"} <= set(m["classes"])
    for name, c in m["classes"].items():
        if c["file"] is None:
            assert name in names and c["module"].startswith("torch.nn")
            continue
        assert lines[c["start"] - 1].startswith(f"class {name}"), name
        assert c["end"] >= c["start"] and lines[c["end"] - 1].strip()
    assert m["classes"]["TinyForCausalLM"]["bases"] == ["TinyPreTrainedModel"]
    assert m["classes"]["TinyAttention"]["bases"] == []


def test_op_trace(tiny):
    m = tiny["m"]
    q = _module(m, "model.layers.0.self_attn.q_proj")["ops"]
    assert m["traced_probes"] == ["p1", "p2", "p6"]  # the first padded probe is the one shown
    assert q == [{"op": "torch.nn.functional.linear", "in": [[2, 13, 32], [32, 32], [32]], "out": [[2, 13, 32]],
                  "x": [{"in": "input"}, {"w": "weight"}, {"w": "bias"}], "kw": {}, "y": [0]}]
    o = _module(m, "model.layers.0.self_attn.o_proj")["ops"]
    assert o[0]["op"] == "torch.nn.functional.linear" and o[0]["in"][2:] == [] and o[0]["args"] == "T, T, None"
    attn = _module(m, "model.layers.0.self_attn")["ops"]
    calls = [x["call"] for x in attn if "call" in x]
    assert calls == ["model.layers.0.self_attn." + c for c in ("q_proj", "k_proj", "v_proj", "qk_norm", "qk_norm", "o_proj")]
    names = [x["op"] for x in attn if "op" in x]
    assert "torch.matmul" in names and "torch.nn.functional.softmax" in names and "torch.cat" in names
    assert not any("__get__" in n or n.endswith(".size") for n in names)
    view = next(x for x in attn if x.get("op") == "torch.Tensor.view")
    # p1's numbers, and the dataflow: batch and sequence sizes follow the input (they changed
    # between the traced probes), the head count and size stay numbers
    q_out = next(x for x in attn if x.get("call", "").endswith("q_proj"))["y"][0]
    seen = {"in": [[2, 13, 32]], "out": [[2, 13, 4, 8]], "args": "T, 2, 13, 4, 8"}
    assert view == dict(seen, op="torch.Tensor.view", kw={}, y=[view["y"][0]], x=[
        {"v": q_out}, {"dim": [{"in": "hidden_states"}, 0]}, {"dim": [{"in": "hidden_states"}, 1]}, 4, 8])
    # ops run inside q_proj belong to q_proj, not to the attention
    assert "torch.nn.functional.linear" not in names
    root = _module(m, "")
    assert [x["call"] for x in root["ops"]] == ["model", "lm_head"]
    assert root["dataflow"] == "general" and root["inputs"] == ["input_ids", "attention_mask"]
    assert root["returns"] == [{"v": root["ops"][-1]["y"][0]}] and root["return_names"] == ["logits"]


def test_display_path(tmp_path, monkeypatch):
    from fmx.export import display_path

    (tmp_path / "pkg").mkdir()
    (tmp_path / "lib" / "transformers").mkdir(parents=True)
    inside, lib, outside = tmp_path / "pkg" / "m.py", tmp_path / "lib" / "transformers" / "m.py", tmp_path / "x.py"
    monkeypatch.chdir(tmp_path / "pkg")
    monkeypatch.setattr(sys, "path", [str(tmp_path / "lib")])
    assert display_path(str(inside)) == "m.py"  # working directory first
    assert display_path(str(lib)) == os.path.join("transformers", "m.py")  # then the sys.path entry
    assert display_path(str(outside)) == os.path.realpath(str(outside))  # else absolute


def test_op_names():
    import torch.nn.functional as F

    assert op_name(F.linear) == "torch.nn.functional.linear"
    assert op_name(F.softmax) == "torch.nn.functional.softmax"
    assert op_name(torch.Tensor.view) == "torch.Tensor.view"
    assert op_name(torch.Tensor.split) == "torch.Tensor.split"
    assert op_name(torch.Tensor.size) is None
    assert op_name(torch._C._set_grad_enabled) is None  # context managers in HF code


def test_weights_tied_stored_once(tiny):
    import tiny_model

    m, weights = tiny["m"], tiny["weights"]
    w = m["weights"]
    assert w["aliases"] == {"lm_head.weight": "model.embed_tokens.weight"}
    assert "lm_head.weight" not in weights and "model.embed_tokens.weight" in weights
    assert w["buffers"] == ["model.rotary_emb.inv_freq"] and w["non_persistent"] == ["model.rotary_emb.inv_freq"]
    assert "model.rotary_emb.inv_freq" in weights
    torch.manual_seed(0)
    model = tiny_model.build()
    names = [n for n, _ in model.named_parameters()] + [n for n, _ in model.named_buffers()] + ["lm_head.weight"]
    assert set(names) == set(weights) | set(w["aliases"])
    for n, t in list(model.named_parameters()) + list(model.named_buffers()):
        assert torch.equal(weights[n], t.detach()), n  # same seed, same weights


def test_probes_and_masks(tiny):
    m, probes = tiny["m"], tiny["probes"]
    plan = [(p["visible"], p["batch"], p["seq"], p["padding"], p.get("dtype"), p.get("inputs_of"))
            for p in m["probes"]]
    assert plan == [(True, 1, 8, "none", None, None), (True, 2, 13, "left", None, None),
                    (True, 3, 6, "right", None, None), (False, 2, 17, "right", None, None),
                    (False, 1, 40, "none", None, None), (False, 3, 11, "left", None, None),  # 64 capped at 40
                    (True, 2, 13, "left", "bfloat16", "p1"), (False, 3, 11, "left", "bfloat16", "p5")]
    assert [p["name"] for p in m["probes"]] == [f"p{i}" for i in range(8)]
    for p in m["probes"]:
        mask = probes[p["mask"]]
        assert p["mask"] == f"{p.get('inputs_of', p['name'])}/mask"  # a rerun's mask is its source's
        assert mask.dtype == torch.int64 and list(mask.shape) == [p["batch"], p["seq"]]
        assert bool((mask[-1] == 1).all())
        for row in mask[:-1]:
            n = int((row == 0).sum())
            if p["padding"] == "none":
                assert n == 0
                continue
            assert 1 <= n < p["seq"] / 2
            pad = row[:n] if p["padding"] == "left" else row[p["seq"] - n:]
            assert bool((pad == 0).all())
        ids = probes[_named(_calls(m, "", int(p["name"][1:]))[0]["inputs"])["input_ids"]["key"]]
        assert ids.dtype == torch.int64 and int(ids.min()) >= 0 and int(ids.max()) < 97
        if "inputs_of" in p:  # same inputs as the probe it reruns
            source = _named(_calls(m, "", int(p["inputs_of"][1:]))[0]["inputs"])["input_ids"]["key"]
            assert torch.equal(probes[source], ids)
        root_mask = _named(_calls(m, "", int(p["name"][1:]))[0]["inputs"])["attention_mask"]
        assert torch.equal(probes[root_mask["key"]], mask)


def test_padding_mask_bounds():
    from fmx.export import padding_mask

    g = torch.Generator().manual_seed(3)
    for seq in (3, 6, 11, 13):
        seen = set()
        for _ in range(200):
            for side in ("left", "right"):
                mask = padding_mask(3, seq, side, g)
                assert bool((mask[-1] == 1).all())
                for row in mask[:-1]:
                    n = int((row == 0).sum())
                    kept = row[n:] if side == "left" else row[:seq - n]
                    assert bool((kept == 1).all())
                    seen.add(n)
        assert seen == set(range(1, (seq + 1) // 2))  # every 1 <= n < seq/2 occurs, nothing else
    assert bool((padding_mask(2, 5, "none", g) == 1).all())


def test_export_is_deterministic_and_seeded(tmp_path, tiny):
    again = export(f"{TINY}:build", str(tmp_path / "again"), quiet=True)
    assert again["calls"] == tiny["m"]["calls"]
    other = export(f"{TINY}:build", str(tmp_path / "other"), seed=1, quiet=True, probes=1, hidden=0,
                   low_precision_probe=False)
    a = load_file(str(tmp_path / "other" / "probes.safetensors"))
    key = _named(_calls(other, "", 0)[0]["inputs"])["input_ids"]["key"]
    assert not torch.equal(a[key], tiny["probes"][_named(_calls(tiny["m"], "", 0)[0]["inputs"])["input_ids"]["key"]])
    assert len(other["probes"]) == 1


def test_bfloat16_export(tmp_path):
    m = export(f"{TINY}:build", str(tmp_path / "bf"), dtype="bfloat16", quiet=True, probes=1, hidden=1,
               overrides={"num_hidden_layers": 1})
    assert m["dtype"] == "bfloat16"
    header, _ = read_header(str(tmp_path / "bf" / "weights.safetensors"))
    assert {v["dtype"] for k, v in header.items() if k != "__metadata__"} == {"BF16"}
    logits = _calls(m, "", 0)[0]["outputs"][0]
    assert logits["dtype"] == "BF16"
    probes = load_file(str(tmp_path / "bf" / "probes.safetensors"))
    assert probes[logits["key"]].dtype == torch.bfloat16
    assert _named(_calls(m, "", 0)[0]["inputs"])["input_ids"]["dtype"] == "I64"


def test_probe_shapes_option(tmp_path):
    m = export(f"{TINY}:build", str(tmp_path / "s"), probe_shapes="1x5,2x9:right", probes=1, hidden=1, quiet=True)
    assert [(p["visible"], p["batch"], p["seq"], p["padding"], p.get("dtype")) for p in m["probes"]] == [
        (True, 1, 5, "none", None), (False, 2, 9, "right", None),
        (True, 1, 5, "none", "bfloat16"), (False, 2, 9, "right", "bfloat16")]
    with pytest.raises(ExportError, match="bad probe shape"):
        export(f"{TINY}:build", str(tmp_path / "t"), probe_shapes="1x5:middle", quiet=True)
    assert not os.path.exists(tmp_path / "t")


def test_progress_lines(tmp_path, capsys):
    export(f"{TINY}:build", str(tmp_path / "p"), probes=1, hidden=1)
    lines = capsys.readouterr().err.splitlines()
    # the phases around the probes: the build, the hidden weights, the manifest and weights
    phases = [l for l in lines if re.match(r"\[\d+\.\ds\] ", l)]
    assert [p.split("] ", 1)[1].split()[0] for p in phases] == ["built", "drew", "probes"]
    assert "TinyForCausalLM" in phases[0] and "running 4 probes" in phases[1]
    err = [l for l in lines if l not in phases]
    assert err[0].startswith("[1/4] probe p0 (visible, 1x8, none) ") and err[0].endswith("s")
    assert err[1].startswith("[2/4] probe p1 (hidden, 2x17, right) ")
    assert err[2].startswith("[3/4] probe p2 (visible, 1x8, none, bfloat16 copy of p0) ")
    assert err[3].startswith("[4/4] probe p3 (hidden, 2x17, right, bfloat16 copy of p1) ")
    assert err[4].startswith(f"wrote {tmp_path / 'p'}: 2+2 probes, ") and " MB weights, " in err[4]


def test_export_module_instance_and_custom_inputs(tmp_path):
    src = tmp_path / "vision.py"
    src.write_text(textwrap.dedent('''
        import torch
        from torch import nn

        class Fails(nn.Module):
            def forward(self, x):
                raise ValueError("unsupported")

        class Scale(nn.Module):
            def __init__(self):
                super().__init__()
                self.proj = nn.Linear(3, 4)
                self.fast = Fails()

            def forward(self, pixels, scale=2.0):
                try:
                    return self.fast(pixels)
                except ValueError:  # a fallback path, as real models have
                    pass
                return {"out": self.proj(pixels) * scale, "note": None, "spectrum": torch.zeros(2, dtype=torch.complex64)}

        def make():
            return Scale()

        def fmx_inputs(model, batch, seq, padding, generator):
            return {"pixels": torch.randn(batch, seq, 3, generator=generator), "scale": 0.5}
        '''))
    m = export(f"{src}:make", str(tmp_path / "v"), quiet=True, probes=1, hidden=0)
    call = _calls(m, "", 0)[0]
    assert [(e["name"], e["kind"]) for e in call["inputs"]] == [("pixels", "tensor"), ("scale", "value")]
    assert [(e["name"], e["kind"]) for e in call["outputs"]] == [("out", "tensor"), ("note", "none"), ("spectrum", "other")]
    assert call["outputs"][2]["repr"].startswith("Tensor(torch.complex64, [2]")
    fails = _calls(m, "fast", 0)[0]
    assert fails["raised"] == "ValueError" and fails["outputs"] == []
    assert "raised" not in call
    assert m["config"] is None
    assert torch.equal(load_file(str(tmp_path / "v" / "probes.safetensors"))[m["probes"][0]["mask"]], torch.ones(1, 8, dtype=torch.int64))
    rerun = _calls(m, "", 1)[0]  # the bfloat16 rerun gets the same inputs, floating ones cast
    assert m["probes"][1]["dtype"] == "bfloat16" and rerun["inputs"][0]["dtype"] == "BF16"

    import tiny_model

    model = tiny_model.build(num_hidden_layers=1)
    m2 = export(model, str(tmp_path / "inst"), quiet=True, probes=1, hidden=0)
    assert m2["source"] == {"kind": "module", "class": "tiny_model.TinyForCausalLM"}
    assert m2["files"] and m2["root_class"] == "TinyForCausalLM"


def test_failed_export_leaves_nothing(tmp_path):
    src = tmp_path / "broken.py"
    src.write_text(textwrap.dedent('''
        from torch import nn

        class Broken(nn.Module):
            def __init__(self):
                super().__init__()
                self.config = type("C", (), {"vocab_size": 5})()
                self.lin = nn.Linear(2, 2)

            def forward(self, input_ids, attention_mask=None):
                raise RuntimeError("model blew up")

        def build():
            return Broken()
        '''))
    out = tmp_path / "a" / "b" / "pack"
    with pytest.raises(RuntimeError, match="model blew up"):
        export(f"{src}:build", str(out), quiet=True)
    assert sorted(os.listdir(tmp_path)) == ["broken.py"]  # no pack, no temp dir, no created parents
    from fmx.export import load_spec

    model = load_spec(f"{src}:build")[1]()
    with pytest.raises(RuntimeError, match="model blew up"):
        export(model, str(out), quiet=True)
    assert sorted(os.listdir(tmp_path)) == ["broken.py"]
    assert not any("forward" in mod.__dict__ for mod in model.modules())  # wrappers removed


def test_output_dir_rules(tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    export(f"{TINY}:build", str(out), quiet=True, probes=1, hidden=0)  # an empty directory is fine
    with pytest.raises(ExportError, match="not empty"):
        export(f"{TINY}:build", str(out), quiet=True, probes=1, hidden=0)
    m = export(f"{TINY}:build", str(out), quiet=True, probes=2, hidden=0, force=True)
    assert len(m["probes"]) == 3 and json.load(open(out / "task.json"))["probes"] == m["probes"]  # + a bf16 rerun
    assert sorted(os.listdir(tmp_path)) == ["o"]
    (tmp_path / "file").write_text("x")
    with pytest.raises(ExportError, match="not a directory"):
        export(f"{TINY}:build", str(tmp_path / "file"), quiet=True)


def test_forward_wrappers_are_removed(tmp_path):
    import tiny_model

    model = tiny_model.build(num_hidden_layers=1)
    export(model, str(tmp_path / "w"), quiet=True, probes=1, hidden=0)
    assert not any("forward" in mod.__dict__ for mod in model.modules())


def _cli(*args: str, cwd: str = ROOT) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.path.join(ROOT, "python"), FMX_PYDEPS="")  # (no ../shared/pydeps)
    return subprocess.run([sys.executable, "-m", "fmx.export", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("spec, message", [
    ("tests/python/tiny_model.py", "expected FILE.py:NAME"),
    ("tests/python/nope.py:build", "model file not found"),
    ("tests/python/tiny_model.py:nope", "has no 'nope'; it defines: "),
    ("tests/python/tiny_model.py:TinyConfig", "not a torch.nn.Module"),
])
def test_cli_bad_spec(tmp_path, spec, message):
    r = _cli(spec, "-o", str(tmp_path / "out"))
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fmx.export: error: ") and message in lines[0], r.stderr
    assert not os.path.exists(tmp_path / "out") and os.listdir(tmp_path) == []


def test_cli_hf_without_transformers(tmp_path):
    env = dict(os.environ, PYTHONPATH=os.path.join(ROOT, "python"), FMX_PYDEPS="")
    if subprocess.run([sys.executable, "-c", "import transformers"], env=env, capture_output=True).returncode == 0:
        pytest.skip("transformers is installed")  # (the tests' ../shared/pydeps is not: _cli leaves it out)
    (tmp_path / "config.json").write_text("{}")
    for args in (["--hf", str(tmp_path)], ["--hf-config", str(tmp_path / "config.json"), "--random-init"]):
        r = _cli(*args, "-o", str(tmp_path / "out"))
        assert r.returncode == 2
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and "transformers" in lines[0] and "FILE.py:NAME" in lines[0], r.stderr
    assert not os.path.exists(tmp_path / "out")


def test_cli_exports(tmp_path):
    r = _cli("tests/python/tiny_model.py:build", "-o", str(tmp_path / "c"), "--set", "num_hidden_layers=1",
             "--set", "pad_token_id=0", "--probes", "2", "--hidden", "1", "--quiet", "--name", "tiny_cli")
    assert r.returncode == 0, r.stderr
    assert r.stderr == ""
    m = json.load(open(tmp_path / "c" / "task.json"))
    assert m["name"] == "tiny_cli" and m["config"]["num_hidden_layers"] == 1 and m["config"]["pad_token_id"] == 0
    assert m["source"]["overrides"] == {"num_hidden_layers": 1, "pad_token_id": 0}
    assert list(m["files"]) == ["tests/python/tiny_model.py"]
    # padded positions carry pad_token_id
    probes = load_file(str(tmp_path / "c" / "probes.safetensors"))
    ids = probes[_named(_calls(m, "", 1)[0]["inputs"])["input_ids"]["key"]]
    assert bool((ids[probes["p1/mask"] == 0] == 0).all())
    assert main(["tests/python/tiny_model.py:build", "-o", str(tmp_path / "c"), "--quiet"]) == 2  # exists


# --------------------------------------------------------------------------- the example models


@pytest.mark.parametrize("example", ["qwen2", "gpt2"])
def test_example_models_export_and_reproduce(tmp_path, example):
    path = os.path.join(EXAMPLES, f"{example}.py")
    if not os.path.exists(path):
        pytest.skip(f"{path} not written yet")
    m = export(f"{path}:build", str(tmp_path / example), quiet=True)
    ordinary = [p for p in m["probes"] if "generation" not in p]
    assert len(ordinary) == 8 and m["calls"]  # six, and two reruns in bfloat16
    # then the generations (decode tasks): a prefill and 3+ decode steps each, visible and hidden
    gens = m["generation"]["generations"]
    assert [(g["visible"], g.get("dtype")) for g in gens] == [(True, None), (False, None), (False, None),
                                                             (True, "bfloat16")]
    assert all(g["steps"] >= 3 for g in gens)
    assert len(m["probes"]) == 8 + sum(g["steps"] + 1 for g in gens)
    from fmx.export import display_path

    assert list(m["files"]) == [display_path(path)]
    logits = _named(_calls(m, "", 0)[0]["outputs"])["logits"]
    assert logits["kind"] == "tensor" and logits["token_aligned"]
    from fmx.export import load_spec

    module, build, _ = load_spec(f"{path}:build")
    _rerun_root(str(tmp_path / example), build)


def test_spec_module_name_taken_by_another_file(tmp_path):
    other = tmp_path / "tiny_model.py"  # same module name as the fixture model, another file
    other.write_text("from torch import nn\n\ndef build():\n    return nn.Linear(2, 2)\n")
    import tiny_model

    from fmx.export import load_spec

    module, build, real = load_spec(f"{other}:build")
    assert real == os.path.realpath(str(other)) and module.__name__ != "tiny_model"
    assert sys.modules["tiny_model"] is tiny_model  # the other file's module is left alone
    assert load_spec(f"{other}:build")[0] is module  # and found again on the next load
