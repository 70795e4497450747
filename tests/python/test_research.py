"""The research tools on a real episode log: `fmx replay`, `fmx regrade`,
`fmx leaderboard --html` and `fmx episodes export`.

One log for the module: the gpt2 example exported, then `fmx run --policy
oracle,null` (its own server) plays every task once per policy. Tests that
write (tampering, regrade) work on copies of it.

Covered: an oracle episode (and a null one) replays with no divergence; a
tampered observation (data or text) makes replay exit 1 naming the step and
the field, while a float moved by an ulp does not; replay's errors (unknown
episode, no --tasks, missing pack) exit 2; regrade under other weights
stores the expected rewards in `grades` and keeps the old grades; the HTML
leaderboard renders in headless Chromium (table rows, both charts with one
dot per episode, no console message, a non-blank screenshot); the JSONL
export matches the log step by step, its filters select what SQL selects,
and with --tasks its system message is the server's reset goal.
"""
import contextlib
import json
import math
import os
import pathlib
import re
import shutil
import signal
import sqlite3
import struct
import subprocess
import tempfile
import zlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
FMX = os.environ.get("FMX_BIN", str(ROOT / "build" / "fmx"))


def fmx(*args, timeout=120, **kw):
    return subprocess.run([FMX, *map(str, args)], cwd=ROOT, capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, timeout=timeout, **kw)


def sql(db, query, *params):
    with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as conn:
        return conn.execute(query, params).fetchall()


def copy_db(src, dst):
    """A consistent copy (the backup API: WAL content included)."""
    with contextlib.closing(sqlite3.connect(src)) as a, contextlib.closing(
            sqlite3.connect(dst)) as b:
        a.backup(b)
    return dst


@pytest.fixture(scope="module")
def log(tmp_path_factory, example_packs):
    """(packs dir, episode log) after oracle and null played every gpt2 task."""
    out = tmp_path_factory.mktemp("research")
    packs = out / "packs"  # beside the log, as fmx run lays them out
    packs.symlink_to(example_packs.tasks("gpt2"), target_is_directory=True)
    db = out / "fmx.db"
    res = fmx("run", "--policy", "oracle,null", "--tasks", packs, "--db", db, "--jobs", "2")
    assert res.returncode == 0, res.stdout + res.stderr
    return packs, db


def episode_of(db, policy, task):
    return sql(db, "SELECT e.id FROM episodes e JOIN policies p ON p.id = e.policy_id "
                   "WHERE p.name = ? AND e.task_id = ?", policy, task)[0][0]


# ---- replay ----

def test_replay_of_oracle_and_null_episodes_reports_no_divergence(log):
    packs, db = log
    for policy, task in (("oracle", "gpt2"), ("oracle", "gpt2/GPT2MLP"),
                         ("null", "gpt2/GPT2MLP")):
        ep = episode_of(db, policy, task)
        res = fmx("replay", "--db", db, ep, "--tasks", packs)
        assert res.returncode == 0, res.stdout + res.stderr
        n = sql(db, "SELECT steps FROM episodes WHERE id = ?", ep)[0][0]
        assert f"replay: all {n} steps match the log" in res.stdout
        assert f"episode {ep} · task {task} · policy {policy}" in res.stdout
        tools = [t for (t,) in sql(db, "SELECT tool FROM steps WHERE episode = ? ORDER BY idx",
                                   ep)]
        # the transcript, then one verdict per step, in order
        for i, tool in enumerate(tools):
            assert f"\n[{i}] {tool} " in res.stdout
            assert re.search(rf"^\[{i}\] {tool} +same$", res.stdout, re.M), res.stdout
    # code is abbreviated in the transcript unless --full
    ep = episode_of(db, "oracle", "gpt2/GPT2MLP")
    short = fmx("replay", "--db", db, ep, "--no-exec")
    full = fmx("replay", "--db", db, ep, "--no-exec", "--full")
    code = sql(db, "SELECT code FROM submissions WHERE episode = ?", ep)[0][0]
    assert short.returncode == 0 and full.returncode == 0
    longest = max(code.splitlines(), key=len)
    assert "lines, " in short.stdout and longest not in short.stdout
    assert "  | " + longest in full.stdout
    assert "replay of" not in short.stdout


def test_replay_names_the_tampered_step(log, tmp_path):
    packs, db = log
    bad = copy_db(db, tmp_path / "tampered.db")
    ep = episode_of(db, "oracle", "gpt2/GPT2MLP")
    with contextlib.closing(sqlite3.connect(bad)) as conn:
        def edit(idx, change):
            obs = json.loads(conn.execute("SELECT observation FROM steps WHERE episode = ? AND "
                                          "idx = ?", (ep, idx)).fetchone()[0])
            change(obs)
            # steps is a view: observations are stored once in blobs (README: the log)
            blob = conn.execute("INSERT INTO blobs (hash, body) VALUES (randomblob(32), ?)",
                                (json.dumps(obs),)).lastrowid
            conn.execute("UPDATE step_rows SET observation_id = ? WHERE episode = ? AND idx = ?",
                         (blob, ep, idx))
        tools = [t for (t,) in conn.execute(
            "SELECT tool FROM steps WHERE episode = ? ORDER BY idx", (ep,))]
        cap = tools.index("capture_intermediate")
        weights = tools.index("get_weight_info")
        submit = tools.index("submit")

        def data_edit(obs):
            obs["data"]["outputs"][0]["stats"]["mean"] *= 1.001

        def text_edit(obs):
            obs["text"] = obs["text"].replace("float32", "float16", 1)

        def ulp_edit(obs):  # one ulp: within the tolerance, not a divergence
            g = obs["data"]["grade"]
            g["reward"] = math.nextafter(g["reward"], 0)
        edit(cap, data_edit)
        edit(weights, text_edit)
        edit(submit, ulp_edit)
        conn.commit()
    res = fmx("replay", "--db", bad, ep, "--tasks", packs)
    assert res.returncode == 1, res.stdout + res.stderr
    out = res.stdout
    assert re.search(rf"^\[{cap}\] capture_intermediate +DIFFERS", out, re.M), out
    assert "data.outputs[0].stats.mean: logged" in out
    assert re.search(rf"^\[{weights}\] get_weight_info +DIFFERS", out, re.M), out
    assert re.search(r"text: line \d+: logged \".*float16", out), out
    assert re.search(rf"^\[{submit}\] submit +same$", out, re.M), out
    assert f"replay: 2 of {len(tools)} steps DIFFER from the log" in out
    # the original log still replays clean
    assert fmx("replay", "--db", db, ep, "--tasks", packs).returncode == 0


def test_replay_errors_exit_2(log, tmp_path):
    packs, db = log
    ep = episode_of(db, "oracle", "gpt2/GPT2MLP")
    unknown = fmx("replay", "--db", db, 99999, "--tasks", packs)
    assert unknown.returncode == 2 and "no episode 99999" in unknown.stderr
    # without --tasks: the packs in packs/ beside the log (fmx run's layout) are found ...
    found = fmx("replay", "--db", db, ep)
    assert found.returncode == 0, found.stderr
    assert f"packs beside the log, {db.parent}/packs" in found.stderr and "same" in found.stdout
    # ... and where there are none, it says what it needs before the transcript
    alone = copy_db(db, tmp_path / "alone.db")
    no_tasks = fmx("replay", "--db", alone, ep)
    assert no_tasks.returncode == 2 and "--tasks DIR" in no_tasks.stderr
    assert "does not record" in no_tasks.stderr and "--no-exec" in no_tasks.stderr
    other = tmp_path / "other-packs"
    other.mkdir()
    (other / "notgpt2").symlink_to(packs / "gpt2")
    missing = fmx("replay", "--db", db, ep, "--tasks", other)
    assert missing.returncode == 2
    assert "task 'gpt2/GPT2MLP' is not among the packs" in missing.stderr
    nodb = fmx("replay", "--db", tmp_path / "none.db", ep, "--tasks", packs)
    assert nodb.returncode == 2 and "none.db" in nodb.stderr


# ---- regrade ----

def test_regrade_stores_new_rewards_and_keeps_the_old(log, tmp_path):
    packs, db = log
    work = copy_db(db, tmp_path / "regrade.db")
    before = sql(work, "SELECT id, reward, reward_version, correctness, loc_score, "
                       "compile_score FROM submissions ORDER BY id")
    conf = tmp_path / "weights.conf"
    conf.write_text('version = "t-weights"\nw_correct = 0.5\nw_loc = 0.5\nw_compile = 0\n')
    res = fmx("regrade", "--db", work, "--reward", conf)
    assert res.returncode == 0, res.stdout + res.stderr
    # the old grades are untouched
    assert sql(work, "SELECT id, reward, reward_version, correctness, loc_score, "
                     "compile_score FROM submissions ORDER BY id") == before
    new = dict(sql(work, "SELECT submission, reward FROM grades "
                         "WHERE reward_version = 't-weights' AND rerun = 0"))
    assert sorted(new) == [row[0] for row in before]
    want = {}
    for sid, old, version, c, loc_score, _ in before:
        assert version == "v1-default"
        want[sid] = 0.5 * c + (0.5 * loc_score if c == 1 else 0)
        assert new[sid] == pytest.approx(want[sid], abs=1e-12)
    # the oracle's rewards do change: some solutions are over their LOC target
    assert any(abs(new[s] - old) > 1e-6 for s, old, *_ in before)
    # the summary: per policy, old and new mean reward
    for policy in ("oracle", "null"):
        rows = sql(work, "SELECT s.id, s.reward FROM submissions s JOIN episodes e "
                         "ON e.id = s.episode JOIN policies p ON p.id = e.policy_id "
                         "WHERE p.name = ?", policy)
        old_mean = sum(r for _, r in rows) / len(rows)
        new_mean = sum(want[s] for s, _ in rows) / len(rows)
        line = next(l for l in res.stdout.splitlines() if l.startswith(policy + " "))
        fields = line.split()
        assert int(fields[1]) == len(rows)
        assert float(fields[2]) == pytest.approx(old_mean, abs=6e-5)
        assert float(fields[3]) == pytest.approx(new_mean, abs=6e-5)
    # --rerun grades the code again: same facts here, so the same rewards
    res = fmx("regrade", "--db", work, "--reward", conf, "--rerun", "--tasks", packs)
    assert res.returncode == 0, res.stdout + res.stderr
    rerun = dict(sql(work, "SELECT submission, reward FROM grades "
                           "WHERE reward_version = 't-weights' AND rerun = 1"))
    assert rerun.keys() == new.keys()
    assert all(rerun[s] == pytest.approx(new[s], abs=1e-12) for s in new)
    # regrading again replaces its own rows instead of adding more
    assert fmx("regrade", "--db", work, "--reward", conf).returncode == 0
    assert sql(work, "SELECT count(*) FROM grades")[0][0] == 2 * len(before)
    assert fmx("regrade", "--db", work, "--rerun").returncode == 2  # needs --tasks


# ---- leaderboard --html in headless Chromium ----

def png_pixels_vary(path, want_size):
    """(width, height) match and the image is not one flat colour."""
    data = pathlib.Path(path).read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat, size = 8, b"", None
    while pos < len(data):
        n, kind = struct.unpack(">I4s", data[pos:pos + 8])
        body = data[pos + 8:pos + 8 + n]
        if kind == b"IHDR":
            size = struct.unpack(">II", body[:8])
        elif kind == b"IDAT":
            idat += body
        pos += 12 + n
    raw = zlib.decompress(idat)
    assert size == want_size
    return len(set(raw)) > 64


def test_leaderboard_html_renders_in_headless_chromium(log, tmp_path):
    chromium = shutil.which("chromium")
    if not chromium:
        if os.environ.get("FMX_REQUIRE_CHROMIUM"):
            pytest.fail("chromium is not installed but FMX_REQUIRE_CHROMIUM is set")
        pytest.skip("chromium is not installed (scripts/setup.sh installs Debian's chromium; "
                    "set FMX_REQUIRE_CHROMIUM=1 to make this a failure)")
    _, db = log
    page = tmp_path / "board.html"
    res = fmx("leaderboard", "--db", db, "--html", page)
    assert res.returncode == 0, res.stderr
    html = page.read_text()
    assert "http://" not in html.replace('xmlns="http://www.w3.org/2000/svg"', "")
    assert "https://" not in html and "<link" not in html and " src=" not in html

    finished = sql(db, "SELECT count(*) FROM episodes WHERE status IN "
                       "('submitted', 'truncated')")[0][0]
    graded = sql(db, "SELECT count(DISTINCT e.id) FROM episodes e JOIN submissions s "
                     "ON s.episode = e.id WHERE e.status IN ('submitted', 'truncated')")[0][0]
    pairs = sql(db, "SELECT count(*) FROM (SELECT DISTINCT policy_id, task_id FROM episodes)")[0][0]

    base = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
            "--no-first-run", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", "--enable-logging=stderr", "--v=0", "--window-size=1200,900"]
    with tempfile.TemporaryDirectory() as profile:
        dom = subprocess.run(base + [f"--user-data-dir={profile}", "--dump-dom", page.as_uri()],
                             capture_output=True, text=True, timeout=60)
    assert dom.returncode == 0, dom.stderr[-2000:]
    console = [l for l in dom.stderr.splitlines() if "CONSOLE" in l]
    assert console == [], console
    # the inline script ran and counted what rendered
    check = re.search(r'<p id="render-check" data-ok="1">(.*?)</p>', dom.stdout)
    assert check, dom.stdout[-2000:]
    assert check.group(1) == (f"rendered: 2 policies, {pairs} policy-task rows, 2 charts, "
                              f"{finished} reward points, {graded} loc points")
    ranking = re.search(r'<table class="ranking">(.*?)</table>', dom.stdout, re.S).group(1)
    rows = re.findall(r"<tr><td>(\d+)</td><td>.*?</span>(\w+)</td>", ranking)
    assert rows == [("1", "oracle"), ("2", "null")]

    shot = tmp_path / "board.png"
    with tempfile.TemporaryDirectory() as profile:
        res = subprocess.run(base + [f"--user-data-dir={profile}", f"--screenshot={shot}",
                                     page.as_uri()], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0 and shot.exists(), res.stderr[-2000:]
    assert [l for l in res.stderr.splitlines() if "CONSOLE" in l] == []
    assert png_pixels_vary(shot, (1200, 900))


# ---- episodes export ----

KEYS = {"messages", "tools", "episode", "task", "policy", "status", "steps", "reward",
        "reward_version", "breakdown", "goal_source"}


def test_export_jsonl_round_trips(log, tmp_path):
    _, db = log
    out = tmp_path / "episodes.jsonl"
    res = fmx("episodes", "export", "--db", db, "--format", "jsonl", "-o", out, "--goal-from-log")
    assert res.returncode == 0, res.stderr
    lines = [json.loads(l) for l in out.read_text().splitlines()]
    episodes = sql(db, "SELECT e.id, e.task_id, p.name, e.status, e.reward FROM episodes e "
                       "JOIN policies p ON p.id = e.policy_id ORDER BY e.id")
    assert [l["episode"] for l in lines] == [e[0] for e in episodes]
    for line, (ep, task, policy, status, reward) in zip(lines, episodes):
        assert set(line) == KEYS
        assert (line["task"], line["policy"], line["status"]) == (task, policy, status)
        assert line["reward"] == reward and line["goal_source"] == "log"
        sub = sql(db, "SELECT reward_version, breakdown FROM submissions WHERE episode = ? "
                      "ORDER BY id DESC LIMIT 1", ep)
        assert line["reward_version"] == sub[0][0]
        assert line["breakdown"] == json.loads(sub[0][1])
        assert line["breakdown"]["reward"] == pytest.approx(reward, rel=1e-15)
        steps = sql(db, "SELECT idx, tool, args, observation FROM steps WHERE episode = ? "
                        "ORDER BY idx", ep)
        assert line["steps"] == len(steps)
        msgs = line["messages"]
        assert [m["role"] for m in msgs[:2]] == ["system", "user"]
        assert task in msgs[0]["content"] and task in msgs[1]["content"]
        assert len(msgs) == 2 + 2 * len(steps)
        for (idx, tool, args, obs), call, result in zip(steps, msgs[2::2], msgs[3::2]):
            assert call["role"] == "assistant" and call["content"] is None
            (tc,) = call["tool_calls"]
            assert tc["type"] == "function" and tc["function"]["name"] == tool
            assert json.loads(tc["function"]["arguments"]) == json.loads(args)
            assert result == {"role": "tool", "tool_call_id": tc["id"], "name": tool,
                              "content": json.loads(obs)["text"]}
        assert len({m["tool_call_id"] for m in msgs[3::2]}) == len(steps)
        names = {t["function"]["name"] for t in line["tools"]}
        assert {"read_module_source", "verify_component", "submit"} <= names

    # filters select what SQL selects
    res = fmx("episodes", "export", "--db", db, "--filter", "policy=oracle,min_reward=1",
              "--filter", "status=submitted", "--goal-from-log")
    assert res.returncode == 0, res.stderr
    got = [json.loads(l)["episode"] for l in res.stdout.splitlines()]
    want = [e for (e,) in sql(db, "SELECT e.id FROM episodes e JOIN policies p "
                                  "ON p.id = e.policy_id WHERE p.name = 'oracle' AND "
                                  "e.reward >= 1 AND e.status = 'submitted' ORDER BY e.id")]
    assert got == want and 0 < len(want) < len(episodes) / 2
    res = fmx("episodes", "export", "--db", db, "--filter", "task=gpt2/GPT2MLP", "--goal-from-log")
    assert {json.loads(l)["policy"] for l in res.stdout.splitlines()} == {"oracle", "null"}
    bad = fmx("episodes", "export", "--db", db, "--filter", "colour=blue", "--goal-from-log")
    assert bad.returncode == 2 and "unknown filter key 'colour'" in bad.stderr


def test_export_system_message_is_the_servers_reset_goal(log):
    packs, db = log
    from fmx import Client  # python/ on PYTHONPATH (scripts/test.sh)
    task = "gpt2/GPT2MLP"
    tmp = pathlib.Path(tempfile.mkdtemp(prefix="fmx-research-"))
    addr = f"ipc://{tmp}/s.sock"
    srv = subprocess.Popen([FMX, "serve", "--tasks", packs, "--db", tmp / "goal.db", "--bind",
                            addr, "--threads", "1"], stdin=subprocess.DEVNULL,
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        with Client(addr, timeout=60) as c:
            obs, _ = c.reset(task=task, policy="goal-check")
    finally:
        srv.send_signal(signal.SIGTERM)
        srv.communicate(timeout=40)
        shutil.rmtree(tmp, ignore_errors=True)
    res = fmx("episodes", "export", "--db", db, "--tasks", packs, "--filter",
              f"task={task},policy=oracle")
    assert res.returncode == 0, res.stderr
    (line,) = [json.loads(l) for l in res.stdout.splitlines()]
    assert line["goal_source"] == "pack"
    assert line["messages"][0] == {"role": "system", "content": obs["text"]}


# ---- a logged endless loop: replay and regrade --rerun end at the deadline ----

ENDLESS = """import torch

def forward(hidden_states: torch.Tensor, weights: dict) -> torch.Tensor:
    while True:
        pass
"""


def test_replay_and_rerun_of_a_logged_endless_loop_end_at_the_deadline(log, tmp_path):
    """Logged code is evaluated as the server evaluated it (sandboxed, under
    its --eval-timeout): an endless loop that timed out in the server times
    out again in replay and in regrade --rerun, and both commands finish."""
    from fmx import Client
    packs, _ = log
    sock = pathlib.Path(tempfile.mkdtemp(prefix="fmx-loop-"))
    db = tmp_path / "loop.db"
    srv = subprocess.Popen([FMX, "serve", "--tasks", packs, "--db", db, "--bind",
                            f"ipc://{sock}/s.sock", "--workers", "1", "--eval-timeout", "1.5"],
                           stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True)
    try:
        with Client(f"ipc://{sock}/s.sock", timeout=60) as c:
            _, info = c.reset(task="gpt2/GPT2MLP", policy="loop")
            action = {"code": ENDLESS, "entry": "forward"}
            verified = c.step({"tool": "verify_component", "args": action})
            assert "timeout" in json.dumps(verified[0]), verified[0]
            submitted = c.step({"tool": "submit", "args": action})
            assert submitted[2]  # the episode ended
            assert submitted[1] == 0
    finally:
        srv.send_signal(signal.SIGTERM)
        srv.communicate(timeout=40)
        shutil.rmtree(sock, ignore_errors=True)
    ep = info["episode"]
    replay = fmx("replay", "--db", db, ep, "--tasks", packs, "--eval-timeout", "1.5", timeout=90)
    assert replay.returncode == 0, replay.stdout + replay.stderr
    assert "timeout" in replay.stdout
    bad = fmx("replay", "--db", db, ep, "--tasks", packs, "--eval-timeout", "soon")
    assert bad.returncode == 2 and "--eval-timeout takes seconds" in bad.stderr
    res = fmx("regrade", "--db", db, "--rerun", "--tasks", packs, "--eval-timeout", "1.5",
              timeout=90)
    assert res.returncode == 0, res.stdout + res.stderr
    assert sql(db, "SELECT correctness, reward FROM grades WHERE rerun = 1") == [(0.0, 0.0)]
