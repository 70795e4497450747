"""Real transformers architectures, end to end (python/fmx/suite.py, python/fmx/hf.py).

With transformers importable — `../shared/pydeps` beside the repository (or the
folder FMX_PYDEPS names) is put on the path when it exists — 24 of the suite's
model types, every family among them (bench/suite.sh checks all of
examples/suite), are exported once per session (`--hf-config`, random
sensitive weights), their whole model written by the tracer, verified by `fmx
verify --probes all` and run in plain Python: each must pass all four. Without
transformers these tests skip and say why. Covered too: the suite spans the
families the issue names; `--hf-config` builds encoders, vision and
encoder-decoder models with probe inputs of their own; a config field typo is
one line and exit 2; `fmx suite` writes packs that `fmx serve` serves.
"""
import json
import os
import pathlib
import re
import subprocess
import sys
import time

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
FMX = os.environ.get("FMX_BIN", str(ROOT / "build" / "fmx"))
PYDEPS = os.environ.get("FMX_PYDEPS") or str((ROOT / ".." / "shared" / "pydeps").resolve())
if os.path.isdir(PYDEPS) and PYDEPS not in sys.path:
    sys.path.append(PYDEPS)

try:
    import transformers

    transformers.logging.set_verbosity_error()
    WHY_SKIP = None
except ImportError as e:
    WHY_SKIP = (f"transformers is not importable ({e}); put it in {PYDEPS} (../shared/pydeps) or name a "
                "folder that has it in FMX_PYDEPS")

from fmx import suite  # noqa: E402

pytestmark = pytest.mark.skipif(WHY_SKIP is not None, reason=WHY_SKIP or "")
CONFIGS = suite.configs()
# The model types CI checks: every family of the suite, inside the tests' time budget (about a
# minute on two cores); bench/suite.sh checks all of examples/suite.
CI = ("bart", "bert", "bloom", "codegen", "cohere", "distilbert", "falcon", "gemma2", "gpt2", "gpt_neox", "gptj",
      "llama", "mistral", "mixtral", "mpt", "olmo2", "opt", "phi", "phi3", "qwen2_moe", "stablelm", "t5", "vit",
      "whisper")


def env():
    path = os.pathsep.join([str(ROOT / "python"), PYDEPS, os.environ.get("PYTHONPATH", "")])
    return dict(os.environ, PYTHONPATH=path, FMX_BIN=FMX)


@pytest.fixture(scope="session")
def rows(tmp_path_factory):
    """model type -> its row (export, trace, verify, run), every suite config checked once."""
    out = tmp_path_factory.mktemp("suite")
    t0 = time.perf_counter()
    done = suite.check_all({name: CONFIGS[name] for name in CI}, str(out), FMX, jobs=4)
    print(f"\nsuite: {len(done)} model types in {time.perf_counter() - t0:.1f}s")
    return {r["model_type"]: r for r in done}


def test_suite_spans_the_families():
    families = {"encoder": {"bert", "roberta", "distilbert", "electra"}, "vision": {"vit"},
                "encoder-decoder": {"t5", "bart", "whisper"}, "mixture of experts": {"mixtral", "qwen2_moe"},
                "sliding/global attention": {"gemma2"}, "fused qkv": {"gpt2", "phi3", "falcon", "bloom"},
                "parallel residual": {"gpt_neox", "gptj", "falcon", "cohere"}, "ALiBi": {"bloom", "mpt"},
                "partial rotary": {"phi", "stablelm", "gpt_neox", "persimmon"}}
    for family, types in families.items():
        assert types <= set(CONFIGS) and types & set(CI), family
    assert set(CI) <= set(CONFIGS) and len(CI) >= 20


@pytest.mark.parametrize("model_type", CI)
def test_model_type_exports_traces_verifies_and_runs(rows, model_type):
    row = rows[model_type]
    assert suite.passed(row), json.dumps(row, indent=1)


def test_probe_inputs_follow_the_model_family(rows):
    def root_inputs(name):
        task = json.loads(pathlib.Path(rows[name]["pack"], "task.json").read_text())
        call = next(c for c in task["calls"] if c["probe"] == 0 and c["module"] == "")
        return {e["name"]: e.get("shape") for e in call["inputs"] if e["kind"] == "tensor"}, task

    vit, task = root_inputs("vit")
    assert vit == {"pixel_values": [1, 3, 16, 16]} and task["root_class"] == "ViTForImageClassification"
    t5, task = root_inputs("t5")
    assert {"input_ids", "attention_mask", "decoder_input_ids"} <= set(t5)
    whisper, _ = root_inputs("whisper")
    assert whisper["input_features"] == [1, 16, 32]  # mel bins x 2 * max_source_positions
    bert, task = root_inputs("bert")
    assert task["root_class"] == "BertForMaskedLM" and bert["input_ids"] == [1, 8]


def test_gemma2_layers_get_a_helper_each(rows):
    code = pathlib.Path(rows["gemma2"]["pack"], "traced.py").read_text()
    assert "def gemma2_decoder_layer(" in code and "def gemma2_decoder_layer_2(" in code


def test_config_typo_is_one_line_and_exit_2(tmp_path):
    res = subprocess.run([FMX, "export", "--hf-config", str(ROOT / "examples/suite/llama.json"), "-o",
                          str(tmp_path / "x"), "--set", "num_hiden_layers=1"], capture_output=True, text=True,
                         env=env(), stdin=subprocess.DEVNULL, timeout=300)
    assert res.returncode == 2 and "num_hiden_layers" in res.stderr and "num_hidden_layers" in res.stderr
    assert "Traceback" not in res.stderr


def test_fmx_suite_builds_packs_that_fmx_serves(tmp_path):
    packs = tmp_path / "packs"
    res = subprocess.run([FMX, "suite", "-o", str(packs), "--only", "vit", "--prefix", "hf-", "--quiet"],
                         capture_output=True, text=True, env=env(), stdin=subprocess.DEVNULL, timeout=300)
    assert res.returncode == 0, res.stderr
    assert [p.name for p in packs.iterdir()] == ["hf-vit"]
    db = tmp_path / "fmx.db"
    res = subprocess.run([FMX, "run", "--policy", "tracer", "--tasks", str(packs), "--task", "hf-vit", "--db", str(db)],
                         capture_output=True, text=True, env=env(), stdin=subprocess.DEVNULL, timeout=300)
    assert res.returncode == 0 and re.search(r"tracer\s+1\s+100%", res.stdout), res.stdout + res.stderr


def test_hf_snapshot_of_another_family_exports(tmp_path):
    """--hf DIR: a saved model's own class and weights (here a sequence classifier)."""
    from fmx.export import build_from_hf, export

    config = transformers.AutoConfig.for_model("bert", hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                               num_attention_heads=4, vocab_size=64, max_position_embeddings=64,
                                               num_labels=2)
    saved = transformers.BertForSequenceClassification(config)
    saved.save_pretrained(str(tmp_path / "snap"))
    model, inputs_fn = build_from_hf(str(tmp_path / "snap"), None, False, {})
    assert type(model).__name__ == "BertForSequenceClassification"
    for (name, a), b in zip(model.state_dict().items(), saved.state_dict().values()):
        assert a.equal(b), name  # its own weights, not a new draw
    m = export(model, str(tmp_path / "pack"), inputs_fn=inputs_fn, quiet=True)
    root = next(c for c in m["calls"] if c["module"] == "" and c["probe"] == 0)
    assert {e["name"] for e in root["inputs"] if e["kind"] == "tensor"} == {"input_ids", "attention_mask"}
    assert [e["shape"] for e in root["outputs"] if e["kind"] == "tensor"] == [[1, 2]]
