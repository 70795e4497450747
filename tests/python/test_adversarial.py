"""The reward-hack corpus (tests/adversarial/, manifest.json) against the real
grader: every case's candidate through `fmx verify --probes all --json` on the
qwen2 example pack, and the reward cases through a real `fmx serve` and the
Python client's submit (the grade a trainer sees).

Each case asserts its outcome (mismatch on the probes it names, a refusal at
compile with its reason, a clean run error, a timeout, a LOC count that does
not drop), that fmx stayed alive (exit 0/1/2, never a signal; the server
answers `health` after every submit), and that the pack's files are unchanged
(sha256). After the corpus the reference solution must still grade 1.0 on the
same server: no case changed the weights or captures it serves from memory.
"""
import concurrent.futures
import hashlib
import io
import json
import math
import pathlib
import os
import struct
import subprocess
import tempfile
import tokenize

import pytest

from fmx import Client

ROOT = pathlib.Path(__file__).resolve().parents[2]
FMX = os.environ.get("FMX_BIN", str(ROOT / "build" / "fmx"))
CORPUS = ROOT / "tests" / "adversarial"
MANIFEST = json.loads((CORPUS / "manifest.json").read_text())
CASES = MANIFEST["cases"]
BY_ID = {c["id"]: c for c in CASES}
PACK_FILES = ("task.json", "weights.safetensors", "probes.safetensors")


def fmx(*args, timeout=120):
    return subprocess.run([FMX, *map(str, args)], cwd=ROOT, capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, timeout=timeout)


def digest(pack):
    return {f: hashlib.sha256((pack / f).read_bytes()).hexdigest() for f in PACK_FILES}


@pytest.fixture(scope="session")
def pack(example_packs):
    example = pathlib.Path(MANIFEST["pack"].split(":")[0]).stem  # examples/models/NAME.py:build
    return example_packs.tasks(example) / example


@pytest.fixture(scope="session")
def pack_digest(pack):
    return digest(pack)


# ---- candidates ----

def read_tensor(path, key):
    """A float32 or bfloat16 tensor of a safetensors file as a flat list of floats."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    entry = json.loads(raw[8:8 + n])[key]
    a, b = entry["data_offsets"]
    data = raw[8 + n + a:8 + n + b]
    if entry["dtype"] == "F32":
        return list(struct.unpack(f"<{len(data) // 4}f", data)), entry["dtype"]
    assert entry["dtype"] == "BF16", entry["dtype"]
    halves = struct.unpack(f"<{len(data) // 2}H", data)
    return [struct.unpack("<f", struct.pack("<I", h << 16))[0] for h in halves], entry["dtype"]


def canned_source(template, pack, component):
    """The template with the visible probes' outputs of component as constants."""
    manifest = json.loads((pack / "task.json").read_text())
    consts, picks = [], []
    for call in manifest["calls"]:
        probe = manifest["probes"][call["probe"]]
        if call["module"] != component or not probe["visible"] or call["index"] != 0:
            continue
        values, dtype = read_tensor(pack / "probes.safetensors", call["outputs"][0]["key"])
        name = f"CANNED_{len(consts)}"
        consts.append(f"{name} = [{', '.join(repr(v) for v in values)}]")
        picks.append(f"if B == {probe['batch']} and T == {probe['seq']} and "
                     f"bf16 == {dtype == 'BF16'}:\n        return canned(hidden_states, {name})")
    assert consts, "no visible call of " + component
    return (template.replace("# @CANNED@", "\n".join(consts))
            .replace("# @PICK@", "\n    ".join(picks)))


@pytest.fixture(scope="session")
def sources(pack, tmp_path_factory):
    """Case id -> path of its candidate file (templates filled in a temp dir)."""
    out = tmp_path_factory.mktemp("generated")
    paths = {}
    for case in CASES:
        path = CORPUS / case["file"]
        if case.get("generate") == "canned":
            gen = out / case["file"].removesuffix(".in")
            gen.write_text(canned_source(path.read_text(), pack, case["component"]))
            path = gen
        paths[case["id"]] = path
    return paths


# ---- fmx verify ----

def run_verify(pack, case, path):
    args = ["verify", pack, path, "--probes", "all", "--json", "--component", case["component"],
            "--entry", case["entry"]]
    if "timeout" in case["verify"]:
        args += ["--timeout", case["verify"]["timeout"]]
    try:
        res = fmx(*args, timeout=30)
    except subprocess.TimeoutExpired as e:  # a hang: this case fails, the others go on
        return subprocess.CompletedProcess(e.cmd, "hung (30 s)", e.stdout or "", ""), None
    report = json.loads(res.stdout) if res.stdout.strip().startswith("{") else None
    return res, report


def run_verify_many(pack, cases, paths):
    """Cases of one component and entry, without a time limit, verified by one
    fmx (`fmx verify PACK FILE...`: one JSON report per line, in order)."""
    c = cases[0]
    res = fmx("verify", pack, *paths, "--probes", "all", "--json", "--component", c["component"],
              "--entry", c["entry"], timeout=600)
    reports = [json.loads(line) for line in res.stdout.splitlines() if line.startswith("{")]
    by_file = {r.get("file"): r for r in reports}
    out, codes = {}, []
    for case, path in zip(cases, paths):
        report = by_file.get(str(path))
        code = {"match": 0, "mismatch": 1}.get((report or {}).get("status"), 2)
        codes.append(code)
        out[case["id"]] = (subprocess.CompletedProcess(res.args, code, res.stdout, res.stderr),
                           report)
    # one fmx for them all: its status is the worst of theirs
    assert res.returncode == max(codes), (res.returncode, res.stderr[-2000:])
    return out


@pytest.fixture(scope="session")
def verified(pack, sources):
    """Every case verified once: cases with a time limit one fmx each, the
    others one fmx per (component, entry); two at a time."""
    groups, alone = {}, []
    for c in CASES:
        if "timeout" in c["verify"]:
            alone.append(c)
        else:
            groups.setdefault((c["component"], c["entry"]), []).append(c)
    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
        many = [pool.submit(run_verify_many, pack, cs, [sources[c["id"]] for c in cs])
                for cs in groups.values()]
        single = {c["id"]: pool.submit(run_verify, pack, c, sources[c["id"]]) for c in alone}
        out = {k: f.result() for k, f in single.items()}
        for f in many:
            out.update(f.result())
        return out


def probe_facts(p):
    """visible / dtype / padding of a report's probe entry."""
    return {"visible": p["visible"], "dtype": p["dtype"], "padding": p["shape"].split()[-1]}


def matching(probes, where):
    def ok(p):
        facts = probe_facts(p)
        return all(facts[k] in (v if isinstance(v, list) else [v]) for k, v in where.items())
    return [p for p in probes if ok(p)]


@pytest.mark.parametrize("case", CASES, ids=[c["id"] for c in CASES])
def test_verify_outcome(case, verified, pack, pack_digest):
    res, report = verified[case["id"]]
    want = case["verify"]
    # fmx lived: a status of its own, never a signal, and a JSON report
    assert res.returncode in (0, 1, 2), f"fmx died: {res.returncode}\n{res.stderr[-2000:]}"
    assert report is not None, res.stdout[-2000:] + res.stderr[-2000:]
    assert report["status"] == want["status"], json.dumps(report)[:3000]
    assert res.returncode == {"match": 0, "mismatch": 1, "error": 2}[want["status"]]
    if "stage" in want:
        assert report["error"]["stage"] == want["stage"], report["error"]
    if "message" in want:
        assert want["message"] in report["error"]["message"], report["error"]
    probes = report.get("probes", [])
    if want["status"] != "error":
        assert len(probes) == 8, "every probe graded, hidden ones included"
    if want.get("all_fail"):
        assert probes and not any(p["pass"] for p in probes)
    for key, verdict in (("fail_where", False), ("pass_where", True)):
        if key in want:
            chosen = matching(probes, want[key])
            assert chosen, f"no probe matches {want[key]}"
            assert all(p["pass"] is verdict for p in chosen), \
                [(p["probe"], probe_facts(p), p["pass"]) for p in probes]
    if want.get("nonfinite"):
        assert any(o.get("nonfinite", 0) > 0 for p in probes for o in p.get("outputs", []))
    assert digest(pack) == pack_digest, "the pack's files changed"


# ---- the server's submit ----

def serve_supports(option):
    res = fmx("serve", "--help")
    return option in res.stdout + res.stderr


class Server:
    def __init__(self, tasks, *extra):
        self.dir = pathlib.Path(tempfile.mkdtemp(prefix="fmx-adv-"))
        self.addr = f"ipc://{self.dir}/s.sock"
        self.proc = subprocess.Popen(
            [FMX, "serve", "--tasks", tasks, "--db", self.dir / "fmx.db", "--bind", self.addr,
             "--threads", "2", *map(str, extra)],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        with Client(self.addr, timeout=60) as c:
            assert c.hello()["protocol"] == 1
            # by class: the model and component tasks (a decode task is the root's class too)
            self.tasks = {t["class"]: t["id"] for t in c.list_tasks() if t["kind"] != "decode"}
        self.locs = {}

    def submit(self, cls, code, entry="forward"):
        """(observation, reward, info) of one reset + submit; checks the server is
        alive. A submit either ends the episode with a grade, or (an evaluation
        stopped by the server's limits) is refused with reward 0 and no grade."""
        with Client(self.addr, timeout=60) as c:
            c.reset(task=self.tasks[cls], policy="adversarial")
            obs, reward, terminated, _, info = c.step(
                {"tool": "submit", "args": {"code": code, "entry": entry}})
            assert terminated == ("grade" in info), info
            assert terminated or (reward == 0 and obs.get("error")), obs
            assert c.health()["ok"]
        assert self.proc.poll() is None, "the server died"
        return obs, reward, info

    def loc_of(self, cls, path):
        if path not in self.locs:
            self.locs[path] = self.submit(cls, path.read_text())[2]["grade"]["loc"]
        return self.locs[path]

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
        _, err = self.proc.communicate(timeout=60)
        return self.proc.returncode, err


@pytest.fixture(scope="module")
def server(pack):
    extra = ["--eval-timeout", 4] if serve_supports("--eval-timeout") else []
    srv = Server(pack.parent, *extra)
    srv.eval_timeout = bool(extra)
    yield srv
    code, err = srv.stop()
    assert code == 0, err


def independent_loc(source):
    """Logical lines by Python's own tokenizer: ceil(tokens / 48) per logical
    line, imports and the module docstring free (enough for files with one
    statement per line, as the one it checks)."""
    lines, tokens, first = 0, [], True
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type in (tokenize.NEWLINE, tokenize.ENDMARKER):
            if tokens:
                free = tokens[0] in ("import", "from") or (first and tokens[0][0] in "\"'")
                lines += 0 if free else math.ceil(len(tokens) / 48)
                first = False
            tokens = []
            if tok.type == tokenize.NEWLINE:
                continue
        elif tok.type in (tokenize.OP, tokenize.NAME, tokenize.NUMBER, tokenize.STRING):
            tokens.append(tok.string)
    return lines


SUBMITTED = [c for c in CASES if "submit" in c]


@pytest.mark.parametrize("case", SUBMITTED, ids=[c["id"] for c in SUBMITTED])
def test_submit_outcome(case, server, sources, pack, pack_digest):
    want = case["submit"]
    if want.get("needs") == "eval_timeout" and not server.eval_timeout:
        pytest.skip("fmx serve has no --eval-timeout: a hanging candidate would hold a worker")
    path = sources[case["id"]]
    code = path.read_bytes().decode()
    obs, reward, info = server.submit(want["task"], code)
    if "stopped" in want:
        # the server's limits ended the evaluation: refused, nothing graded
        assert reward == 0 and obs["error"] == want["stopped"], obs
        assert digest(pack) == pack_digest, "the pack's files changed"
        return
    grade = info["grade"]
    assert reward == grade["reward"]
    if "correctness" in want:
        assert grade["correctness"] == want["correctness"], grade
    if "correctness_max" in want:
        assert grade["correctness"] <= want["correctness_max"], grade
    if "reward" in want:
        assert grade["reward"] == want["reward"], grade
    if "reward_max" in want:
        assert grade["reward"] <= want["reward_max"], grade
    if grade["correctness"] < 1:
        # partial credit only: no LOC or compile bonus
        assert grade["reward"] == pytest.approx(0.6 * grade["correctness"])
    if "compiled" in want:
        assert grade["compiled"] is want["compiled"], grade
    if want.get("hidden_all_fail"):
        hidden = [p for p in grade["probes"] if not p["visible"]]
        assert hidden and not any(p["pass"] for p in hidden), grade["probes"]
    if "error_message" in want:
        assert want["error_message"] in grade["error"]["message"], grade["error"]
    for secret in want.get("absent", []):
        assert secret not in json.dumps([obs, info]), f"{secret!r} reached the client"
    if "loc_at_least" in want:
        honest = server.loc_of(want["task"], CORPUS / want["loc_at_least"])
        assert grade["loc"] >= honest, (grade["loc"], honest)
    if want.get("loc_tokens"):
        assert grade["loc"] == independent_loc(code), grade["loc"]
    assert digest(pack) == pack_digest, "the pack's files changed"


def test_reference_still_grades_one_after_the_corpus(server, pack, pack_digest):
    """The weights and captures the server (and its workers) serve from memory
    are intact: the reference solution still matches every probe."""
    code = (ROOT / "examples" / "solutions" / "qwen2.py").read_text()
    _, reward, info = server.submit("Qwen2ForCausalLM", code)
    assert info["grade"]["correctness"] == 1.0, info["grade"]
    entries = json.loads((ROOT / "examples" / "solutions" / "qwen2.entries.json").read_text())
    for cls in ("Qwen2MLP", "Qwen2RMSNorm"):
        _, _, info = server.submit(cls, code, entries[cls])
        assert info["grade"]["correctness"] == 1.0, (cls, info["grade"])
    assert digest(pack) == pack_digest


def test_corpus_files_are_all_in_the_manifest():
    listed = {c["file"] for c in CASES}
    on_disk = {p.name for p in CORPUS.iterdir() if p.suffix in (".py", ".in")}
    assert on_disk == listed, on_disk ^ listed
