"""Decode tasks: a causal LM's prefill and decode steps with a KV cache in the flat convention
(docs/pack-format.md, "Generation"), as a user and a policy meet them.

Covered: the reference decode solutions run unchanged in plain Python and generate the model
class's tokens greedily; packs capture a left-padded prefill and decode steps that feed the
model's own cache back (visible, and hidden with a longer generation and other batch sizes);
`fmx verify --decode` passes the references on every probe, grades the cache at real tokens only,
and names the step and layer where a wrong program first diverges; the decode mutants fail;
bad requests get a clear error; `fmx run` plays the decode tasks (oracle passes, null and the
tracer, which says it cannot write them, do not).
"""
import importlib.util
import json
import os
import pathlib
import re
import sqlite3
import subprocess

import pytest
import torch

from fmx.export import load_spec
from fmx.mutate import generate
from fmx.safetensors import load_file

ROOT = pathlib.Path(__file__).resolve().parents[2]
FMX = os.environ.get("FMX_BIN", str(ROOT / "build" / "fmx"))
EXAMPLES = ("qwen2", "gpt2")


def fmx(*args):
    return subprocess.run([FMX, *map(str, args)], cwd=ROOT, capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, timeout=300)


def solution(ex):
    return ROOT / "examples" / "solutions" / f"{ex}_decode.py"


def verify(pack, path, *args):
    res = fmx("verify", pack, path, "--decode", "--json", *args)
    report = json.loads(res.stdout) if res.stdout.strip().startswith("{") else None
    assert report is not None, res.stdout[-2000:] + res.stderr[-2000:]
    return res, report


@pytest.fixture(scope="module")
def packs(example_packs):
    """The two example packs, and Qwen2 with a sliding window of 5 (shorter than the prompts);
    shared (conftest.py): read, never written."""
    return example_packs.tasks(*EXAMPLES, qwen2w=("qwen2", "--set", "sliding_window=5", "--probes", "1",
                                                  "--hidden", "1", "--no-bf16-probe"))


def windowed_solution(tmp_path):
    path = tmp_path / "qwen2w_decode.py"
    path.write_text(solution("qwen2").read_text().replace("WINDOW = 0", "WINDOW = 5", 1))
    return path


# ---- the reference solutions in plain Python ----

def _load(path):
    spec = importlib.util.spec_from_file_location(f"decode_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _hf_positions(mask):
    return (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)


@pytest.mark.parametrize("ex", EXAMPLES)
def test_reference_generates_the_model_classes_tokens_greedily(ex):
    """Prefill a left-padded batch, then 6 greedy steps: the flat file (imported as plain Python,
    no fmx) and the model class with its own cache pick the same tokens with the same logits."""
    _, build, _ = load_spec(f"examples/models/{ex}.py:build")
    torch.manual_seed(3)
    model = build()
    flat = _load(solution(ex))
    weights = {**model.state_dict(), **dict(model.named_buffers())}
    cfg = model.config
    heads = getattr(cfg, "num_key_value_heads", None) or cfg.n_head
    dim = getattr(cfg, "hidden_size", None) or cfg.n_embd
    head_dim = dim // (getattr(cfg, "num_attention_heads", None) or cfg.n_head)
    layers = getattr(cfg, "num_hidden_layers", None) or cfg.n_layer
    ids = torch.randint(0, cfg.vocab_size, (3, 6), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(3, 6, dtype=torch.int64)
    mask[0, :2] = 0
    mask[1, :1] = 0
    runs = {}
    for who in ("model", "flat"):
        tokens, logits_seen, step_ids, step_mask = [], [], ids, mask
        pos = _hf_positions(mask)
        cache = None
        keys = [torch.zeros(3, heads, 0, head_dim)] * layers
        values = list(keys)
        with torch.no_grad():
            for _ in range(7):
                if who == "model":
                    out = model(input_ids=step_ids, attention_mask=step_mask, position_ids=pos,
                                past_key_values=cache, use_cache=True)
                    logits, cache = out.logits, out.past_key_values
                else:
                    logits, keys, values = flat.forward(step_ids, pos, step_mask, keys, values, weights)
                step_ids = logits[:, -1:].argmax(-1)
                tokens.append(step_ids)
                logits_seen.append(logits[:, -1])
                pos = pos[:, -1:] + 1
                step_mask = torch.cat([step_mask, torch.ones(3, 1, dtype=torch.int64)], dim=1)
        runs[who] = torch.cat(tokens, 1), torch.stack(logits_seen)
    assert torch.equal(runs["flat"][0], runs["model"][0])
    torch.testing.assert_close(runs["flat"][1], runs["model"][1], rtol=1e-5, atol=1e-6)
    assert len(solution(ex).read_text().splitlines()) <= 150


# ---- what the pack captured ----

def test_packs_capture_prefill_and_decode_steps_feeding_the_cache_back(packs):
    m = json.loads((packs / "qwen2" / "task.json").read_text())
    caps = load_file(str(packs / "qwen2" / "probes.safetensors"))
    gens = {g["name"]: g for g in m["generation"]["generations"]}
    visible = [g for g in gens.values() if g["visible"] and "dtype" not in g]
    hidden = [g for g in gens.values() if not g["visible"]]
    assert visible and all(g["steps"] >= 3 for g in gens.values())
    assert max(g["steps"] for g in hidden) > visible[0]["steps"]  # a longer generation
    assert {g["batch"] for g in hidden} - {visible[0]["batch"]}  # other batch sizes
    assert any(g.get("dtype") == "bfloat16" for g in gens.values())  # casts matter there
    probes = {p["name"]: p for p in m["probes"]}
    roots = {m["probes"][c["probe"]]["name"]: c for c in m["calls"] if c["module"] == ""}
    g0 = [probes[n] for n in visible[0]["probes"]]
    assert [p["step"] for p in g0] == list(range(len(g0))) and g0[0]["padding"] == "left"
    layers = m["config"]["num_hidden_layers"]
    prev = None
    for p in g0:
        call = roots[p["name"]]
        ins = {e["name"]: caps[e["key"]] for e in call["inputs"]}
        outs = {e["name"]: caps[e["key"]] for e in call["outputs"]}
        assert [e["name"] for e in call["inputs"]] == (
            ["input_ids", "positions", "attention_mask"] + [f"past_keys_{i}" for i in range(layers)]
            + [f"past_values_{i}" for i in range(layers)])
        assert ins["positions"].shape == ins["input_ids"].shape
        assert ins["attention_mask"].shape[1] == p["past"] + p["seq"]
        if prev is None:
            assert ins["past_keys_0"].shape[2] == 0  # the prefill's cache is empty
        else:  # the model's own cache, its next token and positions come back
            assert torch.equal(ins["past_keys_1"], prev["keys_1"])
            assert torch.equal(ins["past_values_0"], prev["values_0"])
            assert torch.equal(ins["input_ids"], prev["logits"][:, -1:].argmax(-1))
            assert torch.equal(ins["positions"], prev_pos[:, -1:] + 1)
        assert outs["keys_0"].shape[2] == p["past"] + p["seq"]
        prev, prev_pos = outs, ins["positions"]
    # every module call is captured per step too (taps compare with them)
    assert any(c["module"] == "model.layers.1" and m["probes"][c["probe"]]["name"] == g0[2]["name"]
               for c in m["calls"])


def test_sliding_window_layers_keep_only_their_window(packs):
    m = json.loads((packs / "qwen2w" / "task.json").read_text())
    caps = load_file(str(packs / "qwen2w" / "probes.safetensors"))
    lengths = [caps[e["key"]].shape[2] for c in m["calls"] if c["module"] == ""
               and "generation" in m["probes"][c["probe"]] for e in c["outputs"] if e["name"] == "keys_0"]
    assert lengths and max(lengths) == 5


def test_a_window_the_model_ignores_is_not_cut_from_the_cache():
    """The cache convention hands a candidate what the model used: a config's sliding window is
    applied to the cache only when a decode step past it gives the model's own logits."""
    import dataclasses

    from fmx.export import default_inputs
    from fmx.generate import checked_windows

    class Capture:
        replaying = False

    _, build, _ = load_spec("examples/models/qwen2.py:build")
    torch.manual_seed(0)
    model = build(sliding_window=5)
    with torch.no_grad():
        assert checked_windows(model, Capture(), default_inputs, 0, "cpu") == [5, 5]
        model.model.config = dataclasses.replace(model.config, sliding_window=None)  # the forward ignores it
        assert checked_windows(model, Capture(), default_inputs, 0, "cpu") == [None, None]


def test_a_generation_that_cannot_be_captured_leaves_an_ordinary_pack(tmp_path):
    """Probe inputs without input_ids (embeddings): no generation, said why; the pack still opens
    and its whole-model task still grades."""
    from fmx.export import export

    def embeds(model, batch, seq, padding, generator):
        x = torch.randn(batch, seq, model.config.hidden_size, generator=generator) * 0.03
        return {"inputs_embeds": x, "attention_mask": torch.ones(batch, seq, dtype=torch.int64)}

    m = export("examples/models/qwen2.py:build", str(tmp_path / "e"), quiet=True, probes=1, hidden=0,
               low_precision_probe=False, inputs_fn=embeds)
    assert "input_ids" in m["generation"]["none"]
    assert not any("generation" in p for p in m["probes"]) and len(m["probes"]) == 1
    assert all(c["probe"] == 0 for c in m["calls"])
    res = fmx("info", tmp_path / "e")
    assert res.returncode == 0 and "generation" not in res.stdout, res.stderr


# ---- verify --decode ----

@pytest.mark.parametrize("ex", EXAMPLES)
def test_reference_passes_every_step_hidden_ones_included(packs, ex):
    res, report = verify(packs / ex, solution(ex), "--probes", "all")
    assert res.returncode == 0 and report["status"] == "match", res.stdout[-3000:]
    m = json.loads((packs / ex / "task.json").read_text())
    steps = [p for p in m["probes"] if "generation" in p]
    assert report["graded"] == len(steps) == report["passed"]  # the steps and nothing else
    check = report["compile_check"]  # TorchScript binds the cache lists and returns them too
    assert check["compiled"] and check["ran"] and check["same_meaning"], check
    assert {p["step"] for p in report["probes"]} == set(range(max(p["step"] for p in steps) + 1))
    for p in report["probes"]:
        outs = {o["name"]: o for o in p["outputs"]}
        assert outs["logits"]["masked"] and outs["keys_0"]["masked"] and "values_1" in outs


def test_windowed_reference_passes(packs, tmp_path):
    res, report = verify(packs / "qwen2w", windowed_solution(tmp_path), "--probes", "all")
    assert res.returncode == 0 and report["status"] == "match", res.stdout[-3000:]


def _wrapped(ex, body):
    """The reference with its cache outputs changed by `body` (a function of keys and the mask)."""
    src = solution(ex).read_text().replace("def forward(", "def reference(", 1)
    return src + (
        "\n\ndef forward(input_ids: Tensor, positions: Tensor, attention_mask: Tensor, past_keys: List[Tensor],\n"
        "            past_values: List[Tensor], weights: Dict[str, Tensor]):\n"
        "    logits, keys, values = reference(input_ids, positions, attention_mask, past_keys, past_values, weights)\n"
        f"    keys[0] = {body}\n"
        "    return logits, keys, values\n")


def test_cache_is_graded_at_real_tokens_only(packs, tmp_path):
    path = tmp_path / "c.py"
    # garbage where the attention mask is 0 (left padding of the prompt): not graded
    path.write_text(_wrapped("qwen2", "keys[0].masked_fill(attention_mask[:, None, :, None] == 0, 1e6)"))
    res, report = verify(packs / "qwen2", path)
    assert report["status"] == "match", res.stdout[-3000:]
    # the same at the last real token: graded, and the report names the step and the output
    path.write_text(_wrapped("qwen2", "torch.cat((keys[0][:, :, :-1], keys[0][:, :, -1:] + 1e-3), dim=2)"))
    res, report = verify(packs / "qwen2", path)
    assert res.returncode == 1 and report["status"] == "mismatch"
    d = report["first_divergence"]
    assert d["name"] == "output" and d["step"] == 0 and d["generation"] == "g0"
    failed = {o["name"] for p in report["probes"] for o in p["outputs"] if not o["pass"]}
    assert failed == {"keys_0"}


def _mutant(ex, operator, source=None):
    src = source if source is not None else solution(ex).read_text()
    found = [m for m in generate(src, "forward") if m["operator"] == operator]
    assert found, f"no {operator} mutant of {ex}"
    return found


@pytest.mark.parametrize("ex,operator,diverges", [
    ("qwen2", "cache_order", "model.layers.0"),   # the cache appended before the rotary embedding
    ("qwen2", "mask_extend", "model.layers.0"),   # the mask not extended over the cache
    ("qwen2", "positions", None),                 # positions off by one (both ways, every site)
    ("gpt2", "positions", None),
    ("gpt2", "mask_extend", "transformer.h.0"),
])
def test_decode_mutants_fail_verify(packs, tmp_path, ex, operator, diverges):
    for i, m in enumerate(_mutant(ex, operator)[:2]):  # positions: + 1 and - 1 at the first site
        path = tmp_path / f"m{i}.py"
        path.write_text(m["source"])
        res, report = verify(packs / ex, path)
        assert res.returncode in (1, 2) and report["status"] != "match", (m["after"], report["status"])
        if diverges and report["status"] == "mismatch":
            d = report["first_divergence"]  # the step and the layer (taps work per step)
            assert d["name"] == diverges and d["step"] >= 1, d
            if operator == "cache_order":  # the text report says it too
                assert f"decode step {d['step']}" in fmx("verify", packs / ex, path, "--decode").stdout


def test_window_mutant_fails_verify(packs, tmp_path):
    source = windowed_solution(tmp_path).read_text()
    mutants = _mutant("qwen2", "window", source)
    assert len(mutants) == 2  # keys and values
    for m in mutants:
        path = tmp_path / "w.py"
        path.write_text(m["source"])
        res, report = verify(packs / "qwen2w", path)
        assert res.returncode == 1 and report["status"] == "mismatch"
        assert any("shape" in o.get("error", "") or not o.get("shape_ok", True)
                   for p in report["probes"] for o in p["outputs"])


def test_bad_requests_get_clear_errors(packs, tmp_path):
    res = fmx("verify", packs / "qwen2", solution("qwen2"), "--decode", "--component", "model.norm")
    assert res.returncode == 2 and "a decode task grades the whole model" in res.stdout
    path = tmp_path / "logits_only.py"
    path.write_text(_wrapped("qwen2", "keys[0]").rsplit("return logits, keys, values", 1)[0] + "return logits\n")
    res, report = verify(packs / "qwen2", path)
    assert report["status"] == "mismatch" and re.search(r"returned 1 output; .* returns 5 \(logits, keys_0",
                                                        json.dumps(report))
    path.write_text("def forward(input_ids, weights):\n    return input_ids\n")
    res, report = verify(packs / "qwen2", path)
    assert res.returncode == 1  # the null program fails
    tiny = tmp_path / "tiny"
    res = fmx("export", "tests/python/tiny_model.py:build", "-o", tiny, "--quiet", "--probes", "1", "--hidden", "0",
              "--no-bf16-probe")
    assert res.returncode == 0, res.stderr
    assert "none" in json.loads((tiny / "task.json").read_text())["generation"]
    res = fmx("verify", tiny, solution("qwen2"), "--decode")
    assert res.returncode == 2 and "captured no generation" in res.stdout


# ---- the environment ----

def test_run_plays_decode_tasks(packs, tmp_path):
    db = tmp_path / "fmx.db"
    res = fmx("run", "--policy", "oracle,null,tracer", "--tasks", packs, "--db", db,
              "--task", "qwen2/decode")
    assert res.returncode == 0, res.stdout + res.stderr
    rows = {m.group(1): float(m.group(2)) for m in re.finditer(
        r"^qwen2/decode\s+(\w+)\s+\d+\s+\d+%\s+([\d.]+)", res.stdout, re.M)}
    assert rows["oracle"] > 0.6 and rows["null"] == 0 and rows["tracer"] == 0, res.stdout
    with sqlite3.connect(db) as conn:
        kinds = dict(conn.execute("SELECT id, kind FROM tasks").fetchall())
        code = conn.execute("SELECT s.code FROM submissions s JOIN episodes e ON e.id = s.episode "
                            "JOIN policies p ON p.id = e.policy_id WHERE p.name = 'tracer'").fetchone()[0]
    assert kinds["qwen2/decode"] == "decode" and kinds["gpt2/decode"] == "decode"
    assert "cannot write a decode task" in code
    res = fmx("trace", packs / "qwen2", "--decode")  # fmx trace says so too
    assert res.returncode == 2 and "cannot write a decode task's code" in res.stderr


def test_list_tasks_and_the_goal_state_the_cache_convention(packs, tmp_path):
    from fmx import Client

    addr = f"ipc://{tmp_path}/fmx.sock"
    server = subprocess.Popen([FMX, "serve", "--tasks", str(packs), "--db", str(tmp_path / "s.db"), "--bind", addr,
                               "--insecure"], cwd=ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True)
    try:
        client = Client(addr, timeout=60)
        tasks = {t["id"]: t for t in client.list_tasks()}
        assert {t for t, v in tasks.items() if v["kind"] == "decode"} == {"qwen2/decode", "gpt2/decode",
                                                                          "qwen2w/decode"}
        assert tasks["gpt2/decode"]["module"] == "" and tasks["gpt2/decode"]["class"] == "GPT2LMHeadModel"
        obs, info = client.reset(task="qwen2/decode", policy="test")
        text, data = obs["text"], obs["data"]
        assert "past_keys: List[Tensor], past_values: List[Tensor]" in text and "decode step 1" in text
        ins = {i["name"]: i for i in data["inputs"]}
        outs = {o["name"]: o for o in data["outputs"]}
        assert list(ins) == ["input_ids", "positions", "attention_mask", "past_keys", "past_values"]
        assert ins["past_keys"]["kind"] == "tensor_list" and ins["past_keys"]["count"] == 2
        assert list(outs) == ["logits", "keys", "values"]
        client.close()
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_transformers_qwen2_with_its_dynamic_cache(tmp_path):
    """A real transformers Qwen2 (where installed): its DynamicCache is fed back step by step, its
    sliding window applied to the cache, and the flat reference with the same constants passes."""
    pytest.importorskip("transformers")
    from fmx.export import build_from_hf, export

    config = {"model_type": "qwen2", "vocab_size": 256, "hidden_size": 64, "intermediate_size": 128,
              "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
              "max_position_embeddings": 128, "sliding_window": 6, "use_sliding_window": True,
              "max_window_layers": 0}
    (tmp_path / "config.json").write_text(json.dumps(config))
    torch.manual_seed(0)
    model, inputs_fn = build_from_hf(None, str(tmp_path / "config.json"), True, {"attn_implementation": "eager"})
    m = export(model, str(tmp_path / "hf"), quiet=True, init=True, probes=1, hidden=1,
               low_precision_probe=False, inputs_fn=inputs_fn)
    assert [g["name"] for g in m["generation"]["generations"]] == ["g0", "g1"]
    path = tmp_path / "hf_decode.py"
    path.write_text(solution("qwen2").read_text().replace("WINDOW = 0", "WINDOW = 6", 1))
    res, report = verify(tmp_path / "hf", path, "--probes", "all")
    assert res.returncode == 0 and report["status"] == "match", res.stdout[-3000:]
