"""What an RL trainer relies on (issue 14): the installable package, the asyncio
client, a sync client shared by threads, the trainer adapters driven the way
TRL, verifiers and Gymnasium drive them, and the protocol's trainer calls
(goals in list_tasks, close with grade / finish, a lower step budget at reset,
the system prompt and strict-mode schemas in spec).

One server over one exported example pack (qwen2) serves every test here.
FMX_TEST_PACKS names packs exported already (the package test sets it when it
runs the client tests again against the installed package).
"""
import asyncio
import inspect
import json
import os
import pathlib
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading

import pytest

from fmx import AsyncClient, BadRequest, Client, EpisodeOver, FmxError, UnknownEpisode
from fmx import adapters

ROOT = pathlib.Path(__file__).resolve().parents[2]
FMX = os.environ.get("FMX_BIN", str(ROOT / "build" / "fmx"))
SOLUTIONS = ROOT / "examples" / "solutions"
MLP = "qwen2/Qwen2MLP"


def reference(cls):
    entries = json.loads((SOLUTIONS / "qwen2.entries.json").read_text())
    return (SOLUTIONS / "qwen2.py").read_text(), entries[cls]


@pytest.fixture(scope="module")
def packs(tmp_path_factory):
    if os.environ.get("FMX_TEST_PACKS"):
        return pathlib.Path(os.environ["FMX_TEST_PACKS"])
    out = tmp_path_factory.mktemp("trainer-packs")
    res = subprocess.run([FMX, "export", "examples/models/qwen2.py:build", "-o", out / "qwen2",
                          "--quiet"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    return out


@pytest.fixture(scope="module")
def server(packs):
    d = pathlib.Path(tempfile.mkdtemp(prefix="fmx-trainer-"))
    addr = f"ipc://{d}/s.sock"
    proc = subprocess.Popen([FMX, "serve", "--tasks", packs, "--db", d / "fmx.db", "--bind", addr,
                             "--workers", "2", "--max-steps", "12"],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    with Client(addr, timeout=120) as c:
        c.hello()
    yield {"addr": addr, "db": d / "fmx.db", "packs": packs}
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=60)
    shutil.rmtree(d, ignore_errors=True)


# ---- the package ----

def test_package_installs_offline_and_serves_the_client_tests(server, tmp_path):
    """pip installs ./python into a venv without the network; the client tests pass against
    the installed copy, and its metadata declares the dependencies."""
    src = tmp_path / "src"
    shutil.copytree(ROOT / "python", src, ignore=shutil.ignore_patterns("__pycache__", "build",
                                                                        "*.egg-info"))
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", venv], check=True)
    py = str(venv / "bin" / "python")
    res = subprocess.run([py, "-m", "pip", "install", "--no-build-isolation", "--no-deps",
                          "--no-index", "-q", str(src)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    probe = ("import fmx, fmx.aio, fmx.adapters, fmx.client, fmx.tracer, importlib.metadata as m;"
             "print(fmx.__file__); print(m.requires('fmx'))")
    res = subprocess.run([py, "-c", probe], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    where, requires = res.stdout.splitlines()
    assert where.startswith(str(venv)), where
    assert "pyzmq" in requires and "msgpack" in requires and "torch" in requires
    assert re.search(r"torch[^']*extra == .export", requires), requires
    # the client tests of this file, importing the installed fmx
    res = subprocess.run([py, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-x",
                          str(pathlib.Path(__file__)), "-k", "client and not package or async"],
                         capture_output=True, text=True, cwd=tmp_path, timeout=300,
                         env=dict(env, FMX_TEST_PACKS=str(server["packs"]), FMX_BIN=FMX))
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-2000:]
    assert " passed" in res.stdout


# ---- clients ----

def test_async_client_many_episodes_in_flight(server):
    """One event loop, many episodes at once; a refused step is an FmxError, not a crash."""
    async def main():
        async with AsyncClient(server["addr"], timeout=120) as env:
            assert (await env.hello())["protocol"] == 1
            opened = await env.reset_many([MLP] * 6, policy="async-test")
            ids = [ep for ep, _obs, _info in opened]
            assert len(set(ids)) == 6
            actions = [{"tool": "trace_ops", "args": {}}] * 6 + [{"tool": "trace_ops", "args": {}}]
            results = await env.step_many(actions, ids + [10 ** 9])
            for ep, r in results[:6]:
                obs, reward, terminated, truncated, info = r
                assert "aten" in obs["text"] or obs["data"], obs
                assert info["step"] == 1 and not terminated
            assert isinstance(results[6][1], UnknownEpisode)
            logged = await env.steps(ids[0])
            assert [r["tool"] for r in logged] == ["trace_ops"] and logged[0]["idx"] == 0
            closed = await asyncio.gather(*(env.close(ep) for ep in ids))
            assert all(c["closed"] for c in closed)
            tasks = await env.list_tasks()
            assert MLP in [t["id"] for t in tasks]
    asyncio.run(main())


def test_sync_client_shared_by_threads(server):
    """Threads sharing one Client each get their own replies."""
    errors = []
    with Client(server["addr"], timeout=120) as c:
        def work(k):
            try:
                for _ in range(3):
                    obs, info = c.reset(task=MLP, policy=f"thread-{k}")
                    ep = info["episode"]
                    o, *_ , i = c.step({"tool": "get_weight_info", "args": {}}, ep)
                    assert o["tool"] == "get_weight_info" and i["step"] == 1
                    assert c.close(ep)["episode"] == ep
                    assert c.hello()["protocol"] == 1
            except Exception as e:  # noqa: BLE001 - reported below
                errors.append(repr(e))
        threads = [threading.Thread(target=work, args=(k,)) for k in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert errors == []
        assert c.stray_replies == 0


def test_client_readme_loop_survives_an_error_reply(server):
    """The README's batched loop: a refused step comes back as an FmxError in its slot."""
    with Client(server["addr"], timeout=120) as env:
        ids = [env.reset(task=MLP)[1]["episode"], 10 ** 9]
        env.send([{"tool": "trace_ops", "args": {"path": ""}}] * 2, ids)
        seen = {}
        while env.pending:
            for episode, result in env.recv():
                if isinstance(result, FmxError):
                    seen[episode] = result.code
                    continue
                obs, reward, terminated, truncated, info = result
                seen[episode] = obs["tool"]
        assert seen == {ids[0]: "trace_ops", ids[1]: "unknown_episode"}
        env.close(ids[0])


# ---- protocol ----

def test_protocol_list_tasks_goals_are_the_reset_goals(server):
    with Client(server["addr"], timeout=120) as c:
        tasks = c.list_tasks(goals=True)
        assert "goal" not in c.list_tasks()[0]
        mlp = next(t for t in tasks if t["id"] == MLP)
        obs, info = c.reset(task=MLP)
        assert mlp["goal"] == obs["text"]
        c.close()


def test_protocol_spec_prompt_and_schemas(server):
    with Client(server["addr"], timeout=120) as c:
        spec = c.spec()
        assert "flat functional PyTorch" in spec["system_prompt"]
        tools = {t["function"]["name"]: t["function"] for t in spec["tools"]}
        probe = tools["capture_intermediate"]["parameters"]["properties"]["probe"]
        assert probe["type"] == "string"
        # what the schema declares, the server takes
        c.reset(task=MLP)
        obs, *_ = c.step({"tool": "capture_intermediate", "args": {"probe": "p0"}})
        assert "error" not in obs, obs
        # strict mode: every property required, none extra; null means the default
        for t in spec["tools_strict"]:
            f = t["function"]
            p = f["parameters"]
            assert f["strict"] is True and p["additionalProperties"] is False
            assert sorted(p["required"]) == sorted(p["properties"])
        args = {"path": None, "probe": "p0", "call": None, "values": None}
        obs, *_ = c.step({"tool": "capture_intermediate", "args": args})
        assert "error" not in obs, obs
        c.close()


def test_protocol_close_with_grade_grades_the_last_verified_code(server):
    code, entry = reference("Qwen2MLP")
    with Client(server["addr"], timeout=120) as c:
        c.reset(task=MLP, policy="close-grade")
        obs, *_ = c.step({"tool": "verify_component", "args": {"code": code, "entry": entry}})
        assert obs["data"]["status"] == "match"
        ep = c.episode
        reply = c.close(grade=True)
        assert reply["closed"] and reply["episode"] == ep and reply["terminated"]
        assert reply["reward"] > 0.6 and reply["info"]["grade"]["correctness"] == 1
        with pytest.raises(EpisodeOver):
            c.step({"tool": "trace_ops", "args": {}}, ep)
        # nothing verified: the episode ends with reward 0
        c.reset(task=MLP, policy="close-grade")
        reply = c.close(grade=True)
        assert reply["reward"] == 0 and reply["terminated"]
        # queued behind a running verify, it grades what that verify compiled
        c.reset(task=MLP, policy="close-grade")
        ep = c.episode
        verify = c._send("step", {"episode": ep, "action": {
            "tool": "verify_component", "args": {"code": code, "entry": entry}}})
        close = c._send("close", {"episode": ep, "grade": True})
        assert c._wait(verify, 120)["ok"]
        reply = c._wait(close, 120)
        assert reply["closed"] and reply["reward"] > 0.6
        # an episode already over: a plain close
        reply = c.close(ep, grade=True)
        assert reply["closed"] and "reward" not in reply
    with sqlite3.connect(server["db"]) as db:
        rows = db.execute("SELECT e.status, e.reward FROM episodes e JOIN policies p "
                          "ON p.id = e.policy_id WHERE p.name = 'close-grade' ORDER BY e.id").fetchall()
    assert rows[0][0] == "submitted" and rows[0][1] > 0.6
    assert rows[1] == ("closed", 0.0)
    assert rows[2][0] == "submitted" and rows[2][1] > 0.6


def test_protocol_finish_action_and_lower_budget(server):
    code, entry = reference("Qwen2MLP")
    with Client(server["addr"], timeout=120) as c:
        c.reset(task=MLP, max_steps=3)
        c.step({"tool": "verify_component", "args": {"code": code, "entry": entry}})
        obs, reward, terminated, truncated, info = c.step({"tool": "finish", "args": {}})
        assert terminated and not truncated and reward > 0.6 and info["status"] == "submitted"
        # a lower budget truncates at its end
        obs, info = c.reset(task=MLP, max_steps=2)
        assert info["budget"]["max_steps"] == 2 and "Budget: 2 steps" in obs["text"]
        c.step({"tool": "trace_ops", "args": {}})
        *_, terminated, truncated, info = c.step({"tool": "trace_ops", "args": {}})
        assert truncated and info["steps_left"] == 0
        with pytest.raises(BadRequest, match="max_steps"):
            c.reset(task=MLP, max_steps=1000)  # raising it is refused


# ---- adapters ----

def _google_args(doc):
    """The parameter names a Google-style docstring's Args: section describes."""
    section = doc.split("Args:", 1)[1] if "Args:" in doc else ""
    return re.findall(r"^\s{4}(\w+):", section, re.M)


def test_trl_environment_factory_contract(server):
    """As GRPOTrainer uses environment_factory: a no-argument class, reset(**row) -> str,
    public methods as tools (typed, described by their docstrings), reward functions
    reading the instances."""
    cls = adapters.trl_environment(server["addr"], policy="trl-test")
    rows = adapters.trl_dataset(server["addr"])
    assert {r["task"] for r in rows} >= {MLP, "qwen2"}
    row = next(r for r in rows if r["task"] == MLP)
    assert row["prompt"][0]["role"] == "system" and row["prompt"][-1]["role"] == "user"
    spec = {t["function"]["name"]: t["function"]["parameters"]
            for t in Client(server["addr"]).spec()["tools"]}
    env = cls()
    tools = {n: m for n, m in inspect.getmembers(env, inspect.ismethod)
             if not n.startswith("_") and n != "reset"}
    assert set(tools) == set(spec)  # every server tool, nothing else
    for name, method in tools.items():
        sig = inspect.signature(method)
        assert sig.return_annotation in (str, "str")
        for p in sig.parameters.values():
            assert p.annotation is not inspect.Parameter.empty, (name, p.name)
        assert sorted(_google_args(inspect.getdoc(method) or "")) == sorted(sig.parameters), name
        assert set(sig.parameters) == set(spec[name]["properties"]), name
    goal = env.reset(**row)
    assert isinstance(goal, str) and MLP in goal
    code, entry = reference("Qwen2MLP")
    assert "match" in env.verify_component(code=code, entry=entry).lower()
    # a second rollout that stops without calling a tool
    idle = cls()
    idle.reset(**row)
    assert "Tool" in idle.get_weight_info() or "weight" in idle.get_weight_info().lower()
    rewards = adapters.trl_reward(environments=[env, idle], prompts=[row["prompt"]] * 2,
                                  completions=["", ""])
    assert rewards[0] > 0.6 and rewards[1] == 0.0
    assert "over" in env.trace_ops()  # graded: no more tool calls


def test_verifiers_stateful_tool_env_contract(server):
    """As verifiers drives a StatefulToolEnv: setup_state, then each model tool call goes
    through update_tool_args (which injects the skipped `episode`) to the tool, until
    is_completed; the rubric's reward function reads the state."""
    env = adapters.verifiers_environment(server["addr"], policy="verifiers-test")
    rows = env.dataset()
    row = next(r for r in rows if r["info"]["task"] == MLP)
    assert row["prompt"][-1]["content"].startswith(f"Task {MLP}")
    for schema in env.oai_tools():  # what the model sees has no `episode`
        assert "episode" not in schema["function"]["parameters"]["properties"]
    tools = {t.__name__: t for t in env.tools}

    async def rollout():
        state = await env.setup_state({"prompt": row["prompt"], "info": row["info"]})
        code, entry = reference("Qwen2MLP")
        calls = [("get_weight_info", {"path": None}),
                 ("submit", {"code": code, "entry": entry})]
        messages = list(row["prompt"])
        for name, args in calls:
            assert not await env.is_completed(messages, state)
            args = env.update_tool_args(name, args, messages, state)
            messages.append({"role": "tool", "content": tools[name](**args)})
        assert await env.is_completed(messages, state)
        return env.reward(messages[len(row["prompt"]):], state)

    assert asyncio.run(rollout()) > 0.6


def test_gymnasium_env_contract(server):
    """reset(seed=, options=) -> (str, dict); step(action) -> (str, float, bool, bool, dict)."""
    env = adapters.GymEnv(server["addr"], task=MLP, policy="gym-test", max_steps=3)
    obs, info = env.reset(seed=7)
    assert isinstance(obs, str) and MLP in obs and info["seed"] == 7
    out = env.step('{"tool": "trace_ops", "args": {}}')
    assert [type(x) for x in out] == [str, float, bool, bool, dict]
    assert out[4]["step"] == 1
    obs, reward, terminated, truncated, info = env.step("not json")
    assert info["error"] == "bad_action" and not (terminated or truncated)
    code, entry = reference("Qwen2MLP")
    obs, reward, terminated, truncated, info = env.step(
        {"tool": "submit", "args": {"code": code, "entry": entry}})
    assert terminated and reward > 0.6 and info["observation"]["tool"] == "submit"
    obs, _ = env.reset(options={"task": "qwen2"})
    assert "the whole model" in obs
    env.close()


# ---- the command line ----

def fmx(*args, **kw):
    return subprocess.run([FMX, *map(str, args)], cwd=ROOT, capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, timeout=300, **kw)


COMMANDS = ["export", "verify", "trace", "mutate", "info", "serve", "keygen", "run", "leaderboard",
            "replay", "regrade", "episodes export", "version"]


@pytest.mark.parametrize("cmd", COMMANDS)
def test_every_command_has_its_own_help(cmd):
    res = fmx(*cmd.split(), "--help")
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith(f"usage: fmx {cmd}"), res.stdout[:200]
    # not the Python modules' argparse usage (fmx export / fmx trace run them)
    assert "[-h]" not in res.stdout and "usage: python3" not in res.stdout
    assert "fmx-tracer" not in res.stdout and "--pack PACK" not in res.stdout


def test_run_plays_every_task_named_and_shows_progress(server):
    tasks = [MLP, "qwen2/Qwen2RMSNorm"]
    res = fmx("run", "--policy", "null", "--connect", server["addr"], "--task", tasks[0],
              "--task", tasks[1], "--jobs", "1")
    assert res.returncode == 0, res.stderr
    assert "null     2 episodes on 2 tasks" in res.stdout, res.stdout
    # not a terminal: a line per ~10%, the last one k/N = N/N with the time
    lines = [l for l in res.stderr.splitlines() if l.startswith("episodes ")]
    assert lines and lines[-1].startswith("episodes 2/2 (100%)") and " s" in lines[-1]
    with sqlite3.connect(server["db"]) as db:
        played = {t for (t,) in db.execute(
            "SELECT e.task_id FROM episodes e JOIN policies p ON p.id = e.policy_id "
            "WHERE p.name = 'null'")}
    assert played == set(tasks)
    bad = fmx("run", "--policy", "null", "--connect", server["addr"], "--task", "nope")
    assert bad.returncode == 2 and "no task 'nope'" in bad.stderr


def _leaderboard_reward(out, policy):
    """The mean reward of a policy's rank row in `fmx leaderboard` output."""
    for line in out.splitlines():
        cols = line.split()
        if len(cols) > 4 and cols[0].isdigit() and cols[1] == policy:
            return float(cols[4])
    raise AssertionError(f"no rank row for {policy} in:\n{out}")


def test_regrades_are_visible_to_the_leaderboard(server, tmp_path):
    code, entry = reference("Qwen2MLP")
    with Client(server["addr"], timeout=120) as c:
        c.reset(task=MLP, policy="lb-version")
        obs, reward, *_ = c.step({"tool": "submit", "args": {"code": code, "entry": entry}})
    db = server["db"]
    bad = tmp_path / "bad.conf"
    bad.write_text('version = "v-bad"\nw_correct = 0.6\nw_loc = 0.35\nw_compile = 0.15\n')
    res = fmx("regrade", "--db", db, "--reward", bad)
    assert res.returncode == 2 and "sum to 1.1" in res.stderr
    conf = tmp_path / "v2.conf"
    conf.write_text('version = "v2-lb"\nw_correct = 0.5\nw_loc = 0.1\nw_compile = 0.4\n')
    res = fmx("regrade", "--db", db, "--reward", conf)
    assert res.returncode == 0, res.stderr
    with sqlite3.connect(db) as con:
        (new,) = con.execute("SELECT g.reward FROM grades g JOIN episodes e ON e.id = g.episode "
                             "JOIN policies p ON p.id = e.policy_id WHERE p.name = 'lb-version' "
                             "AND g.reward_version = 'v2-lb'").fetchone()
    assert abs(new - reward) > 1e-3  # the weights move it
    plain = fmx("leaderboard", "--db", db, "--policy", "lb-version")
    assert _leaderboard_reward(plain.stdout, "lb-version") == pytest.approx(reward, abs=5e-4)
    assert "v2-lb" in plain.stdout and "--reward-version" in plain.stdout
    v2 = fmx("leaderboard", "--db", db, "--policy", "lb-version", "--reward-version", "v2-lb")
    assert v2.returncode == 0, v2.stderr
    assert _leaderboard_reward(v2.stdout, "lb-version") == pytest.approx(new, abs=5e-4)


def test_replay_without_tasks_finds_the_packs_or_says_what_it_needs(server, tmp_path):
    with Client(server["addr"], timeout=120) as c:
        c.reset(task=MLP, policy="replay-test")
        c.step({"tool": "get_weight_info", "args": {}})
        ep = c.episode
        c.close()
    beside = server["packs"] / "copy.db"  # a log beside its packs, as demo.sh keeps it
    with sqlite3.connect(server["db"]) as a, sqlite3.connect(beside) as b:
        a.backup(b)
    try:
        res = fmx("replay", "--db", beside, ep)
        assert res.returncode == 0, res.stdout + res.stderr
        assert "packs beside the log" in res.stderr and "same" in res.stdout
    finally:
        beside.unlink()
    alone = tmp_path / "alone.db"
    with sqlite3.connect(server["db"]) as a, sqlite3.connect(alone) as b:
        a.backup(b)
    res = fmx("replay", "--db", alone, ep)
    assert res.returncode == 2 and "--tasks DIR" in res.stderr and "--no-exec" in res.stderr
    assert fmx("replay", "--db", alone, ep, "--no-exec").returncode == 0


def test_episodes_export_for_trl(server, tmp_path):
    with Client(server["addr"], timeout=120) as c:
        c.reset(task=MLP, policy="export-test")
        c.step({"tool": "no_such_tool", "args": {}})  # an LLM's invented tool
        c.step({"tool": "get_weight_info", "args": {"path": "gate_proj"}})
        c.close()
        c.reset(task=MLP, policy="export-test")  # a 0-step episode
        c.close()
    db, packs = server["db"], server["packs"]
    res = fmx("episodes", "export", "--db", db, "--filter", "policy=export-test")
    assert res.returncode == 2 and "--tasks DIR" in res.stderr  # no silent weaker goal
    res = fmx("episodes", "export", "--db", db, "--tasks", packs, "--filter",
              "policy=export-test", "--arguments", "object")
    assert res.returncode == 0, res.stderr
    (line,) = [json.loads(l) for l in res.stdout.splitlines()]
    assert line["goal_source"] == "pack"
    msgs = line["messages"][2:]
    assert [m["role"] for m in msgs] == ["assistant", "tool"]
    call, result = msgs
    assert call["tool_calls"][0]["function"] == {"name": "get_weight_info",
                                                 "arguments": {"path": "gate_proj"}}
    assert result["name"] == "get_weight_info"
    assert "left out 1 calls" in res.stderr and "1 episodes" in res.stderr
    res = fmx("episodes", "export", "--db", db, "--tasks", packs, "--filter",
              "policy=export-test", "--keep-invalid")
    lines = [json.loads(l) for l in res.stdout.splitlines()]
    assert [l["steps"] for l in lines] == [2, 0]
    calls = [m["tool_calls"][0]["function"] for m in lines[0]["messages"] if "tool_calls" in m]
    assert [c["name"] for c in calls] == ["no_such_tool", "get_weight_info"]
    assert json.loads(calls[1]["arguments"]) == {"path": "gate_proj"}  # a JSON string by default


# ---- an engineer's own model ----

IMAGE_MODEL = '''
import torch
from torch import nn


class Patchify(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Conv2d(3, 8, 4, stride=4)
        self.norm = nn.LayerNorm(8)

    def forward(self, pixel_values):
        return self.norm(self.proj(pixel_values).flatten(2).transpose(1, 2))


def build():
    return Patchify()


def fmx_inputs(model, batch, seq, padding, generator):
    return {"pixel_values": torch.randn(batch, 3, 8, 8, generator=generator)}
'''


def test_info_describes_image_probes_and_marks_bf16_ones(server, tmp_path):
    src = tmp_path / "patchify.py"
    src.write_text(IMAGE_MODEL)
    res = fmx("export", f"{src}:build", "-o", tmp_path / "img", "--quiet")
    assert res.returncode == 0, res.stderr
    info = fmx("info", tmp_path / "img")
    assert info.returncode == 0, info.stderr
    probes = [l for l in info.stdout.splitlines() if re.match(r"\s+p\d+ ", l)]
    assert probes and all("pixel_values (" in l and ", 3, 8, 8) " in l for l in probes)
    assert not any("× seq" in l for l in probes)
    assert any("bfloat16 (copy of p" in l for l in probes)  # the bf16 rerun, marked
    # token probes keep their words; verify's text marks the bf16 probe too
    info = fmx("info", server["packs"] / "qwen2")
    assert re.search(r"p\d+\s+visible\s+batch \d+ × seq \d+, padding \w+, bfloat16 \(copy of p\d+\)",
                     info.stdout), info.stdout
    code, entry = reference("Qwen2MLP")
    sol = tmp_path / "mlp.py"
    sol.write_text(code)
    res = fmx("verify", server["packs"] / "qwen2", sol, "--component", "model.layers.0.mlp",
              "--entry", entry)
    assert res.returncode == 0, res.stdout + res.stderr
    assert re.search(r"probe p\d+ \(batch .*, bfloat16 \(copy of p\d+\)\)", res.stdout), res.stdout


def test_a_missing_weight_key_names_the_nearest_keys(server):
    code, entry = reference("Qwen2MLP")
    wrong = code.replace('prefix + "gate_proj."', 'prefix + "gate_prj."')
    assert wrong != code
    with Client(server["addr"], timeout=120) as c:
        c.reset(task=MLP)
        obs, *_ = c.step({"tool": "verify_component", "args": {"code": wrong, "entry": entry}})
        c.close()
    assert "KeyError: 'gate_prj.weight'" in obs["text"], obs["text"]
    assert "nearest of the" in obs["text"] and "'gate_proj.weight'" in obs["text"]


def test_a_helpers_relative_tap_is_graded(server, tmp_path):
    code, _ = reference("Qwen2ForCausalLM")
    mlp_out = ('    return linear(gate * linear(x, weights, prefix + "up_proj."), weights, '
               'prefix + "down_proj.")\n')
    assert mlp_out in code
    right = code.replace(mlp_out, mlp_out.replace("return linear(", 'return tap("mlp", linear(')
                         .replace('down_proj.")', 'down_proj."))'))
    wrong = code.replace(mlp_out, mlp_out.replace("return linear(", 'return tap("mlp", 2 * linear(')
                         .replace('down_proj.")', 'down_proj."))'))
    reports = {}
    for name, src in (("right", right), ("wrong", wrong)):
        f = tmp_path / f"{name}.py"
        f.write_text(src)
        res = fmx("verify", server["packs"] / "qwen2", f, "--json")
        reports[name] = json.loads(res.stdout)
    taps = [t for t in reports["right"]["probes"][0]["taps"] if t["name"] == "mlp"]
    assert [t["module"] for t in taps] == [f"model.layers.{i}.mlp" for i in range(len(taps))]
    assert len(taps) >= 2 and all(t["pass"] and "resolved" in t for t in taps)
    assert reports["right"]["status"] == "match"
    wrong_taps = [t for t in reports["wrong"]["probes"][0]["taps"] if t["name"] == "mlp"]
    assert wrong_taps and not wrong_taps[0]["pass"]
    assert reports["wrong"]["first_divergence"]["name"] == "mlp"
