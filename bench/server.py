"""bench/server.py — throughput and latency of `fmx serve`, measured from the
client side with the Python client (fmx.client), as a trainer sees them.

    /usr/bin/python3 bench/server.py [--fmx build/fmx] [--seconds 3] [--window 8]

It exports the two example packs to a temporary folder (or uses --packs),
starts `fmx serve` on an ipc:// socket with its own SQLite log and a step
budget large enough that cheap steps never truncate, then measures:

  1. cheap steps (read_module_source and get_weight_info in turn; --tools) with
     1, 4 and 16 concurrent clients, each a process keeping --window episodes
     with one step in flight each: steps/s over all clients, and the latency
     of each step from send to reply (p50, p99);
  2. verify_component latency (the reference solution of a decoder layer), alone
     and while 4 clients run cheap steps;
  3. oracle episodes/s (reset, four reads, verify_component, submit) with 1 and
     4 clients;
  4. the transport floor, in the same run: raw ZeroMQ DEALER clients (one
     process each, --window messages in flight, the same pre-encoded cheap
     step requests) against a bare ROUTER that echoes every message
     (build/bench/bench_echo) and against `fmx serve`; fmx's rate is printed
     as a fraction of the floor, with the log's growth in bytes per step.

Every step is committed to the log before its reply, so the numbers include
SQLite. Prints a table; nothing is asserted. Not a test.
"""
import argparse
import json
import multiprocessing as mp
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from typing import Dict, List, Sequence, Tuple

import msgpack
import zmq

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "python"))

from fmx import Client  # noqa: E402

CHEAP_TOOLS = "read_module_source,get_weight_info"
CHEAP_TASK = "qwen2/Qwen2DecoderLayer"
VERIFY_TASK = "qwen2/Qwen2DecoderLayer"
READS = [("read_module_source", {}), ("get_weight_info", {}), ("trace_ops", {}),
         ("capture_intermediate", {"probe": 0})]


def reference(task: Dict) -> Tuple[str, str]:
    solutions = ROOT / "examples" / "solutions"
    entries = json.loads((solutions / f"{task['pack']}.entries.json").read_text())
    return (solutions / f"{task['pack']}.py").read_text(), entries[task["class"]]


def wait_until(t: float) -> None:
    while time.time() < t:
        time.sleep(min(0.01, max(0.0, t - time.time())))


def percentile(xs: Sequence[float], q: float) -> float:
    if not xs:
        return float("nan")
    s = sorted(xs)
    return s[min(len(s) - 1, int(q * len(s)))]


# ---- workers (each in its own process) ----

def cheap_worker(addr: str, tools: str, window: int, start: float, seconds: float
                 ) -> Tuple[int, List[float]]:
    """Keeps `window` episodes with one cheap step in flight each until start + seconds,
    cycling through `tools` (comma-separated)."""
    actions = [{"tool": t, "args": {}} for t in tools.split(",")]
    with Client(addr, timeout=60) as c:
        episodes = [ep for ep, _, _ in c.reset_many([CHEAP_TASK] * window, policy="bench")]
        wait_until(start)
        end = start + seconds
        sent: Dict[int, float] = {}
        k = 0
        for ep in episodes:
            sent[ep] = time.perf_counter()
            c.send([actions[k % len(actions)]], [ep])
            k += 1
        lat: List[float] = []
        while True:
            for ep, result in c.recv():
                now = time.perf_counter()
                if isinstance(result, Exception):
                    raise result
                lat.append(now - sent.pop(ep))
                if time.time() < end:
                    sent[ep] = time.perf_counter()
                    c.send([actions[k % len(actions)]], [ep])
                    k += 1
            if not c.pending:
                break
        for ep in episodes:
            c.close(ep)
    return len(lat), lat


def verify_worker(addr: str, start: float, seconds: float) -> List[float]:
    """verify_component of the reference solution, back to back, until start + seconds."""
    with Client(addr, timeout=120) as c:
        task = next(t for t in c.list_tasks() if t["id"] == VERIFY_TASK)
        code, entry = reference(task)
        c.reset(task=VERIFY_TASK, policy="bench-verify")
        action = {"tool": "verify_component", "args": {"code": code, "entry": entry}}
        wait_until(start)
        lat = []
        while time.time() < start + seconds:
            t0 = time.perf_counter()
            obs = c.step(action)[0]
            lat.append(time.perf_counter() - t0)
            assert obs["data"]["status"] == "match", obs["text"]
        c.close()
    return lat


def oracle_worker(addr: str, offset: int, start: float, seconds: float) -> int:
    """Oracle episodes over every task, round robin, until start + seconds."""
    with Client(addr, timeout=120) as c:
        tasks = c.list_tasks()
        refs = {t["id"]: reference(t) for t in tasks}
        wait_until(start)
        n = offset
        done = 0
        while time.time() < start + seconds:
            task = tasks[n % len(tasks)]
            n += 1
            code, entry = refs[task["id"]]
            c.reset(task=task["id"], policy="bench-oracle")
            for tool, args in READS:
                c.step({"tool": tool, "args": args})
            c.step({"tool": "verify_component", "args": {"code": code, "entry": entry}})
            obs, reward, terminated, truncated, info = c.step(
                {"tool": "submit", "args": {"code": code, "entry": entry}})
            assert terminated and info["grade"]["correctness"] == 1.0, obs["text"]
            done += 1
    return done


def raw_worker(addr: str, tools: str, window: int, is_fmx: bool, start: float,
               seconds: float) -> int:
    """A bare DEALER: `window` cheap steps in flight (a slot each; its req id is
    its slot), each reply answered by the next step of that slot, until start +
    seconds; the same messages against fmx and against the echo floor. On fmx
    the episodes are opened first, on this socket (an episode answers only the
    connection that opened it)."""
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(addr)
    episodes = list(range(1, window + 1))
    if is_fmx:
        for i in range(window):
            sock.send(msgpack.packb({"op": "reset", "req": i, "task": CHEAP_TASK,
                                     "policy": "bench-raw"}, use_bin_type=True))
        for _ in range(window):
            reply = msgpack.unpackb(sock.recv(), raw=False)
            episodes[reply["req"]] = int(reply["episode"])
    names = tools.split(",")
    payloads = [msgpack.packb({"op": "step", "req": i, "episode": ep,
                               "action": {"tool": names[i % len(names)], "args": {}}},
                              use_bin_type=True) for i, ep in enumerate(episodes)]
    n = 0
    try:
        wait_until(start)
        end = start + seconds
        for p in payloads:
            sock.send(p, copy=False)
        inflight = len(payloads)
        while inflight:
            if not sock.poll(30000):
                raise RuntimeError(f"{addr}: no reply in 30 s")
            reply = msgpack.unpackb(sock.recv(copy=False), raw=False)
            inflight -= 1
            if is_fmx and "error" in reply:
                raise RuntimeError(f"fmx refused a step: {reply}")
            n += 1
            if time.time() < end:
                sock.send(payloads[reply["req"]], copy=False)
                inflight += 1
    finally:
        sock.close()
        ctx.term()
    return n


def run_raw(pool_ctx, addr: str, clients: int, tools: str, window: int, is_fmx: bool,
            seconds: float) -> float:
    start = time.time() + 1.5
    with pool_ctx.Pool(clients) as pool:
        done = pool.starmap(raw_worker, [(addr, tools, window, is_fmx, start, seconds)] * clients)
    return sum(done) / seconds


# ---- the measurements ----

def run_cheap(pool_ctx, addr: str, tools: str, clients: int, window: int, seconds: float
              ) -> Dict:
    start = time.time() + 1.0 + 0.05 * clients
    with pool_ctx.Pool(clients) as pool:
        res = pool.starmap(cheap_worker, [(addr, tools, window, start, seconds)] * clients)
    lat = [x for _, ls in res for x in ls]
    return {"steps_s": sum(n for n, _ in res) / seconds, "p50": percentile(lat, 0.5),
            "p99": percentile(lat, 0.99), "n": len(lat)}


def run_verify(pool_ctx, addr: str, tools: str, load_clients: int, window: int, seconds: float
               ) -> Dict:
    start = time.time() + 1.0 + 0.05 * load_clients
    with pool_ctx.Pool(load_clients + 1) as pool:
        load = [pool.apply_async(cheap_worker, (addr, tools, window, start, seconds))
                for _ in range(load_clients)]
        lat = pool.apply(verify_worker, (addr, start, seconds))
        cheap = [r.get() for r in load]
    out = {"p50": percentile(lat, 0.5), "p99": percentile(lat, 0.99), "n": len(lat)}
    if load_clients:
        out["cheap_steps_s"] = sum(n for n, _ in cheap) / seconds
    return out


def run_oracle(pool_ctx, addr: str, clients: int, seconds: float) -> float:
    start = time.time() + 1.0
    with pool_ctx.Pool(clients) as pool:
        done = pool.starmap(oracle_worker, [(addr, 7 * i, start, seconds) for i in range(clients)])
    return sum(done) / seconds


def db_bytes(db: pathlib.Path) -> int:
    """Bytes the log's pages in use hold, committed write-ahead log included."""
    import sqlite3
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
        size, pages, free = (conn.execute(f"PRAGMA {p}").fetchone()[0]
                             for p in ("page_size", "page_count", "freelist_count"))
    return size * (pages - free)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--fmx", default=os.environ.get("FMX_BIN", str(ROOT / "build" / "fmx")))
    ap.add_argument("--packs", help="a folder of packs (default: export the examples)")
    ap.add_argument("--seconds", type=float, default=3.0, help="length of each measurement")
    ap.add_argument("--window", type=int, default=8,
                    help="episodes per client, each with one step in flight")
    ap.add_argument("--tools", default=CHEAP_TOOLS,
                    help="the cheap tools, comma-separated, called in turn with default args")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                    help="server worker threads")
    args = ap.parse_args()

    tmp = pathlib.Path(tempfile.mkdtemp(prefix="fmx-bench-"))
    server = None
    try:
        packs = pathlib.Path(args.packs) if args.packs else tmp / "packs"
        if not args.packs:
            for ex in ("qwen2", "gpt2"):
                subprocess.run([args.fmx, "export", f"examples/models/{ex}.py:build", "-o",
                                packs / ex, "--quiet"], cwd=ROOT, check=True)
        addr = f"ipc://{tmp}/s.sock"
        server = subprocess.Popen([args.fmx, "serve", "--tasks", packs, "--db", tmp / "bench.db",
                                   "--bind", addr, "--max-steps", "1000000", "--threads",
                                   str(args.threads)], stderr=subprocess.DEVNULL)
        with Client(addr, timeout=60) as c:
            hello = c.hello()
        ctx = mp.get_context("fork")
        print(f"fmx serve: {hello['server']}, {hello['engine']}, {os.cpu_count()} CPUs, "
              f"{args.threads} worker threads; {args.seconds:g} s per measurement, "
              f"{args.window} episodes in flight per client; cheap steps: "
              f"{', '.join(args.tools.split(','))} in turn")
        print()
        print(f"{'measurement':44s} {'clients':>7s} {'rate':>12s} {'p50 ms':>8s} {'p99 ms':>8s}")

        def row(name: str, clients: int, rate: str, p50: float, p99: float) -> None:
            print(f"{name:44s} {clients:7d} {rate:>12s} {p50 * 1e3:8.3f} {p99 * 1e3:8.3f}",
                  flush=True)

        for n in (1, 4, 16):
            r = run_cheap(ctx, addr, args.tools, n, args.window, args.seconds)
            row("cheap steps", n, f"{r['steps_s']:,.0f}/s",
                r["p50"], r["p99"])
        for load in (0, 4):
            r = run_verify(ctx, addr, args.tools, load, args.window, args.seconds)
            name = "verify_component " + ("alone" if not load else
                                          f"+ 4 cheap clients ({r['cheap_steps_s']:,.0f}/s)")
            row(name, 1, f"{r['n'] / args.seconds:,.1f}/s", r["p50"], r["p99"])
        for n in (1, 4):
            rate = run_oracle(ctx, addr, n, args.seconds)
            print(f"{'oracle episodes (6 steps, verify + submit)':44s} {n:7d} "
                  f"{f'{rate:,.1f}/s':>12s}", flush=True)
        echo_bin = pathlib.Path(args.fmx).resolve().parent / "bench" / "bench_echo"
        if echo_bin.exists():
            echo_addr = f"ipc://{tmp}/echo.sock"
            echo = subprocess.Popen([echo_bin, echo_addr])
            try:
                print()
                for n in (1, 4):
                    floor = run_raw(ctx, echo_addr, n, args.tools, args.window, False,
                                    args.seconds)
                    size0 = db_bytes(tmp / "bench.db")
                    got = run_raw(ctx, addr, n, args.tools, args.window, True, args.seconds)
                    grown = db_bytes(tmp / "bench.db") - size0
                    print(f"raw DEALER clients, cheap steps: {n} client(s): echo floor "
                          f"{floor:,.0f}/s, fmx {got:,.0f}/s = {got / floor:.2f} of the floor; "
                          f"log +{grown / max(1, got * args.seconds):,.0f} bytes/step", flush=True)
            finally:
                echo.send_signal(signal.SIGTERM)
                echo.wait(timeout=10)
        else:
            print(f"(no {echo_bin}: build bench_echo for the transport floor)")
    finally:
        if server is not None and server.poll() is None:
            server.send_signal(signal.SIGTERM)
            server.wait(timeout=60)
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
