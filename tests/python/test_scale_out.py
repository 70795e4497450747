"""Several servers (docs/scale-out.md): fmx.Servers and fmx.AsyncServers place
episodes on the least-loaded server and keep each on its own, and
`fmx episodes merge` makes the servers' logs one log that the research tools
read (leaderboard, replay).

Two `fmx serve` on loopback (ipc://), one worker each, the qwen2 example pack.
"""
import asyncio
import json
import os
import pathlib
import shutil
import signal
import sqlite3
import subprocess
import tempfile

import pytest

from fmx import AsyncServers, Client, Servers, UnknownEpisode

ROOT = pathlib.Path(__file__).resolve().parents[2]
FMX = os.environ.get("FMX_BIN", str(ROOT / "build" / "fmx"))
SOLUTIONS = ROOT / "examples" / "solutions"


@pytest.fixture(scope="module")
def servers(example_packs):
    packs = example_packs.tasks("qwen2")
    d = pathlib.Path(tempfile.mkdtemp(prefix="fmx-scale-"))
    procs, addrs, dbs = [], [], []
    for name in ("a", "b"):
        addr, db = f"ipc://{d}/{name}.sock", d / f"{name}.db"
        procs.append(subprocess.Popen([FMX, "serve", "--tasks", packs, "--db", db, "--bind", addr,
                                       "--workers", "1"], stdin=subprocess.DEVNULL,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                      text=True))
        addrs.append(addr)
        dbs.append(db)
    for addr in addrs:
        with Client(addr, timeout=60) as c:
            c.hello()
    yield packs, addrs, dbs, d
    for p in procs:
        p.send_signal(signal.SIGTERM)
    for p in procs:
        _, err = p.communicate(timeout=60)
        assert p.returncode == 0, err[-2000:]
    shutil.rmtree(d, ignore_errors=True)


def sql(db, query):
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
        return conn.execute(query).fetchall()


def test_episodes_are_placed_by_load_and_stay_on_their_server(servers):
    packs, addrs, _, _ = servers
    code = (SOLUTIONS / "qwen2.py").read_text()
    entry = json.loads((SOLUTIONS / "qwen2.entries.json").read_text())["Qwen2MLP"]
    with Servers(addrs, timeout=120) as s:
        opened = [s.reset(task="qwen2/Qwen2MLP", policy="scale")[1] for _ in range(6)]
        ids = [info["episode"] for info in opened]
        assert sorted(ids) == list(range(1, 7))  # ours: no two servers' ids collide
        on = [info["server"] for info in opened]
        assert on.count(addrs[0]) == 3 and on.count(addrs[1]) == 3
        for ep, info in zip(ids, opened):
            assert s.where(ep)[0] == info["server"]
            obs, *_ = s.step({"tool": "get_weight_info", "args": {}}, ep)
            assert "error" not in obs, obs
        # each episode's steps went to its own server: one step each there
        health = s.health()
        assert [h["episodes_open"] for h in health] == [3, 3]
        with pytest.raises(UnknownEpisode):
            s.step({"tool": "get_weight_info", "args": {}}, 99)
        # one graded submit, the rest closed
        obs, reward, terminated, _, info = s.step(
            {"tool": "submit", "args": {"code": code, "entry": entry}}, ids[0])
        assert terminated and reward > 0.5, obs["text"]
        for ep in ids[1:]:
            s.close(ep)
        assert [h["episodes_open"] for h in s.health()] == [0, 0]


def test_async_servers_spread_concurrent_resets(servers):
    _, addrs, _, _ = servers

    async def main():
        async with AsyncServers(addrs, timeout=120) as s:
            opened = await asyncio.gather(*(s.reset(task="qwen2/Qwen2MLP", policy="scale-async")
                                            for _ in range(4)))
            where = [info["server"] for _, info in opened]
            steps = await asyncio.gather(*(s.step({"tool": "read_module_source", "args": {}},
                                                  info["episode"]) for _, info in opened))
            for _, info in opened:
                await s.close(info["episode"])
            return where, steps

    where, steps = asyncio.run(main())
    assert where.count(addrs[0]) == 2 and where.count(addrs[1]) == 2
    assert all("error" not in obs for obs, *_ in steps)


def test_merged_logs_read_as_one(servers):
    packs, addrs, dbs, d = servers
    merged = d / "all.db"
    res = subprocess.run([FMX, "episodes", "merge", "-o", merged, *dbs], capture_output=True,
                         text=True, stdin=subprocess.DEVNULL, timeout=120)
    assert res.returncode == 0, res.stderr
    want = sum(sql(db, "SELECT count(*) FROM episodes")[0][0] for db in dbs)
    assert want >= 10
    assert sql(merged, "SELECT count(*) FROM episodes")[0][0] == want
    assert sql(merged, "SELECT count(*) FROM steps")[0][0] == sum(
        sql(db, "SELECT count(*) FROM steps")[0][0] for db in dbs)
    board = subprocess.run([FMX, "leaderboard", "--db", merged], capture_output=True, text=True,
                           stdin=subprocess.DEVNULL, timeout=60)
    assert board.returncode == 0, board.stderr
    assert "scale" in board.stdout and "scale-async" in board.stdout
    # the submitted episode replays from the merged log as it ran on its server
    ep = sql(merged, "SELECT id FROM episodes WHERE status = 'submitted'")[0][0]
    replay = subprocess.run([FMX, "replay", "--db", merged, str(ep), "--tasks", packs],
                            capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=300)
    assert replay.returncode == 0, replay.stdout[-3000:] + replay.stderr
    bad = subprocess.run([FMX, "episodes", "merge", "-o", merged, d / "a.sock"],
                         capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=60)
    assert bad.returncode == 2 and "fmx episodes merge:" in bad.stderr
