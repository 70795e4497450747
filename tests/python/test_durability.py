"""Crash durability of `fmx serve` (DESIGN.md decision 7: "a crash loses
nothing that was acknowledged"), black-box through the Python client.

Client threads stream episodes (cheap tools, verify_component with the
reference solution or a wrong one, submit) over an ipc:// socket while the
server is SIGKILLed at seeded random moments, 8 times (FMX_DURABILITY_CYCLES), always restarted on
the same SQLite log. After every restart, before anyone else writes:

- `PRAGMA integrity_check` is ok (python sqlite3, read-only);
- every step a client got a reply for is in the log exactly once, with the
  tool that was sent, and every acknowledged episode end (submit) is there
  with its submission;
- every episode's steps have contiguous idx 0..steps-1;
- no episode is left `open`: the ones the crash interrupted are `aborted`;
- the worker children the killed server had are gone too;
- the server serves again: the next cycle's first reset and steps succeed,
  and after the last cycle a whole episode is played and graded.

What is random is seeded (delays, plans); thread timing is not, so where the
kill lands differs between runs. The assertions hold wherever it lands, and
the test checks that kills did land while steps were in flight.
"""
import contextlib
import json
import os
import pathlib
import random
import shutil
import signal
import sqlite3
import subprocess
import tempfile
import threading
import time

import pytest

from fmx import Client, FmxError, Timeout

ROOT = pathlib.Path(__file__).resolve().parents[2]
FMX = os.environ.get("FMX_BIN", str(ROOT / "build" / "fmx"))
SOLUTIONS = ROOT / "examples" / "solutions"
SEED = 20240607
CYCLES = int(os.environ.get("FMX_DURABILITY_CYCLES", "8"))  # more: a deeper run
CLIENTS = 4  # threads, one socket each
EPISODES_PER_CLIENT = 2  # open at once per client
WINDOW = 2  # steps in flight per episode
KILL_DELAY_S = (0.05, 1.0)  # after the clients started streaming
READS = [("read_module_source", {}), ("get_weight_info", {}), ("trace_ops", {}),
         ("capture_intermediate", {"probe": 0})]


@pytest.fixture(scope="module")
def packs(example_packs):
    """The qwen2 example pack only: fewer tasks, a faster restart."""
    return example_packs.tasks("qwen2")


def children(pid):
    """Pids of pid's child processes (all its threads' children)."""
    out = set()
    with contextlib.suppress(OSError):
        for task in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(OSError):
                text = pathlib.Path(f"/proc/{pid}/task/{task}/children").read_text()
                out.update(int(p) for p in text.split())
    return out


def alive(pid):
    """True while pid runs (a zombie or a missing pid is dead)."""
    try:
        stat = pathlib.Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


class Crashable:
    """`fmx serve` on a fixed ipc socket and log that outlive the process."""

    def __init__(self, packs):
        self.dir = pathlib.Path(tempfile.mkdtemp(prefix="fmx-kill-"))
        self.addr = f"ipc://{self.dir}/s.sock"
        self.db = self.dir / "fmx.db"
        self.stderr_path = self.dir / "stderr.log"
        self.packs = packs
        self.proc = None

    def start(self):
        with open(self.stderr_path, "a") as err:
            self.proc = subprocess.Popen(
                [FMX, "serve", "--tasks", self.packs, "--db", self.db, "--bind", self.addr,
                 "--threads", "2"], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                stderr=err)
        with Client(self.addr, timeout=60) as c:
            assert c.hello()["protocol"] == 1, self.stderr()

    def kill9(self):
        """SIGKILL; returns the children the server had just before."""
        kids = children(self.proc.pid)
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=30)
        return kids

    def stop(self):
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=40)

    def stderr(self):
        return self.stderr_path.read_text(errors="replace")[-4000:]

    def sql(self, query, *params):
        with contextlib.closing(sqlite3.connect(f"file:{self.db}?mode=ro", uri=True)) as conn:
            return conn.execute(query, params).fetchall()


class Ledger:
    """What clients were told (acknowledged), across all cycles."""

    def __init__(self):
        self.lock = threading.Lock()
        self.opened = set()  # episodes whose reset was answered
        self.steps = {}  # (episode, idx) -> tool, for every answered step
        self.ended = {}  # episode -> status its last answered step reported
        self.errors = []  # anything a client should never see
        self.unanswered = 0  # steps sent that the kill left unanswered (this cycle)


def qwen2_plan(rng, task, code, entry):
    """An episode's actions: cheap reads, verifies (right or wrong code), then submit."""
    wrong = code.replace("torch.rsqrt(", "torch.sqrt(").replace("F.silu(", "F.gelu(")
    actions = []
    for _ in range(rng.randint(3, 10)):
        r = rng.random()
        if r < 0.2:
            actions.append({"tool": "verify_component", "args": {"code": code, "entry": entry}})
        elif r < 0.3:
            actions.append({"tool": "verify_component", "args": {"code": wrong, "entry": entry}})
        else:
            tool, args = READS[rng.randrange(len(READS))]
            actions.append({"tool": tool, "args": args})
    actions.append({"tool": "submit", "args": {"code": code, "entry": entry}})
    return actions


def stream(addr, seed, tasks, kill, ledger):
    """One client: keeps EPISODES_PER_CLIENT episodes stepping, WINDOW steps in flight
    each, opening a new one whenever one ends, until `kill` is set; then reads what
    the dead server had already sent."""
    rng = random.Random(seed)
    code = (SOLUTIONS / "qwen2.py").read_text()
    entries = json.loads((SOLUTIONS / "qwen2.entries.json").read_text())
    # A short timeout for reset_many, the one synchronous call: one that
    # the kill interrupts must not hold the cycle up.
    c = Client(addr, timeout=0.5)
    plans = {}  # episode -> actions not sent yet
    tools = {}  # episode -> tools sent, in order: the k-th has idx k
    inflight = {}  # episode -> steps sent, not answered

    def open_episodes(n):
        chosen = [rng.choice(tasks) for _ in range(n)]
        while True:
            try:
                opened = c.reset_many([t["id"] for t in chosen], policy="durability")
                break
            except Timeout:
                if kill.is_set():
                    raise
                # slow, not dead: ask again (episodes opened by the late replies
                # stay open unacknowledged, which the checks allow)
        for (ep, _obs, _info), task in zip(opened, chosen):
            with ledger.lock:
                ledger.opened.add(ep)
            plans[ep] = qwen2_plan(rng, task, code, entries[task["class"]])
            tools[ep] = []
            inflight[ep] = 0

    def refill():
        for ep in list(plans):
            while plans[ep] and inflight[ep] < WINDOW:
                action = plans[ep].pop(0)
                c.send([action], [ep])
                tools[ep].append(action["tool"])
                inflight[ep] += 1

    try:
        open_episodes(EPISODES_PER_CLIENT)
        refill()
        while True:
            killed = kill.is_set()
            try:
                results = c.recv(timeout=0.3 if killed else 0.05)
            except Timeout:
                if killed:
                    break  # nothing more can come from a dead server
                continue
            if not results:
                break  # nothing pending (only after the kill: no refill)
            finished = 0
            for ep, result in results:
                inflight[ep] -= 1
                if isinstance(result, FmxError):
                    with ledger.lock:
                        ledger.errors.append(f"episode {ep}: {result!r}")
                    continue
                obs, _reward, terminated, truncated, info = result
                idx = info["step"] - 1
                with ledger.lock:
                    if obs["tool"] != tools[ep][idx]:
                        ledger.errors.append(f"episode {ep} step {idx}: sent {tools[ep][idx]}, "
                                             f"answered {obs['tool']}")
                    ledger.steps[(ep, idx)] = tools[ep][idx]
                    if terminated or truncated:
                        ledger.ended[ep] = info["status"]
                if terminated or truncated:
                    del plans[ep]
                    finished += 1
            if killed:
                continue
            if finished:
                open_episodes(finished)
            refill()
    except Timeout:
        if not kill.is_set():
            with ledger.lock:
                ledger.errors.append("a request timed out while the server was up")
    except Exception as e:  # noqa: BLE001 — reported by the main thread
        if not kill.is_set():
            with ledger.lock:
                ledger.errors.append(repr(e))
    finally:
        with ledger.lock:
            ledger.unanswered += sum(inflight.values())
        c.disconnect()


def check_log(srv, ledger):
    """The log after a restart, before any client writes to it."""
    assert srv.sql("PRAGMA integrity_check") == [("ok",)]
    status = dict(srv.sql("SELECT id, status FROM episodes"))
    assert not [ep for ep, st in status.items() if st == "open"], "episodes left open"
    for ep in ledger.opened:
        assert ep in status, f"acknowledged reset of episode {ep} lost"
        if ep in ledger.ended:
            assert status[ep] == ledger.ended[ep], (ep, status[ep])
        else:  # interrupted; or ended, committed, and killed before the client read it
            assert status[ep] in ("aborted", "submitted", "truncated"), (ep, status[ep])
    rows = srv.sql("SELECT episode, idx, tool FROM steps ORDER BY episode, idx")
    logged = {}
    by_episode = {}
    for ep, idx, tool in rows:
        assert (ep, idx) not in logged, f"step {ep}/{idx} logged twice"
        logged[(ep, idx)] = tool
        by_episode.setdefault(ep, []).append(idx)
    missing = [k for k in ledger.steps if k not in logged]
    assert not missing, f"acknowledged steps lost: {missing[:10]}"
    wrong = [k for k, tool in ledger.steps.items() if logged[k] != tool]
    assert not wrong, f"acknowledged steps logged with another tool: {wrong[:10]}"
    counts = dict(srv.sql("SELECT id, steps FROM episodes"))
    for ep, n in counts.items():
        assert by_episode.get(ep, []) == list(range(n)), f"episode {ep}: idx not 0..{n - 1}"
    subs = dict(srv.sql("SELECT episode, count(*) FROM submissions GROUP BY episode"))
    for ep, st in status.items():  # a submit's step, submission and end are one commit
        want = {"submitted": (1,), "truncated": (0, 1)}.get(st, (0,))
        assert subs.get(ep, 0) in want, f"episode {ep} ({st}): {subs.get(ep, 0)} submissions"


def test_kill9_at_random_moments_loses_nothing_acknowledged(packs):
    rng = random.Random(SEED)
    srv = Crashable(packs)
    ledger = Ledger()
    t0 = time.monotonic()
    srv.start()
    with Client(srv.addr, timeout=30) as c:  # decode tasks take other code: test_decode.py
        tasks = [t for t in c.list_tasks() if t["kind"] != "decode"]
    orphans = []
    kills_mid_stream = 0  # kills that left steps unanswered
    for cycle in range(CYCLES):
        kill = threading.Event()
        threads = [threading.Thread(target=stream, args=(
            srv.addr, rng.randrange(1 << 30), tasks, kill, ledger)) for _ in range(CLIENTS)]
        ledger.unanswered = 0
        for t in threads:
            t.start()
        time.sleep(rng.uniform(*KILL_DELAY_S))
        kill.set()
        was_up = srv.proc.poll() is None
        kids = srv.kill9()
        for t in threads:
            t.join(timeout=30)
            assert not t.is_alive(), "a client thread hung after the kill"
        assert was_up, f"cycle {cycle}: the server died before the kill:\n{srv.stderr()}"
        assert not ledger.errors, (cycle, ledger.errors[:5], srv.stderr())
        kills_mid_stream += ledger.unanswered > 0
        # worker processes die with the server (no orphans left running)
        deadline = time.monotonic() + 5
        while any(alive(k) for k in kids) and time.monotonic() < deadline:
            time.sleep(0.05)
        orphans += [k for k in kids if alive(k)]
        srv.start()
        check_log(srv, ledger)
    assert not orphans, f"worker processes outlived the killed server: {orphans}"

    # the restarted server serves a whole episode, graded and logged
    code = (SOLUTIONS / "qwen2.py").read_text()
    entry = json.loads((SOLUTIONS / "qwen2.entries.json").read_text())["Qwen2MLP"]
    with Client(srv.addr, timeout=30) as c:
        c.reset(task="qwen2/Qwen2MLP", policy="after-crashes")
        c.step({"tool": "trace_ops", "args": {}})
        obs, reward, terminated, _trunc, info = c.step(
            {"tool": "submit", "args": {"code": code, "entry": entry}})
        assert terminated and info["grade"]["correctness"] == 1.0, obs["text"]
        episode = c.episode
    assert srv.stop() == 0, srv.stderr()
    assert srv.sql("SELECT status, steps FROM episodes WHERE id = ?", episode) == [
        ("submitted", 2)]
    # the crashes happened while work was streaming, not between bursts
    assert len(ledger.steps) >= 10 * CYCLES, len(ledger.steps)
    assert kills_mid_stream >= CYCLES // 2, kills_mid_stream
    aborted = srv.sql("SELECT count(*) FROM episodes WHERE status = 'aborted'")[0][0]
    assert aborted >= CYCLES, aborted  # each kill interrupted open episodes
    shutil.rmtree(srv.dir)  # kept when the test fails
    print(f"{CYCLES} kills in {time.monotonic() - t0:.1f} s: {len(ledger.steps)} acknowledged "
          f"steps, {len(ledger.opened)} episodes ({len(ledger.ended)} ended, {aborted} aborted), "
          f"{kills_mid_stream} kills with steps in flight")
