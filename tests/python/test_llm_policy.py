"""The llm policy (policies/llm.c) end to end: `fmx run --policy llm` starts
its own `fmx serve` on a qwen2 pack and talks to a scripted OpenAI-compatible
endpoint on 127.0.0.1 (fake_openai.py); nothing leaves the machine.

Covered: a canned conversation (read_module_source, get_weight_info,
verify_component with the reference solution's mlp, submit) graded as the
oracle is, with the requests checked (model, tools from `spec`,
tool_choice, the API key from --api-key-env, each tool result back as a tool
message with its call's id) and the transcript beside the log; malformed
tool calls answered with error tool messages while the episode goes on, and
an answer without tool calls whose ```python block is submitted; 500 and 429
retried; 401 not retried; a dead endpoint ending the episode as aborted with
a clear message; the token budget stopping the conversation (the last
matching verified code submitted, or the episode aborted when there is none).
"""
import ast
import json
import os
import pathlib
import socket
import sqlite3
import subprocess
import time
from typing import Any, Dict, List

import pytest

from fake_openai import FakeOpenAI, completion, error, tool_call

ROOT = pathlib.Path(__file__).resolve().parents[2]
FMX = os.environ.get("FMX_BIN", str(ROOT / "build" / "fmx"))
TASK = "qwen2/Qwen2MLP"
MODEL = "fake-model"
KEY_ENV = "FMX_TEST_LLM_KEY"
KEY = "sk-test-0123456789"
TOOLS = {"read_module_source", "get_weight_info", "capture_intermediate", "trace_ops",
         "verify_component", "submit", "finish"}


def mlp_code() -> str:
    """The reference solution's Qwen2MLP entry `mlp` with what it calls (linear)
    and the imports: the file a good model would write."""
    src = (ROOT / "examples" / "solutions" / "qwen2.py").read_text()
    tree = ast.parse(src)
    keep = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))
            or (isinstance(n, ast.FunctionDef) and n.name in ("linear", "mlp"))]
    return "\n\n".join(ast.get_source_segment(src, n) for n in keep) + "\n"


@pytest.fixture(scope="module")
def packs(example_packs):
    return example_packs.tasks("qwen2")


def run_llm(packs, tmp_path, url: str, *extra: str) -> subprocess.CompletedProcess:
    """`fmx run --policy llm` on TASK with a server of its own; the log is
    tmp_path/fmx.db and transcripts go to tmp_path/tr."""
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    env[KEY_ENV] = KEY
    return subprocess.run(
        [FMX, "run", "--policy", "llm", "--tasks", str(packs), "--db", str(tmp_path / "fmx.db"),
         "--task", TASK, "--jobs", "1", "--base-url", url, "--model", MODEL,
         "--api-key-env", KEY_ENV, "--transcripts", str(tmp_path / "tr"), "--retries", "2",
         *extra],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=90,
        stdin=subprocess.DEVNULL)


def query(tmp_path, sql: str, *params) -> List[tuple]:
    conn = sqlite3.connect(f"file:{tmp_path / 'fmx.db'}?mode=ro", uri=True)
    try:
        return conn.execute(sql, params).fetchall()
    finally:
        conn.close()


def the_episode(tmp_path) -> Dict[str, Any]:
    """The one episode of the log: its row, steps (tool, args, observation
    text, error) and last submission."""
    rows = query(tmp_path, "SELECT e.id, p.name, e.task_id, e.status, e.reward, e.steps "
                           "FROM episodes e JOIN policies p ON p.id = e.policy_id")
    assert len(rows) == 1, rows
    ep, policy, task, status, reward, nsteps = rows[0]
    steps = [(tool, json.loads(args), json.loads(obs)["text"], err) for tool, args, obs, err in
             query(tmp_path, "SELECT tool, args, observation, error FROM steps "
                             "WHERE episode = ? ORDER BY idx", ep)]
    sub = query(tmp_path, "SELECT correctness, reward, entry, truncated FROM submissions "
                          "WHERE episode = ? ORDER BY id DESC LIMIT 1", ep)
    return {"id": ep, "policy": policy, "task": task, "status": status, "reward": reward,
            "nsteps": nsteps, "steps": steps, "tools": [s[0] for s in steps],
            "submission": sub[0] if sub else None}


def transcript(tmp_path, episode: int) -> Dict[str, Any]:
    return json.loads((tmp_path / "tr" / f"episode-{episode}.json").read_text())


def tool_messages(messages: List[Dict[str, Any]]) -> Dict[str, str]:
    return {m["tool_call_id"]: m["content"] for m in messages if m["role"] == "tool"}


def test_canned_conversation_is_graded_like_the_oracle(packs, tmp_path):
    code = mlp_code()
    script = [
        completion("Let me read the module first.",
                   [tool_call("call_1", "read_module_source", {"mode": "live"})], usage=1000),
        completion(None, [tool_call("call_2", "get_weight_info", {})], usage=2000),
        completion("Here is a flat version.",
                   [tool_call("call_3", "verify_component", {"code": code, "entry": "mlp"})],
                   usage=3000),
        completion("It matches; submitting.",
                   [tool_call("call_4", "submit", {"code": code, "entry": "mlp"})], usage=4000),
    ]
    with FakeOpenAI(script) as fake:
        res = run_llm(packs, tmp_path, fake.url, "--temperature", "0.2", "--max-tokens", "777")
    assert res.returncode == 0, res.stdout + res.stderr

    # what the endpoint got
    reqs = fake.requests
    assert len(reqs) == 4
    for r in reqs:
        assert r["path"] == "/v1/chat/completions"
        assert r["headers"]["Authorization"] == f"Bearer {KEY}"
        body = r["body"]
        assert body["model"] == MODEL and body["tool_choice"] == "auto"
        assert body["max_tokens"] == 777 and body["temperature"] == pytest.approx(0.2)
        assert {t["function"]["name"] for t in body["tools"]} == TOOLS
        assert all(t["type"] == "function" and t["function"]["parameters"]["type"] == "object"
                   for t in body["tools"])
        assert body["tools"] == reqs[0]["body"]["tools"]
    first = reqs[0]["body"]["messages"]
    assert [m["role"] for m in first] == ["system", "user"]
    assert "candidate language" in first[0]["content"]
    assert first[1]["content"].startswith(f"Task {TASK}: rewrite model.layers.0.mlp")
    last = reqs[3]["body"]["messages"]
    assert [m["role"] for m in last] == ["system", "user"] + ["assistant", "tool"] * 3
    for i, m in enumerate(last[2::2], start=1):  # the assistant turns come back as they were
        assert m["tool_calls"][0]["id"] == f"call_{i}"
        assert m["tool_calls"][0]["function"]["name"] == script[i - 1]["body"]["choices"][0][
            "message"]["tool_calls"][0]["function"]["name"]
    assert last[2]["content"] == "Let me read the module first."
    results = tool_messages(last)
    assert set(results) == {"call_1", "call_2", "call_3"}
    assert "class Qwen2MLP" in results["call_1"]
    assert "gate_proj.weight" in results["call_2"]
    assert "MATCH" in results["call_3"] and "MISMATCH" not in results["call_3"]

    # the server's log: every step, graded as the oracle's submission is
    ep = the_episode(tmp_path)
    assert ep["policy"] == f"llm:{MODEL}" and ep["task"] == TASK
    assert ep["status"] == "submitted" and ep["nsteps"] == 4
    assert ep["tools"] == ["read_module_source", "get_weight_info", "verify_component", "submit"]
    assert ep["steps"][0][1] == {"mode": "live"}
    assert ep["steps"][3][1] == {"code": code, "entry": "mlp"}
    for (_, _, text, err), call in zip(ep["steps"][:3], ("call_1", "call_2", "call_3")):
        assert err is None and results[call] == text  # the model read what was logged
    correctness, reward, entry, truncated = ep["submission"]
    assert correctness == 1.0 and entry == "mlp" and truncated == 0
    assert ep["reward"] == pytest.approx(reward) and reward == pytest.approx(1.0)
    assert f"llm:{MODEL}" in res.stdout

    # the transcript: assistant text and usage per turn, joined to the log's steps
    t = transcript(tmp_path, ep["id"])
    assert t["status"] == "submitted" and t["stop"] == "submitted" and t["error"] is None
    assert t["model"] == MODEL and t["policy"] == f"llm:{MODEL}"
    assert t["usage"]["total_tokens"] == 10000 and t["usage"]["requests"] == 4
    assert [turn["usage"]["total_tokens"] for turn in t["turns"]] == [1000, 2000, 3000, 4000]
    assert [turn["text"] for turn in t["turns"]] == [
        "Let me read the module first.", None, "Here is a flat version.",
        "It matches; submitting."]
    assert [c["step"] for turn in t["turns"] for c in turn["tool_calls"]] == [0, 1, 2, 3]
    assert t["messages"][-1]["role"] == "tool" and "reward" in t["messages"][-1]["content"]
    assert KEY not in json.dumps(t)


def test_malformed_tool_calls_get_error_messages_and_the_episode_goes_on(packs, tmp_path):
    code = mlp_code()
    script = [
        completion(None, [tool_call("call_a", "read_file", {"path": "x"}),
                          tool_call("call_b", "get_weight_info", '{"path": '),
                          tool_call("call_c", None, "{}"),
                          tool_call("call_d", "trace_ops", "")]),  # no usage: estimated
        completion(f"Done. The file:\n\n```python\n{code}```\n"),
    ]
    with FakeOpenAI(script) as fake:
        res = run_llm(packs, tmp_path, fake.url)
    assert res.returncode == 0, res.stdout + res.stderr
    assert len(fake.requests) == 2
    msgs = fake.requests[1]["body"]["messages"]
    assert [m["role"] for m in msgs] == ["system", "user", "assistant"] + ["tool"] * 4
    assert [m["tool_call_id"] for m in msgs[3:]] == ["call_a", "call_b", "call_c", "call_d"]
    results = tool_messages(msgs)
    assert results["call_a"].startswith("error (unknown_tool): there is no tool 'read_file'")
    assert "read_module_source" in results["call_a"]
    assert results["call_b"].startswith("error (bad_arguments): the arguments of get_weight_info")
    assert results["call_c"].startswith("error (bad_tool_call)")
    assert results["call_d"].startswith("Ops inside model.layers.0.mlp")  # trace_ops ran

    # only the well-formed call was a step; the ```python block was submitted
    ep = the_episode(tmp_path)
    assert ep["tools"] == ["trace_ops", "submit"] and ep["status"] == "submitted"
    correctness, _, entry, _ = ep["submission"]
    assert correctness == 1.0 and entry == "mlp"
    t = transcript(tmp_path, ep["id"])
    assert t["turns"][0]["usage"]["estimated"] is True and t["usage"]["estimated_tokens"] > 0
    assert [c.get("error", "")[:12] for c in t["turns"][0]["tool_calls"]] == [
        "error (unkno", "error (bad_a", "error (bad_t", ""]
    assert t["stop"].startswith("answer without tool calls: submitted")


def test_server_errors_and_rate_limits_are_retried(packs, tmp_path):
    code = mlp_code()
    script = [error(500, "overloaded"), error(429, "slow down", {"Retry-After": "1"}),
              completion(None, [tool_call("c1", "submit", {"code": code, "entry": "mlp"})],
                         usage=10)]
    t0 = time.monotonic()
    with FakeOpenAI(script) as fake:
        res = run_llm(packs, tmp_path, fake.url)
    assert res.returncode == 0, res.stdout + res.stderr
    assert time.monotonic() - t0 >= 2.0  # 1 s backoff, then Retry-After: 1
    assert len(fake.requests) == 3
    assert fake.requests[0]["body"] == fake.requests[1]["body"] == fake.requests[2]["body"]
    ep = the_episode(tmp_path)
    assert ep["status"] == "submitted" and ep["submission"][0] == 1.0
    t = transcript(tmp_path, ep["id"])
    assert t["turns"][0]["attempts"] == 3 and t["usage"]["retries"] == 2


def test_client_errors_are_not_retried(packs, tmp_path):
    with FakeOpenAI([error(401, "invalid api key")]) as fake:
        res = run_llm(packs, tmp_path, fake.url)
    assert res.returncode == 2
    assert len(fake.requests) == 1
    assert "HTTP 401: invalid api key" in res.stderr and KEY_ENV in res.stderr
    ep = the_episode(tmp_path)
    assert ep["status"] == "aborted" and ep["nsteps"] == 0


def test_dead_endpoint_aborts_the_episode_cleanly(packs, tmp_path):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    res = run_llm(packs, tmp_path, f"http://127.0.0.1:{port}/v1", "--retries", "1")
    assert res.returncode == 2, res.stdout + res.stderr  # an error, not a crash
    assert f"cannot reach http://127.0.0.1:{port}/v1/chat/completions" in res.stderr
    assert "(after 2 tries)" in res.stderr and "closed: aborted" in res.stderr
    ep = the_episode(tmp_path)
    assert ep["status"] == "aborted" and ep["nsteps"] == 0
    t = transcript(tmp_path, ep["id"])
    assert t["status"] == "aborted" and t["stop"] == "endpoint error"
    assert "cannot reach" in t["error"]
    assert "episode log (SQLite)" in res.stdout  # fmx run still printed the leaderboard


def test_token_budget_stops_the_conversation(packs, tmp_path):
    code = mlp_code()
    # The first reply spends the budget: its call runs, then no more requests;
    # the matching verified code is submitted.
    script = [completion(None, [tool_call("v1", "verify_component",
                                          {"code": code, "entry": "mlp"})], usage=1500)]
    with FakeOpenAI(script) as fake:
        res = run_llm(packs, tmp_path, fake.url, "--token-budget", "1000")
    assert res.returncode == 0, res.stdout + res.stderr
    assert len(fake.requests) == 1
    ep = the_episode(tmp_path)
    assert ep["tools"] == ["verify_component", "submit"] and ep["status"] == "submitted"
    assert ep["submission"][0] == 1.0
    t = transcript(tmp_path, ep["id"])
    assert t["stop"] == "token budget spent" and t["usage"]["total_tokens"] == 1500

    # Nothing verified: the episode is closed (aborted), no error.
    other = tmp_path / "nothing-verified"
    other.mkdir()
    script = [completion(None, [tool_call("r1", "read_module_source", {})], usage=1500)]
    with FakeOpenAI(script) as fake:
        res = run_llm(packs, other, fake.url, "--token-budget", "1000")
    assert res.returncode == 0, res.stdout + res.stderr
    assert len(fake.requests) == 1
    ep = the_episode(other)
    assert ep["tools"] == ["read_module_source"] and ep["status"] == "aborted"
