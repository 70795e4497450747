"""`fmx serve` shares its workers fairly: black-box, through the Python client
on a real server over an ipc:// socket.

The attack this guards against: clients that keep the evaluation queue full
of candidates that never finish (each runs to the evaluation timeout). When
jobs were served in arrival order, every other client's verify waited for
all of them: about (jobs queued) × timeout ÷ workers, unbounded in the
number of greedy episodes (measured before the scheduler, 2 workers, 5 s
timeout: 8-12 s behind 6 greedy episodes, 21-24 s behind 12). The server now
hands a free worker to the waiting client that has used the least worker
time (docs/protocol.md, "Evaluations run in worker processes"), so a client
with one verify waits for the next worker that frees up, about one
evaluation time at most, however many greedy clients and episodes there are.
"""
import os
import pathlib
import signal
import subprocess
import tempfile
import threading
import time

import pytest

from fmx import Client, FmxError

ROOT = pathlib.Path(__file__).resolve().parents[2]
FMX = os.environ.get("FMX_BIN", str(ROOT / "build" / "fmx"))
SOLUTIONS = ROOT / "examples" / "solutions"
EVAL_TIMEOUT_S = 2
WORKERS = 2
TASK = "qwen2/Qwen2MLP"
HANG = ("import torch\nfrom torch import Tensor\nfrom typing import Dict\n\n"
        "def forward(weights: Dict[str, Tensor]) -> Tensor:\n"
        "    x = torch.zeros(1)\n"
        "    for i in range(1 << 40):\n"
        "        x = x + 1.0\n"
        "    return x\n")
HANG_STEP = {"tool": "verify_component", "args": {"code": HANG}}
# Greedy clients: one with many episodes, and several with one each; every
# episode keeps two endless verifies queued (one waits behind the other), so
# 20 evaluations, 40 s of worker time, are always ahead of a newcomer: served
# in arrival order, a verify would wait ~20 s.
GREEDY_EPISODES = [6, 1, 1, 1, 1]
IN_FLIGHT = 2
# A victim's verify may wait for the next worker to free up (one evaluation
# time) and then run (~0.1 s idle); the rest is slack for a loaded 2-core
# machine, where the endless loops keep both cores busy.
VICTIM_BOUND_S = EVAL_TIMEOUT_S + 2.5
CHEAP_BOUND_S = 1.5


@pytest.fixture(scope="module")
def packs(example_packs):
    return example_packs.tasks("qwen2")


def deadline_poll(what, check, timeout):
    """Polls check() until it returns a true value (returned) or timeout seconds pass."""
    end = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        assert time.monotonic() < end, f"timed out waiting for {what}"
        time.sleep(0.05)


def greedy(addr, episodes, stop, served, errors):
    """Keeps IN_FLIGHT endless verifies queued on each of its episodes until stop."""
    try:
        with Client(addr, timeout=120) as c:
            eps = [ep for ep, _, _ in c.reset_many([TASK] * episodes)]
            for _ in range(IN_FLIGHT):
                c.send([HANG_STEP] * len(eps), eps)
            while not stop.is_set():
                try:
                    results = c.recv(timeout=0.5)
                except FmxError:  # nothing answered within 0.5 s
                    continue
                for ep, result in results:
                    if isinstance(result, FmxError):
                        errors.append(f"greedy {ep}: {result}")
                        continue
                    served.append(result[0].get("error"))
                    c.send([HANG_STEP], [ep])
    except Exception as e:  # reported by the test
        errors.append(f"greedy client: {e!r}")


def test_greedy_clients_do_not_delay_another_clients_verify(packs):
    tmp = pathlib.Path(tempfile.mkdtemp(prefix="fmx-fair-"))
    addr = f"ipc://{tmp}/s.sock"
    proc = subprocess.Popen([FMX, "serve", "--tasks", packs, "--db", tmp / "fmx.db", "--bind",
                             addr, "--workers", str(WORKERS), "--eval-timeout",
                             str(EVAL_TIMEOUT_S)],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    stop = threading.Event()
    threads, served, errors = [], [], []
    code = (SOLUTIONS / "qwen2.py").read_text()
    verify = {"tool": "verify_component", "args": {"code": code, "entry": "mlp"}}
    try:
        with Client(addr, timeout=60) as victim:
            assert victim.hello()["protocol"] == 1
            victim.reset(task=TASK)
            for n, k in enumerate(GREEDY_EPISODES):
                served.append([])
                threads.append(threading.Thread(target=greedy, daemon=True,
                                                args=(addr, k, stop, served[n], errors)))
                threads[-1].start()
            # one evaluation per episode is a job (the next waits behind it):
            # all but WORKERS of them wait for a worker
            waiting = sum(GREEDY_EPISODES) - WORKERS

            def saturated():
                h = victim.health()
                return h["workers"]["busy"] == WORKERS and h["jobs_waiting"] >= waiting

            deadline_poll("every greedy evaluation to be queued", saturated, 60)
            # Until each greedy client has had a turn it is, to the server, a
            # client like the victim that has used nothing yet and came first.
            deadline_poll("every greedy client to be served", lambda: all(served), 60)
            deadline_poll("the queue to be full", saturated, 10)
            latencies, cheap = [], []
            for _ in range(3):
                t0 = time.monotonic()
                victim.step({"tool": "read_module_source", "args": {}})
                cheap.append(time.monotonic() - t0)
                t0 = time.monotonic()
                obs = victim.step(verify)[0]
                latencies.append(time.monotonic() - t0)
                assert obs["data"]["status"] == "match", obs["text"][:500]
                assert victim.health()["jobs_waiting"] >= waiting - 2  # still saturated
            print(f"victim verify latencies {[round(x, 2) for x in latencies]} s, "
                  f"cheap steps {[round(x, 3) for x in cheap]} s")
            assert max(latencies) <= VICTIM_BOUND_S, latencies
            assert max(cheap) <= CHEAP_BOUND_S, cheap  # cheap tools never wait for workers
            assert not errors, errors
            assert {e for s in served for e in s} == {"timeout"}
        stop.set()
        for t in threads:
            t.join(timeout=10)
        # evaluations still waiting for a worker are answered, not run
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=40)
        assert proc.returncode == 0, err
    finally:
        stop.set()
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
