"""The evaluation sandbox as a client sees it: black-box, through the Python
client (fmx.client) on a real `fmx serve --eval-timeout 3 --workers 2`.

Covered: a candidate whose `while` loop never ends gets a `timeout` error
observation within the limit while the server keeps answering other clients
(and runs their verifies on the other worker); the episode goes on and the
next verify works (the worker was replaced); a submit that hangs ends the
episode with reward 0 (logged); a budget's
last step that times out still truncates the episode and grades the last
verified code; a huge allocation is a clean run error (or `oom`); a worker
killed by a signal mid-job is `crashed`; workers are the server's children,
named fmx-worker, never zombies, map nothing shared (not the log), and die
with the server (SIGTERM and SIGKILL); the bind rule (loopback only unless --curve-secret-key or
--insecure) and a CURVE handshake with a key from `fmx keygen`.
"""
import contextlib
import os
import pathlib
import signal
import socket
import sqlite3
import stat
import subprocess
import tempfile
import time

import msgpack
import pytest
import zmq

from fmx import Client, EpisodeOver, Timeout

ROOT = pathlib.Path(__file__).resolve().parents[2]
FMX = os.environ.get("FMX_BIN", str(ROOT / "build" / "fmx"))
SOLUTION = (ROOT / "examples" / "solutions" / "qwen2.py").read_text()
TASK = "qwen2/Qwen2MLP"
TIMEOUT_S = 3
HANG = """import torch
from torch import Tensor
from typing import Dict


def forward(x: Tensor, weights: Dict[str, Tensor]) -> Tensor:
    y = x
    while bool(y.sum() == y.sum()):
        y = y + 1.0
    return y
"""
HUGE = """import torch
from torch import Tensor
from typing import Dict


def forward(x: Tensor, weights: Dict[str, Tensor]) -> Tensor:
    return x + torch.empty(1 << 40).sum()
"""


def verify(code, entry="forward"):
    return {"tool": "verify_component", "args": {"code": code, "entry": entry}}


def submit(code, entry="forward"):
    return {"tool": "submit", "args": {"code": code, "entry": entry}}


@pytest.fixture(scope="module")
def packs(example_packs):
    return example_packs.tasks("qwen2")


class Server:
    """`fmx serve` on an ipc socket in a fresh directory."""

    def __init__(self, packs, *extra, bind=None):
        self.dir = pathlib.Path(tempfile.mkdtemp(prefix="fmx-sbx-"))
        self.addr = bind or f"ipc://{self.dir}/s.sock"
        self.db = self.dir / "fmx.db"
        self.log = open(self.dir / "stderr", "w+")
        self.proc = subprocess.Popen([FMX, "serve", "--tasks", packs, "--db", self.db, "--bind",
                                      self.addr, *map(str, extra)],
                                     stdin=subprocess.DEVNULL, stderr=self.log)
        deadline = time.monotonic() + 60
        while "listening on" not in self.stderr():
            assert self.proc.poll() is None, self.stderr()
            assert time.monotonic() < deadline, "the server did not start"
            time.sleep(0.05)

    def stderr(self):
        return (self.dir / "stderr").read_text()

    def client(self, timeout=30):
        return Client(self.addr, timeout=timeout)

    def children(self):
        """The server's child processes: (pid, comm, state)."""
        out = []
        for task in pathlib.Path(f"/proc/{self.proc.pid}/task").iterdir():
            for pid in (task / "children").read_text().split():
                with contextlib.suppress(FileNotFoundError):
                    comm = pathlib.Path(f"/proc/{pid}/comm").read_text().strip()
                    st = pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
                    out.append((int(pid), comm, st))
        return out

    def workers(self):
        return [c for c in self.children() if c[1] == "fmx-worker"]

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(timeout=60)
        self.log.close()


@pytest.fixture(scope="module")
def server(packs):
    s = Server(packs, "--workers", 2, "--eval-timeout", TIMEOUT_S, "--max-steps", 3)
    yield s
    s.stop()


def gone(pid):
    """The process has exited (it may linger as a zombie of init)."""
    try:
        st = pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return True
    return st == "Z"


def test_hang_times_out_while_others_are_served(server):
    with server.client() as a, server.client() as b:
        obs, info = a.reset(task=TASK)
        ep = info["episode"]
        t0 = time.monotonic()
        a.send([verify(HANG)], [ep])
        time.sleep(0.3)  # the hang is on a worker now
        # Meanwhile another client is served: cheap ops, and a verify on the other worker.
        t1 = time.monotonic()
        assert b.hello()["protocol"] == 1
        b.reset(task=TASK)
        o, *_ = b.step({"tool": "get_weight_info", "args": {}})
        assert o.get("error") is None
        o, _, _, _, i = b.step(verify(SOLUTION, "mlp"))
        assert o["data"]["status"] == "match"
        assert time.monotonic() - t1 < 2, "the other client waited on the hung worker"
        assert b.health()["workers"]["busy"] == 1
        with pytest.raises(Timeout):
            a.recv(timeout=0.1)  # still running
        [(got_ep, (obs, reward, terminated, truncated, info))] = a.recv(timeout=TIMEOUT_S + 5)
        elapsed = time.monotonic() - t0
        assert got_ep == ep
        assert TIMEOUT_S - 0.5 < elapsed < TIMEOUT_S + 3
        assert obs["error"] == "timeout" and info["error"] == "timeout"
        assert obs["data"]["fate"] == "timeout" and obs["data"]["limit_s"] == TIMEOUT_S
        assert "wall-clock" in obs["text"]
        assert (reward, terminated, truncated) == (0.0, False, False)
        assert info["step"] == 1 and info["status"] == "open"
        # The episode goes on; only the evaluation process was killed, the
        # worker that graded it verifies the next step.
        obs, _, terminated, _, info = a.step(verify(SOLUTION, "mlp"))
        assert obs["data"]["status"] == "match" and not terminated and info["step"] == 2
        w = a.health()["workers"]
        assert w["timeouts"] >= 1 and w["restarts"] == 0 and w["ready"] == 2 and w["busy"] == 0


def test_submit_that_hangs_ends_the_episode_with_reward_0(server):
    # (were it to go on, code that hangs only on some hidden input could read the hidden probes)
    with server.client() as c:
        _, info = c.reset(task=TASK)
        ep = info["episode"]
        obs, reward, terminated, truncated, info = c.step(submit(HANG))
        assert obs["error"] == "timeout" and terminated and not truncated
        assert reward == 0.0 and info["status"] == "submitted"
        assert info["grade"]["error"]["stage"] == "timeout"
        assert obs["data"]["grade"]["correctness"] == 0.0
        with pytest.raises(EpisodeOver):
            c.step(submit(SOLUTION, "mlp"))
    with sqlite3.connect(server.db) as db:
        (code, r), = db.execute("SELECT code, reward FROM submissions WHERE episode = ?",
                                (ep,)).fetchall()
    assert code == HANG and r == 0.0


def test_last_step_timeout_still_grades_the_last_verified_code(server):
    with server.client() as c:
        _, info = c.reset(task=TASK)
        ep = info["episode"]
        obs, *_ = c.step(verify(SOLUTION, "mlp"))
        assert obs["data"]["status"] == "match"
        c.step({"tool": "trace_ops", "args": {}})
        # the budget's last step (--max-steps 3) hangs: truncated, the verified code graded
        obs, reward, terminated, truncated, info = c.step(verify(HANG))
        assert obs["error"] == "timeout" and truncated and not terminated
        assert info["status"] == "truncated" and reward > 0.5
        assert info["grade"]["correctness"] == 1.0
        assert "Budget exhausted" in obs["text"]
    with sqlite3.connect(server.db) as db:
        (code, r, trunc), = db.execute("SELECT code, reward, truncated FROM submissions "
                                       "WHERE episode = ?", (ep,)).fetchall()
    assert code == SOLUTION and trunc == 1 and abs(r - reward) < 1e-12


def test_huge_allocation_is_a_clean_error(server):
    with server.client() as c:
        c.reset(task=TASK)
        obs, _, terminated, _, info = c.step(verify(HUGE))
        assert not terminated
        if obs.get("error") is not None:
            assert obs["error"] == "oom"
        else:
            assert obs["data"]["status"] == "error"
            assert obs["data"]["error"]["stage"] == "run"
            assert "allocate" in obs["data"]["error"]["message"]
        obs, *_ = c.step(verify(SOLUTION, "mlp"))
        assert obs["data"]["status"] == "match"


def test_worker_killed_mid_job_is_crashed(server):
    with server.client() as c:
        _, info = c.reset(task=TASK)
        c.send([verify(HANG)], [info["episode"]])
        time.sleep(0.5)
        before = server.workers()
        assert len(before) == 2
        assert [c for c in server.children() if c[1] == "fmx-spawner"]
        for pid, _, _ in before:
            os.kill(pid, signal.SIGSEGV)
        [(_, (obs, _, terminated, _, info))] = c.recv(timeout=TIMEOUT_S)
        assert obs["error"] == "crashed" and "signal 11" in obs["data"]["detail"]
        assert not terminated
        obs, *_ = c.step(verify(SOLUTION, "mlp"))
        assert obs["data"]["status"] == "match"
    after = server.workers()
    assert len(after) == 2 and not {p for p, _, _ in before} & {p for p, _, _ in after}
    assert all(st != "Z" for _, _, st in server.children()), server.children()
    # replacements started after the log was opened: they do not map it (nor anything shared)
    for pid, _, _ in after:
        with contextlib.suppress(PermissionError):
            maps = pathlib.Path(f"/proc/{pid}/maps").read_text()
            assert "fmx.db" not in maps
            assert not [m for m in maps.splitlines() if m.split()[1][3] == "s"], maps


def test_workers_die_with_the_server(packs):
    for sig in (signal.SIGTERM, signal.SIGKILL):
        s = Server(packs, "--workers", 2)
        pids = [p for p, _, _ in s.children()]
        assert len(pids) == 3  # two workers and the spawner
        s.proc.send_signal(sig)
        s.proc.wait(timeout=30)
        deadline = time.monotonic() + 5
        while not all(gone(p) for p in pids) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert all(gone(p) for p in pids), (sig, pids)
        s.stop()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_bind_rule(packs, tmp_path):
    port = free_port()
    res = subprocess.run([FMX, "serve", "--tasks", packs, "--db", tmp_path / "db",
                          "--bind", f"tcp://0.0.0.0:{port}"], capture_output=True, text=True,
                         timeout=30)
    assert res.returncode == 2
    assert "refusing to bind" in res.stderr and "--curve-secret-key" in res.stderr
    s = Server(packs, "--workers", 1, "--insecure", bind=f"tcp://0.0.0.0:{port}")
    try:
        with Client(f"tcp://127.0.0.1:{port}", timeout=10) as c:
            assert c.hello()["protocol"] == 1
    finally:
        s.stop()


def test_curve(packs, tmp_path):
    key = tmp_path / "server.key"
    res = subprocess.run([FMX, "keygen", "-o", key], capture_output=True, text=True, timeout=30)
    assert res.returncode == 0, res.stderr
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    public = res.stdout.split("=", 1)[1].strip()
    assert len(public) == 40 and public in key.read_text()
    port = free_port()
    s = Server(packs, "--workers", 1, "--curve-secret-key", key, bind=f"tcp://0.0.0.0:{port}")
    ctx = zmq.Context()
    try:
        assert "with CURVE" in s.stderr()
        # A client with the server's public key (and a key pair of its own): answered.
        sock = ctx.socket(zmq.DEALER)
        sock.curve_publickey, sock.curve_secretkey = zmq.curve_keypair()
        sock.curve_serverkey = public.encode()
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(f"tcp://127.0.0.1:{port}")
        sock.send(msgpack.packb({"op": "hello", "req": 7}))
        assert sock.poll(10000), "no reply over CURVE"
        reply = msgpack.unpackb(sock.recv())
        assert reply["ok"] and reply["req"] == 7 and reply["protocol"] == 1
        sock.close()
        # A client without CURVE gets nothing.
        with Client(f"tcp://127.0.0.1:{port}", timeout=1, context=ctx) as c:
            with pytest.raises(Timeout):
                c.hello()
    finally:
        s.stop()
        ctx.term()
