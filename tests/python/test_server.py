"""`fmx serve` as a trainer drives it: black-box, through the Python client
(fmx.client) and raw ZeroMQ sockets, on a real server over an ipc:// socket
with its own SQLite log.

Covered: a full oracle episode on every task (reward = 0.6 + 0.25·loc +
0.15·compile with correctness 1), the null policy scoring 0, truncation at
the step budget (graded as the last verified code), every class of malformed
message answered with a structured error while the server keeps serving, 16
concurrent clients with no lost or duplicated reply, bounded serving (the
per-client cap on evaluations, the caps on waiting request bytes, observations
cut to the budget before they are logged, idle episodes aborted, routing ids
set by clients refused with an error), the episode log checked with sqlite3,
`fmx run` / `fmx leaderboard`, and SIGTERM with episodes open. Fair sharing of
the workers: test_fairness.py.
"""
import contextlib
import json
import os
import pathlib
import signal
import sqlite3
import subprocess
import tempfile
import threading
import time

import msgpack
import pytest
import zmq

from fmx import (BadRequest, Client, EpisodeOver, FmxError, NotYourEpisode, Timeout,
                 UnknownEpisode, UnknownOp, UnknownTask)
from fmx.client import Busy, RoutingIdRefused, error_from_reply

ROOT = pathlib.Path(__file__).resolve().parents[2]
FMX = os.environ.get("FMX_BIN", str(ROOT / "build" / "fmx"))
SOLUTIONS = ROOT / "examples" / "solutions"
NULL_CODE = "def forward() -> int:\n    return 0\n"
READS = [("read_module_source", {}), ("get_weight_info", {}), ("trace_ops", {}),
         ("capture_intermediate", {"probe": 0})]


def fmx(*args, **kw):
    return subprocess.run([FMX, *map(str, args)], cwd=ROOT, capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, timeout=120, **kw)


@pytest.fixture(scope="session")
def packs(example_packs):
    return example_packs.tasks("qwen2", "gpt2")


class Server:
    """`fmx serve` on an ipc socket in a fresh directory, with its own log."""

    def __init__(self, packs, *extra):
        # ipc paths are limited to ~100 bytes: keep the socket under /tmp
        self.dir = pathlib.Path(tempfile.mkdtemp(prefix="fmx-test-"))
        self.addr = f"ipc://{self.dir}/s.sock"
        self.db = self.dir / "fmx.db"
        self.proc = subprocess.Popen([FMX, "serve", "--tasks", packs, "--db", self.db,
                                      "--bind", self.addr, "--threads", "2", *map(str, extra)],
                                     stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True)
        with Client(self.addr, timeout=60) as c:
            assert c.hello()["protocol"] == 1

    def client(self, timeout=60.0):
        return Client(self.addr, timeout=timeout)

    def stop(self):
        """SIGTERM; returns (exit status, stderr)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        _, err = self.proc.communicate(timeout=40)
        return self.proc.returncode, err

    def sql(self, query, *params):
        with contextlib.closing(sqlite3.connect(f"file:{self.db}?mode=ro", uri=True)) as conn:
            return conn.execute(query, params).fetchall()


@pytest.fixture(scope="module")
def server(packs):
    srv = Server(packs)
    yield srv
    code, err = srv.stop()
    assert code == 0, err


def reference(task):
    """The example's reference solution and the entry function for the task's class."""
    pack = task["pack"]
    if task.get("kind") == "decode":  # the model with its KV cache
        return (SOLUTIONS / f"{pack}_decode.py").read_text(), "forward"
    entries = json.loads((SOLUTIONS / f"{pack}.entries.json").read_text())
    return (SOLUTIONS / f"{pack}.py").read_text(), entries[task["class"]]


def play_oracle(c, task, policy="oracle"):
    """The oracle: read each tool once, verify the reference, submit it. Returns
    (episode, [(action, step result)])."""
    code, entry = reference(task)
    obs, info = c.reset(task=task["id"], policy=policy)
    assert info["task"] == task and obs["tool"] == "reset"
    steps = []
    for tool, args in READS + [("verify_component", {"code": code, "entry": entry}),
                               ("submit", {"code": code, "entry": entry})]:
        action = {"tool": tool, "args": args}
        steps.append((action, c.step(action)))
    return info["episode"], steps


def same(a, b):
    """Equal, floats within 2 ulp: the log's JSON may print a float's shortest
    near-round-trip form (cJSON)."""
    if isinstance(a, float) or isinstance(b, float):
        return a == pytest.approx(b, rel=5e-16, abs=0)
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b


# ---- the protocol's plain ops ----

def test_hello_spec_and_tasks(server):
    with server.client() as c:
        hello = c.hello()
        assert hello["server"].startswith("fmx ") and hello["device"] == "cpu"
        spec = c.spec()
        names = [t["function"]["name"] for t in spec["tools"]]
        assert names == ["read_module_source", "get_weight_info", "capture_intermediate",
                         "trace_ops", "verify_component", "submit", "finish"]
        assert spec["budget"] == {"max_steps": 40, "max_code_bytes": 65536,
                                  "max_observation_bytes": 1 << 20}
        # the step record's fields are the log's columns, in order
        cols = [row[1] for row in server.sql("PRAGMA table_info(steps)")]
        assert [f["name"] for f in c.step_fields()] == cols
        tasks = c.list_tasks()
        ids = [t["id"] for t in tasks]
        assert "qwen2" in ids and "gpt2" in ids and "qwen2/Qwen2MLP" in ids
        assert "qwen2/decode" in ids and "gpt2/decode" in ids  # causal LMs: their decode tasks
        assert len(ids) == len(set(ids)) == 23
        health = c.health()
        assert health["tasks"] == 23 and health["db"] == str(server.db)


# ---- whole episodes ----

def test_oracle_episode_on_every_task(server):
    with server.client() as c:
        for task in c.list_tasks():
            episode, steps = play_oracle(c, task)
            for action, (obs, reward, terminated, truncated, info) in steps[:-1]:
                assert not terminated and not truncated and reward == 0.0
                assert "error" not in obs, (task["id"], action["tool"], obs.get("text"))
            verify_obs = steps[-2][1][0]
            assert verify_obs["data"]["status"] == "match", (task["id"], verify_obs["text"])
            obs, reward, terminated, truncated, info = steps[-1][1]
            assert terminated and not truncated and info["status"] == "submitted"
            grade = info["grade"]
            assert grade["correctness"] == 1.0, (task["id"], obs["text"])
            assert grade["probes_passed"] == grade["probes_graded"] > 0
            assert any(not p["visible"] for p in grade["probes"])  # hidden probes graded too
            expected = 0.6 + 0.25 * grade["loc_score"] + 0.15 * grade["compile_score"]
            assert reward == pytest.approx(expected, abs=1e-9)
            assert reward == pytest.approx(grade["breakdown"]["reward"], abs=1e-9)
            with pytest.raises(EpisodeOver):
                c.step({"tool": "trace_ops", "args": {}}, episode=episode)
        # the log holds what the client saw, decoded with spec.step_fields
        logged = c.steps(episode)
        assert [s["idx"] for s in logged] == list(range(len(steps)))
        assert [s["tool"] for s in logged] == [a["tool"] for a, _ in steps]
        assert same([s["observation"] for s in logged], [r[0] for _, r in steps])
        assert logged[-1]["terminated"] == 1 and logged[-1]["reward"] == steps[-1][1][1]


def test_null_policy_scores_zero(server):
    with server.client() as c:
        for task in c.list_tasks():
            c.reset(task=task["id"], policy="null")
            obs, reward, terminated, truncated, info = c.step(
                {"tool": "submit", "args": {"code": NULL_CODE}})
            assert terminated and not truncated
            assert reward == 0.0 and info["grade"]["correctness"] == 0.0, obs["text"]


def test_close_and_refusals_that_do_not_end_an_episode(server):
    with server.client() as c:
        obs, info = c.reset(task="qwen2/Qwen2MLP", seed=7, policy="checks")
        assert info["seed"] == 7 and info["policy"] == "checks"
        obs, reward, terminated, truncated, info = c.step({"tool": "no_such_tool", "args": {}})
        assert obs["error"] == "unknown_tool" and not terminated and info["step"] == 1
        obs, *_ = c.step({"tool": "capture_intermediate", "args": {"probe": "p3"}})
        assert obs["error"] == "hidden_probe"
        obs, *_ = c.step({"tool": "get_weight_info", "args": {"path": "model.layers.0.mpl"}})
        assert obs["error"] == "unknown_path" and obs["data"]["nearest"]
        episode = c.episode
        assert c.close()["closed"] is True
        with pytest.raises(UnknownEpisode):
            c.step({"tool": "trace_ops", "args": {}}, episode=episode)
        assert server.sql("SELECT status, steps FROM episodes WHERE id = ?", episode) == [
            ("aborted", 3)]
        with pytest.raises(UnknownTask):
            c.reset(task="no/such/task")


def test_truncation_grades_the_last_verified_code(packs):
    srv = Server(packs, "--max-steps", "3")
    try:
        with srv.client() as c:
            task = next(t for t in c.list_tasks() if t["id"] == "qwen2/Qwen2MLP")
            code, entry = reference(task)
            # verified correct code, then two reads: the last step truncates and grades it
            c.reset(task=task["id"])
            c.step({"tool": "verify_component", "args": {"code": code, "entry": entry}})
            c.step({"tool": "get_weight_info", "args": {}})
            obs, reward, terminated, truncated, info = c.step({"tool": "trace_ops", "args": {}})
            assert truncated and not terminated and info["status"] == "truncated"
            assert info["steps_left"] == 0 and "Budget exhausted" in obs["text"]
            assert info["grade"]["correctness"] == 1.0 and reward == info["grade"]["reward"] > 0.6
            good = c.episode
            with pytest.raises(EpisodeOver):
                c.step({"tool": "trace_ops", "args": {}})
            # the LAST code verify_component compiled counts, even when it is wrong
            wrong = code.replace("F.silu(", "F.gelu(")
            assert wrong != code
            c.reset(task=task["id"])
            c.step({"tool": "verify_component", "args": {"code": code, "entry": entry}})
            c.step({"tool": "verify_component", "args": {"code": wrong, "entry": entry}})
            obs, reward, terminated, truncated, info = c.step({"tool": "trace_ops", "args": {}})
            assert truncated and info["grade"]["correctness"] < 1.0 and reward < 0.6
            # nothing verified: reward 0, nothing graded
            c.reset(task=task["id"])
            for tool, args in READS[:3]:
                obs, reward, terminated, truncated, info = c.step({"tool": tool, "args": args})
            assert truncated and reward == 0.0 and "grade" not in info
            none = c.episode
        subs = srv.sql("SELECT episode, truncated, correctness FROM submissions ORDER BY id")
        assert subs[0] == (good, 1, 1.0) and len(subs) == 2
        assert srv.sql("SELECT status, reward FROM episodes WHERE id = ?", none) == [
            ("truncated", 0.0)]
    finally:
        code, err = srv.stop()
    assert code == 0, err


# ---- malformed messages ----

def raw_socket(addr, routing_id=None):
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVTIMEO, 20000)
    if routing_id is not None:
        sock.setsockopt(zmq.ROUTING_ID, routing_id)
    sock.connect(addr)
    return sock


def raw(sock, *frames):
    sock.send_multipart(list(frames))
    return msgpack.unpackb(sock.recv(), raw=False)


def nested(depth):
    """A hello request nested `depth` levels deep (the request map is level 1)."""
    value = 1
    for _ in range(depth - 1):
        value = [value]
    return {"op": "hello", "req": 1, "x": value}


BAD_MESSAGES = {
    "not msgpack": b"\xc1\x00garbage",
    "truncated msgpack": msgpack.packb({"op": "hello", "req": 1})[:-2],
    "not a map": msgpack.packb(["hello", 1]),
    "a bare string": msgpack.packb("hello"),
    "non-string map key": msgpack.packb({1: "hello"}),
    "bin value": msgpack.packb({"op": "hello", "x": b"\x00\x01"}, use_bin_type=True),
    "ext value": msgpack.packb({"op": "hello", "x": msgpack.ExtType(1, b"x")}),
    "NUL in a string": msgpack.packb({"op": "hel\x00lo"}),
    "lying array32 header": b"\x82\xa2op\xa5hello\xa1x\xdd\xff\xff\xff\xff",
    "lying str32 header": b"\x81\xa2op\xdb\xff\xff\xff\xf0ab",
    "lying map32 header": b"\x81\xa1x\xdf\x7f\xff\xff\xff",
    "too deep nesting": msgpack.packb(nested(17)),
    "oversized message": msgpack.packb({"op": "hello", "x": "a" * (9 << 20)}),
    "trailing bytes": msgpack.packb({"op": "hello"}) + b"\x00",
}


@pytest.mark.parametrize("what", list(BAD_MESSAGES))
def test_malformed_message_gets_bad_message_and_server_keeps_serving(server, what):
    sock = raw_socket(server.addr)
    try:
        reply = raw(sock, BAD_MESSAGES[what])
        assert reply["ok"] is False and reply["error"]["code"] == "bad_message", reply
        assert reply["error"]["message"] and "req" not in reply
        assert raw(sock, msgpack.packb({"op": "hello", "req": 9}))["req"] == 9
    finally:
        sock.close()


def test_malformed_requests_get_structured_errors(server):
    sock = raw_socket(server.addr)
    other = server.client()
    try:
        assert raw(sock, msgpack.packb(nested(16)))["ok"] is True  # the deepest allowed
        reply = raw(sock, b"frame one", b"frame two")
        assert reply["error"]["code"] == "bad_message"
        cases = [({"op": 5}, "bad_request"), ({"no_op": 1}, "bad_request"),
                 ({"op": "reset", "seed": "x"}, "bad_request"),
                 ({"op": "reset", "task": 3}, "bad_request"),
                 ({"op": "reset", "policy": "p" * 300}, "bad_request"),
                 ({"op": "step", "episode": "1"}, "bad_request"),
                 ({"op": "step"}, "bad_request"), ({"op": "close", "episode": 1.5}, "bad_request"),
                 ({"op": "launch_missiles"}, "unknown_op"),
                 ({"op": "step", "episode": 10 ** 12, "action": {"tool": "trace_ops"}},
                  "unknown_episode"),
                 ({"op": "reset", "task": "nope"}, "unknown_task")]
        for i, (body, code) in enumerate(cases):
            reply = raw(sock, msgpack.packb({**body, "req": 100 + i}))
            assert reply["req"] == 100 + i, body  # decodable requests echo req
            assert reply["ok"] is False and reply["error"]["code"] == code, (body, reply)
            assert isinstance(reply["error"]["message"], str) and reply["error"]["message"]
        # steps with a bad action, and another connection's episode
        opened = raw(sock, msgpack.packb({"op": "reset", "req": 1, "task": "gpt2/GPT2MLP"}))
        ep = opened["episode"]
        for action in ("read", {"args": {}}, {"tool": 7}):
            reply = raw(sock, msgpack.packb({"op": "step", "req": 2, "episode": ep,
                                             "action": action}))
            assert reply["error"]["code"] == "bad_request", action
        with pytest.raises(NotYourEpisode):
            other.step({"tool": "trace_ops", "args": {}}, episode=ep)
        with pytest.raises(NotYourEpisode):
            other.close(episode=ep)
        with pytest.raises(UnknownOp):
            other.request("launch_missiles")
        with pytest.raises(BadRequest):
            other.request("reset", seed=1.5)
        reply = raw(sock, msgpack.packb({"op": "step", "req": 3, "episode": ep,
                                         "action": {"tool": "trace_ops", "args": {}}}))
        assert reply["ok"] is True and reply["info"]["step"] == 1  # bad requests took no step
        assert other.hello()["protocol"] == 1
    finally:
        sock.close()
        other.disconnect()


def test_frame_over_zmq_limit_drops_only_that_connection(server):
    sock = raw_socket(server.addr)
    sock.setsockopt(zmq.RCVTIMEO, 500)
    try:
        sock.send(msgpack.packb({"op": "hello", "x": "a" * (17 << 20)}))
        with pytest.raises(zmq.Again):
            sock.recv()
    finally:
        sock.close()
    with server.client() as c:
        assert c.hello()["protocol"] == 1


def test_client_timeout(server):
    with Client("ipc:///nonexistent/fmx.sock", timeout=0.2) as c:
        with pytest.raises(Timeout) as e:
            c.hello()
        assert isinstance(e.value, FmxError) and e.value.code == "timeout"


# ---- many clients at once ----

def test_16_concurrent_clients_lose_and_duplicate_nothing(server):
    with server.client() as c:
        tasks = c.list_tasks()
    errors, episodes = [], []
    per_episode = 24
    lock = threading.Lock()

    def player(i):
        try:
            with server.client() as c:
                mine = [tasks[i % len(tasks)], tasks[(i + 16) % len(tasks)]]
                opened = c.reset_many([t["id"] for t in mine], policy=f"thread-{i}")
                ids = [ep for ep, _, _ in opened]
                actions, targets = [], []
                for k in range(per_episode):  # interleaved over both episodes
                    for ep in ids:
                        tool, args = READS[k % len(READS)]
                        actions.append({"tool": tool, "args": args})
                        targets.append(ep)
                reqs = c.send(actions, targets)
                assert len(set(reqs)) == len(reqs)
                seen = {ep: [] for ep in ids}
                while c.pending:
                    for ep, result in c.recv(timeout=30):
                        assert not isinstance(result, FmxError), result
                        seen[ep].append(result[4]["step"])
                for ep in ids:  # each episode's steps answered once, in order
                    assert seen[ep] == list(range(1, per_episode + 1)), seen[ep]
                for ep, task in zip(ids, mine):
                    code, entry = reference(task)
                    obs, reward, terminated, *_ , info = c.step(
                        {"tool": "submit", "args": {"code": code, "entry": entry}}, episode=ep)
                    assert terminated and info["grade"]["correctness"] == 1.0, obs["text"]
                assert c.hello()["protocol"] == 1
                assert c.stray_replies == 0
                with lock:
                    episodes.extend(ids)
        except Exception as e:  # noqa: BLE001 — reported by the main thread
            errors.append(f"client {i}: {e!r}")

    threads = [threading.Thread(target=player, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    assert len(set(episodes)) == 32
    rows = server.sql(f"SELECT status, steps FROM episodes WHERE id IN ({','.join('?' * 32)})",
                      *episodes)
    assert rows == [("submitted", per_episode + 1)] * 32


# ---- bounded serving: caps, observations, idle episodes, routing ids ----

HANG = ("import torch\nfrom torch import Tensor\nfrom typing import Dict\n\n"
        "def forward(weights: Dict[str, Tensor]) -> Tensor:\n"
        "    x = torch.zeros(1)\n"
        "    for i in range(1 << 40):\n"
        "        x = x + 1.0\n"
        "    return x\n")
HANG_STEP = {"tool": "verify_component", "args": {"code": HANG}}
# 100,000 tap() calls in 4 lines: a report that lists them all is ~60 MB
TAPS = ("import torch\nfrom torch import Tensor\nfrom typing import Dict\n\n"
        "def forward(x: Tensor, weights: Dict[str, Tensor]) -> Tensor:\n"
        "    for i in range(100000):\n"
        "        x = tap('mlp', x)\n"
        "    return x\n")


def wait_for(what, check, timeout):
    """Polls check() until it returns a true value (returned) or timeout seconds pass."""
    end = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        assert time.monotonic() < end, f"timed out waiting for {what}"
        time.sleep(0.05)


def arrived(c, timeout=0.2):
    """The results of sent steps that have arrived (waiting up to timeout s), [] if none."""
    try:
        return c.recv(timeout=timeout)
    except Timeout:
        return []


def test_evaluations_over_the_per_client_cap_get_busy(packs):
    srv = Server(packs, "--max-client-evals", "2", "--eval-timeout", "2")
    try:
        with srv.client() as c, srv.client() as other:
            eps = [ep for ep, _, _ in c.reset_many(["qwen2/Qwen2MLP"] * 3)]
            c.send([HANG_STEP] * 3, eps)
            # cheap steps are not evaluations: never refused for the cap
            assert c.step({"tool": "trace_ops", "args": {}}, episode=eps[2])[0]["tool"] == \
                "trace_ops"
            results = {}
            while c.pending:
                results.update(c.recv(timeout=60))
            busy = results[eps[2]]
            assert isinstance(busy, Busy) and busy.code == "busy"
            assert "--max-client-evals 2" in str(busy) and "2 evaluations" in str(busy)
            for ep in eps[:2]:  # the first two ran (to their timeout)
                assert results[ep][0]["error"] == "timeout", results[ep]
            # once they are answered the client may send more; another client never noticed
            code, entry = reference({"pack": "qwen2", "class": "Qwen2MLP"})
            verify = {"tool": "verify_component", "args": {"code": code, "entry": entry}}
            assert c.step(verify, episode=eps[2])[0]["data"]["status"] == "match"
            other.reset(task="qwen2/Qwen2MLP")
            assert other.step(verify)[0]["data"]["status"] == "match"
            assert c.health()["refused_busy"] == 1
        # a refused step is not a step: nothing logged for it
        assert srv.sql("SELECT count(*) FROM steps WHERE episode = ?", eps[2]) == [(2,)]
    finally:
        status, err = srv.stop()
    assert status == 0, err


def test_waiting_request_bytes_are_capped_per_client_and_in_all(packs):
    # 1 MiB of waiting requests in all, a quarter (256 KiB) per client
    srv = Server(packs, "--max-queued-mb", "1", "--eval-timeout", "6")
    pad = {"tool": "read_module_source", "args": {"pad": "x" * (240 << 10)}}
    clients = [srv.client() for _ in range(5)]
    try:
        refused = []
        for i, c in enumerate(clients):
            c.reset(task="qwen2/Qwen2MLP")
            # a 240 KiB request waits behind an endless verify of its episode
            c.send([HANG_STEP] + [pad] * (2 if i == 0 else 1), [c.episode] * (3 if i == 0 else 2))
            c.health()  # answered after the server has read those
            refused.append([r for _, r in arrived(c)])
        # the first client's second 240 KiB request passes its quarter
        assert len(refused[0]) == 1 and isinstance(refused[0][0], Busy), refused
        assert "a quarter of --max-queued-mb" in str(refused[0][0])
        # four clients' requests fit; the fifth client's passes the server's limit
        assert refused[1:4] == [[], [], []], refused
        assert len(refused[4]) == 1 and isinstance(refused[4][0], Busy), refused
        assert "--max-queued-mb 1" in str(refused[4][0])
        health = clients[4].health()
        assert 4 * (240 << 10) < health["queued_bytes"] <= 1 << 20
        assert health["refused_busy"] == 2
        assert clients[4].hello()["protocol"] == 1  # what does not wait is never refused
    finally:
        for c in clients:
            c.disconnect()
        status, err = srv.stop()  # the endless verifies end at their timeout
    assert status == 0, err


def test_observations_are_cut_to_the_budget_before_they_are_logged(packs):
    srv = Server(packs, "--max-observation-kb", "16")
    try:
        with srv.client() as c:
            assert c.spec()["budget"]["max_observation_bytes"] == 16 << 10
            _, info = c.reset(task="qwen2/Qwen2MLP")
            assert info["budget"]["max_observation_bytes"] == 16 << 10
            sent = []
            for action in ({"tool": "capture_intermediate", "args": {"probe": 0, "values": True}},
                           {"tool": "verify_component", "args": {"code": TAPS}},
                           {"tool": "get_weight_info", "args": {}}):
                obs = c.step(action)[0]
                sent.append(obs)
                cut = obs["data"].get("cut", [])
                data = json.dumps({k: v for k, v in obs["data"].items() if k != "cut"},
                                  separators=(",", ":"), ensure_ascii=False)
                if action["tool"] == "get_weight_info":  # small: untouched
                    assert not cut and "[fmx:" not in obs["text"]
                    continue
                # text: an eighth of the budget, plus the note saying what was cut
                assert len(obs["text"].encode()) <= (2 << 10) + 512, len(obs["text"])
                assert "[fmx: " in obs["text"] and " cut here " in obs["text"]
                assert len(data.encode()) <= 16 << 10, len(data)
                assert cut and all(k["kept"] < k["of"] and k["unit"] in ("items", "bytes", "member")
                                   for k in cut), cut
                assert cut[0]["path"] in obs["text"]
            # the text keeps its end: the verify report's summary line
            assert "probe calls pass" in sent[1]["text"].splitlines()[-1]
            episode = c.episode
        # the log holds the observations as they were sent
        logged = [json.loads(o) for (o,) in srv.sql(
            "SELECT observation FROM steps WHERE episode = ? ORDER BY idx", episode)]
        assert same(logged, sent)
    finally:
        status, err = srv.stop()
    assert status == 0, err


def test_a_huge_verify_report_is_cut_to_the_default_caps(server):
    with server.client() as c:
        c.reset(task="qwen2/Qwen2MLP")
        obs = c.step({"tool": "verify_component", "args": {"code": TAPS}})[0]
    assert len(obs["text"].encode()) <= (128 << 10) + 512 and "[fmx: " in obs["text"]
    assert len(json.dumps(obs["data"], separators=(",", ":"))) <= (1 << 20) + 4096


def test_idle_episodes_are_aborted_and_keep_their_steps(packs):
    srv = Server(packs, "--idle-timeout", "2", "--eval-timeout", "6")
    try:
        with srv.client() as c:
            (idle, _, _), (running, _, _) = c.reset_many(["qwen2/Qwen2MLP"] * 2)
            c.step({"tool": "trace_ops", "args": {}}, episode=idle)
            c.send([HANG_STEP], [running])  # runs longer than the idle timeout

            def episode_status(ep):
                return srv.sql("SELECT status FROM episodes WHERE id = ?", ep)[0][0]

            wait_for("the idle episode to be aborted",
                     lambda: episode_status(idle) == "aborted", 30)
            assert episode_status(running) == "open"  # an evaluation in flight is not idleness
            with pytest.raises(EpisodeOver, match="idle"):
                c.step({"tool": "trace_ops", "args": {}}, episode=idle)
            assert srv.sql("SELECT idx, tool FROM steps WHERE episode = ?", idle) == [
                (0, "trace_ops")]
            (ep, result), = c.recv(timeout=60)
            assert ep == running and result[0]["error"] == "timeout"
            obs = c.step({"tool": "trace_ops", "args": {}}, episode=running)[0]
            assert obs["tool"] == "trace_ops" and "error" not in obs
            assert c.health()["idle_aborted"] == 1
    finally:
        status, err = srv.stop()
    assert status == 0, err
    assert "aborted after 2 s without a request" in err


def test_routing_ids_chosen_by_clients_are_refused_with_an_error(server):
    hello = msgpack.packb({"op": "hello", "req": 5})
    socks = []
    try:
        # the second connection, with the id of the first (still connected),
        # is answered too, not ignored in silence
        for _ in range(2):
            socks.append(raw_socket(server.addr, routing_id=b"my-trainer"))
            reply = raw(socks[-1], hello)
            assert reply["req"] == 5 and reply["error"]["code"] == "routing_id_refused", reply
            assert "ZMQ_ROUTING_ID" in reply["error"]["message"]
            assert isinstance(error_from_reply(reply), RoutingIdRefused)
    finally:
        for sock in socks:
            sock.close()


def test_a_connection_presenting_an_id_in_use_gets_an_error_and_no_episode(server):
    # An id of ZeroMQ's own form cannot be told from a generated one: served
    # as a connection of its own, until another connection presents it too.
    ident = b"\x00\x12\x34\x56\x78"
    owner = raw_socket(server.addr, routing_id=ident)
    thief = None
    try:
        ep = raw(owner, msgpack.packb({"op": "reset", "req": 1, "task": "qwen2/SiLU"}))["episode"]
        thief = raw_socket(server.addr, routing_id=ident)
        for body in ({"op": "hello", "req": 2},
                     {"op": "step", "req": 3, "episode": ep,
                      "action": {"tool": "trace_ops", "args": {}}},
                     {"op": "close", "req": 4, "episode": ep}):
            reply = raw(thief, msgpack.packb(body))
            assert reply["req"] == body["req"], reply
            assert reply["error"]["code"] == "routing_id_refused", reply
            assert "another connection" in reply["error"]["message"]
        assert server.sql("SELECT status, steps FROM episodes WHERE id = ?", ep) == [("open", 0)]
    finally:
        owner.close()
        if thief is not None:
            thief.close()


def test_taking_the_ids_zeromq_would_hand_out_next_does_not_crash_the_server(server):
    # libzmq numbers connections without an id from rand(); unseeded, the
    # first is 00 6b8b4567. A client holding the next ones made libzmq
    # abort the server (an assertion) when a new connection arrived.
    squatters = [raw_socket(server.addr, routing_id=b"\x00" + (0x6b8b4567 + k).to_bytes(4, "big"))
                 for k in range(64)]
    try:
        for sock in squatters:
            sock.send(msgpack.packb({"op": "hello", "req": 1}))
        for _ in range(8):
            with server.client(timeout=20) as c:
                assert c.hello()["protocol"] == 1
        assert server.proc.poll() is None
    finally:
        for sock in squatters:
            sock.close()


# ---- the log ----

def test_episode_log_holds_every_step_in_order(server):
    with server.client() as c:  # at least one finished episode, whatever ran before
        play_oracle(c, c.list_tasks()[0])
    episodes = server.sql("SELECT id, status, steps FROM episodes")
    assert len(episodes) > 1
    by_episode = {}
    for ep, idx in server.sql("SELECT episode, idx FROM steps ORDER BY episode, idx"):
        by_episode.setdefault(ep, []).append(idx)
    subs = {ep: n for ep, n in server.sql(
        "SELECT episode, count(*) FROM submissions GROUP BY episode")}
    for ep, status, steps in episodes:
        assert by_episode.get(ep, []) == list(range(steps)), ep
        if status == "submitted":
            assert subs.get(ep) == 1, ep
        else:
            assert ep not in subs
    ended = server.sql("SELECT count(*) FROM steps WHERE terminated = 1 OR truncated = 1")[0][0]
    assert ended == sum(1 for _, status, _ in episodes if status in ("submitted", "truncated"))
    rewards = server.sql("SELECT e.reward, s.reward, s.reward_version, s.breakdown "
                         "FROM episodes e JOIN submissions s ON s.episode = e.id")
    for episode_reward, sub_reward, version, breakdown in rewards:
        assert episode_reward == sub_reward and version == "v1-default"
        assert json.loads(breakdown)["reward"] == pytest.approx(sub_reward)


# ---- fmx run and fmx leaderboard ----

def test_fmx_run_plays_oracle_and_null_and_prints_the_leaderboard(packs, tmp_path):
    db = tmp_path / "run.db"
    res = fmx("run", "--policy", "oracle,null", "--tasks", packs, "--db", db, "--jobs", "2")
    assert res.returncode == 0, res.stdout + res.stderr
    assert f"episode log (SQLite): {db}" in res.stdout
    lines = res.stdout.splitlines()
    rank = next(i for i, l in enumerate(lines) if l.startswith("rank"))
    assert lines[rank + 1].split()[:3] == ["1", "oracle", "23"]  # 21 tasks and 2 decode tasks
    assert lines[rank + 2].split()[:5] == ["2", "null", "23", "0%", "0.000"]
    with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as conn:
        rows = conn.execute(
            "SELECT p.name, count(*), min(s.correctness), max(s.correctness), max(e.reward) "
            "FROM episodes e JOIN policies p ON p.id = e.policy_id "
            "JOIN submissions s ON s.episode = e.id GROUP BY p.name ORDER BY p.name").fetchall()
        assert rows[0][:4] == ("null", 23, 0.0, 0.0) and rows[0][4] == 0.0
        assert rows[1][:4] == ("oracle", 23, 1.0, 1.0)
        # the oracle reads each tool once, verifies, then submits
        tools = conn.execute(
            "SELECT group_concat(tool, ' ') FROM (SELECT s.tool FROM steps s JOIN episodes e "
            "ON e.id = s.episode JOIN policies p ON p.id = e.policy_id WHERE p.name = 'oracle' "
            "AND e.task_id = 'qwen2' ORDER BY s.idx)").fetchone()[0]
        assert tools == ("read_module_source get_weight_info trace_ops capture_intermediate "
                         "verify_component submit")
        assert conn.execute("SELECT count(*) FROM episodes WHERE status != 'submitted'"
                            ).fetchone()[0] == 0
        # the oracle submits the reference trimmed to what the task's entry reaches
        loc = dict(conn.execute(
            "SELECT e.task_id, s.loc FROM submissions s JOIN episodes e ON e.id = s.episode "
            "JOIN policies p ON p.id = e.policy_id WHERE p.name = 'oracle'").fetchall())
        assert loc["qwen2/Qwen2MLP"] * 4 < loc["qwen2"] and loc["gpt2/Linear"] <= 3
    board = fmx("leaderboard", "--db", db)
    assert board.returncode == 0 and board.stdout.count("oracle") == 24  # total + 23 tasks
    only = fmx("leaderboard", "--db", db, "--policy", "null")
    assert "oracle" not in only.stdout and only.stdout.count("null") == 24
    missing = fmx("leaderboard", "--db", tmp_path / "none.db")
    assert missing.returncode == 2 and "none.db" in missing.stderr


def test_fmx_run_connects_to_a_running_server(server):
    res = fmx("run", "--connect", server.addr, "--policy", "oracle", "--task", "gpt2/GPT2MLP",
              "--episodes", "2", "--jobs", "1")
    assert res.returncode == 0, res.stdout + res.stderr
    assert "oracle   2 episodes on 1 tasks" in res.stdout
    assert f"episode log (SQLite): {server.db}" in res.stdout
    bad = fmx("run", "--connect", server.addr, "--policy", "oracle", "--task", "nope")
    assert bad.returncode == 2 and "no task 'nope'" in bad.stderr


# ---- shutdown ----

def test_sigterm_stops_cleanly_and_aborts_open_episodes(packs):
    srv = Server(packs)
    with srv.client() as c:
        opened = [ep for ep, _, _ in c.reset_many(["qwen2", "gpt2/GPT2Block", "qwen2/SiLU"])]
        c.step({"tool": "trace_ops", "args": {}}, episode=opened[0])
        code, entry = reference({"pack": "qwen2", "class": "Qwen2ForCausalLM"})
        c.send([{"tool": "verify_component", "args": {"code": code, "entry": entry}}],
               [opened[0]])
        c.health()  # answered after the server has read the verify: it is running or done
        status, err = srv.stop()
        assert status == 0, err
        # a step running on a worker finishes and is answered before the server exits
        (ep, result), = c.recv(timeout=5)
        assert ep == opened[0] and result[0]["data"]["status"] == "match"
    assert "stopped" in err
    rows = srv.sql("SELECT id, status, ended_at IS NOT NULL FROM episodes ORDER BY id")
    assert rows == [(ep, "aborted", 1) for ep in opened]
