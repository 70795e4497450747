"""The grade is computed where candidate code cannot reach it (docs/security.md).

Candidate code runs in a fresh, sandboxed evaluation process per evaluation that
holds the weights and the inputs of the calls it runs, and nothing else: these
tests look at such a process from outside, while the candidate runs, and grade
attacks of each class through the real server:
  - no reference output of any probe, and no hidden probe's data, is mapped or
    resident in the process that runs candidate code;
  - memory left by an earlier (honest) evaluation cannot be read back;
  - hidden probes run under a second weight set: weights baked into the file fail;
  - a graded step says nothing about time.
"""
import json
import os
import pathlib
import subprocess
import tempfile
import time

import pytest

from fmx import Client, safetensors

ROOT = pathlib.Path(__file__).resolve().parents[2]
FMX = os.environ.get("FMX_BIN", str(ROOT / "build" / "fmx"))
SOLUTION = ROOT / "examples" / "solutions" / "qwen2.py"
MLP = "model.layers.0.mlp"


def fmx(*args, timeout=300):
    return subprocess.run([FMX, *map(str, args)], cwd=ROOT, capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, timeout=timeout)


@pytest.fixture(scope="module")
def pack(example_packs):
    return example_packs.tasks("qwen2") / "qwen2"


def manifest(pack):
    return json.loads((pack / "task.json").read_text())


def needles(pack, module):
    """64-byte windows of everything no evaluation process may hold: every
    reference output of module's calls (visible and hidden probes), and the
    inputs of the hidden ones. {description: bytes}"""
    import torch
    man = manifest(pack)
    tensors = safetensors.load_file(pack / "probes.safetensors")
    out = {}
    for call in man["calls"]:
        if call["module"] != module:
            continue
        visible = man["probes"][call["probe"]]["visible"]
        ios = [("output", o) for o in call.get("outputs", [])]
        if not visible:
            ios += [("hidden input", i) for i in call.get("inputs", [])]
        for what, io in ios:
            key = io.get("key")
            if not key or key not in tensors:
                continue
            raw = bytes(tensors[key].contiguous().view(-1).view(torch.uint8).numpy())
            if len(raw) >= 256:
                mid = len(raw) // 2 // 64 * 64
                out[f"{what} {key}"] = raw[mid:mid + 64]
    assert out, "no reference data found in the pack"
    return out


def children(pid):
    found = []
    for d in pathlib.Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        if ppid == pid:
            found.append(int(d.name))
    return found


def sandboxed(pid):
    try:
        for line in pathlib.Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("Seccomp:"):
                return line.split()[1] == "2"
    except OSError:
        pass
    return False


def memory_of(pid):
    """(mapped paths, readable non-library memory) of a process."""
    paths, chunks = set(), []
    with open(f"/proc/{pid}/maps") as maps, open(f"/proc/{pid}/mem", "rb", 0) as mem:
        for line in maps:
            parts = line.split()
            lo, hi = (int(x, 16) for x in parts[0].split("-"))
            path = parts[5] if len(parts) > 5 else ""
            paths.add(path)
            if "r" not in parts[1] or ".so" in path or path in ("[vvar]", "[vsyscall]"):
                continue
            if path.endswith(".pyc") or "/python3" in path:
                continue
            try:
                mem.seek(lo)
                chunks.append(mem.read(hi - lo))
            except OSError:
                pass
    return paths, b"".join(chunks)


@pytest.mark.skipif(os.geteuid() != 0, reason="reading another process's memory needs root")
def test_nothing_worth_stealing_where_candidate_code_runs(pack, tmp_path):
    """While a candidate runs (it spins), no reference output of any probe and no
    hidden probe's input is mapped or resident in its process or its zygote."""
    spin = tmp_path / "spin.py"
    spin.write_text("import torch\n\ndef forward(x, weights):\n"
                    "    y = x\n    while True:\n        y = y + 0\n")
    proc = subprocess.Popen([FMX, "verify", pack, spin, "--component", MLP, "--probes", "all",
                             "--timeout", "60"], stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        child, zygote = None, None
        deadline = time.monotonic() + 60
        while child is None and time.monotonic() < deadline:
            for z in children(proc.pid):
                for c in children(z):
                    if sandboxed(c):
                        zygote, child = z, c
            assert proc.poll() is None, proc.communicate()
            time.sleep(0.05)
        assert child, "no sandboxed evaluation process appeared"
        want = needles(pack, MLP)
        for pid in (child, zygote):
            paths, memory = memory_of(pid)
            assert not any(p.endswith(("probes.safetensors", "task.json")) for p in paths), paths
            assert len(memory) > 1 << 20  # the scan did read the process
            found = [what for what, b in want.items() if b in memory]
            assert not found, f"process {pid} holds {found}"
    finally:
        proc.kill()
        proc.communicate()


def test_weights_file_is_the_only_pack_file_an_evaluation_maps(pack, tmp_path):
    """The file a candidate could read past its inputs into: only its own copies."""
    probe = tmp_path / "probe.py"
    probe.write_text("import torch\n\ndef forward(x, weights):\n"
                     "    return torch.from_file('" + str(pack / "probes.safetensors") +
                     "', size=16)\n")
    res = fmx("verify", pack, probe, "--component", MLP, "--json")
    report = json.loads(res.stdout)
    assert res.returncode == 2
    assert report["error"]["stage"] == "run"
    assert "Operation not permitted" in report["error"]["message"] or \
        "ermission" in report["error"]["message"], report["error"]


class Server:
    def __init__(self, tasks, *extra):
        self.dir = pathlib.Path(tempfile.mkdtemp(prefix="fmx-int-"))
        self.addr = f"ipc://{self.dir}/s.sock"
        self.proc = subprocess.Popen(
            [FMX, "serve", "--tasks", tasks, "--db", self.dir / "fmx.db", "--bind", self.addr,
             *map(str, extra)],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        with Client(self.addr, timeout=120) as c:
            # by class: the model and component tasks (a decode task is the root's class too)
            self.tasks = {t["class"]: t["id"] for t in c.list_tasks() if t["kind"] != "decode"}

    def step(self, cls, tool, args):
        with Client(self.addr, timeout=120) as c:
            c.reset(task=self.tasks[cls], policy="integrity")
            return c.step({"tool": tool, "args": args})

    def stop(self):
        self.proc.terminate()
        self.proc.communicate(timeout=60)


@pytest.fixture(scope="module")
def server(pack):
    # the baked-weights file is larger than the default 64 KiB code budget
    srv = Server(pack.parent, "--workers", 1, "--max-code-bytes", 1 << 20)
    yield srv
    srv.stop()


MLP_SOLUTION = """import torch
import torch.nn.functional as F

def forward(x, weights):
    g = F.linear(x, weights["gate_proj.weight"])
    u = F.linear(x, weights["up_proj.weight"])
    return F.linear(F.silu(g) * u, weights["down_proj.weight"])
"""

LEFTOVER = """import torch

def forward(x, weights):
    # the shape of the output, memory never written: whatever the allocator hands back
    return torch.empty_like(x)
"""


def test_memory_of_an_earlier_evaluation_is_gone(server):
    """After an honest evaluation on the same (single) worker, uninitialised
    memory earns nothing: every evaluation starts from fresh memory."""
    obs, _, _, _, _ = server.step("Qwen2MLP", "verify_component",
                                  {"path": MLP, "code": MLP_SOLUTION})
    assert obs["data"]["status"] == "match", obs["text"]
    for tool in ("verify_component", "submit"):
        args = {"code": LEFTOVER} if tool == "submit" else {"path": MLP, "code": LEFTOVER}
        obs, reward, _, _, info = server.step("Qwen2MLP", tool, args)
        if tool == "submit":
            assert reward == 0 and info["grade"]["correctness"] == 0, info["grade"]
        else:
            assert obs["data"]["passed"] == 0, obs["text"]


def test_a_graded_step_reports_no_time(server):
    _, reward, terminated, _, info = server.step("Qwen2MLP", "submit", {"code": MLP_SOLUTION})
    assert terminated and reward > 0.6, info
    assert "ms" not in info
    assert all(set(p) == {"probe", "visible", "pass"} for p in info["grade"]["probes"])


def baked(pack):
    """The MLP solution with down_proj's weight written into the file."""
    w = safetensors.load_file(pack / "weights.safetensors")["model.layers.0.mlp.down_proj.weight"]
    rows = ",\n    ".join("[" + ", ".join(repr(float(v)) for v in row) + "]" for row in w.tolist())
    return MLP_SOLUTION.replace('weights["down_proj.weight"]', "DOWN.to(x.dtype)").replace(
        "def forward", f"DOWN = torch.tensor([\n    {rows}])\n\n\ndef forward")


def test_weights_baked_into_the_file_fail_the_hidden_probes(pack, server, tmp_path):
    if manifest(pack).get("hidden_weights") is None:
        pytest.skip("this exporter writes no hidden weight set")
    src = baked(pack)
    cand = tmp_path / "baked.py"
    cand.write_text(src)
    visible = fmx("verify", pack, cand, "--component", MLP, "--json")
    assert visible.returncode == 0, visible.stdout  # right on the public weights
    res = fmx("verify", pack, cand, "--component", MLP, "--probes", "all", "--json")
    report = json.loads(res.stdout)
    hidden = [p for p in report["probes"] if not p["visible"]]
    assert hidden and not any(p["pass"] for p in hidden)
    honest = tmp_path / "honest.py"
    honest.write_text(MLP_SOLUTION)
    assert fmx("verify", pack, honest, "--component", MLP, "--probes", "all").returncode == 0
    _, reward, _, _, info = server.step("Qwen2MLP", "submit", {"code": src})
    assert info["grade"]["correctness"] < 1 and reward < 0.6
