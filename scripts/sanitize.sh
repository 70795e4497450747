#!/usr/bin/env bash
# sanitize.sh — fmx's C code under AddressSanitizer + UBSan (+ LeakSanitizer):
#   1. builds the C core, `fmx` and the C unit tests with -DFMX_SANITIZE=ON
#      into build-asan/;
#   2. runs every CTest there, leak detection on, any UBSan report fatal;
#   3. runs whole episodes through build-asan/fmx serve with the Python
#      client (an oracle episode calling every tool, verify and submit;
#      adversarial candidates, one that never ends and costs its worker;
#      refused actions; a malformed message; an episode left open),
#      stops it with SIGTERM and fails on any ASan, UBSan or leak report.
# libtorch is not instrumented, and by default neither is the libtorch
# bridge (env/engine, C++): it is linked from the regular build (build/,
# built first if needed), which saves ~2.5 min of compiling on 2 cores.
# FMX_SANITIZE_ENGINE=1 compiles and instruments it too.
#
#   scripts/sanitize.sh          (after scripts/setup.sh)
#   FMX_BUILD_DIR=dir            the regular build to take the bridge from
#   FMX_ASAN_BUILD_DIR=dir       where to build (default build-asan)
set -euo pipefail
cd "$(dirname "$0")/.."
build=${FMX_BUILD_DIR:-build}
asan=${FMX_ASAN_BUILD_DIR:-build-asan}
start=$(date +%s)

# ---- 1. build ----
engine_args=(-DFMX_ENGINE_LIBRARY=)
if [ "${FMX_SANITIZE_ENGINE:-0}" != 1 ] && [ -f "$build/CMakeCache.txt" ]; then
  cmake --build "$build" --target fmx_engine fmx_eval -j"$(nproc)" >/dev/null
  engine_args=(-DFMX_ENGINE_LIBRARY="$(cd "$build" && pwd)/env/engine/libfmx_engine.a")
  # the same libtorch the bridge was compiled against (a CUDA one, say)
  torch_dir=$(sed -n 's/^Torch_DIR:PATH=//p' "$build/CMakeCache.txt")
  [ -z "$torch_dir" ] || engine_args+=(-DTorch_DIR="$torch_dir")
fi
cmake -S . -B "$asan" -DCMAKE_BUILD_TYPE=RelWithDebInfo -DFMX_SANITIZE=ON \
  "${engine_args[@]}" >/dev/null
if ! cmake --build "$asan" -j"$(nproc)" >"$asan/build.log" 2>&1; then
  grep -vE '^\[' "$asan/build.log" | head -60 >&2
  echo "sanitize: build failed (full log: $asan/build.log)" >&2
  exit 2
fi
echo "sanitize: built $asan in $(($(date +%s) - start)) s"

# Any report fails: ASan and LSan exit non-zero, UBSan halts on the first.
# allocator_may_return_null: an allocation over a worker's RLIMIT_AS fails
# with NULL/ENOMEM as it does without ASan (libtorch then throws, and the
# worker reports it) instead of ASan aborting the process.
export ASAN_OPTIONS=detect_leaks=1:exitcode=99:detect_stack_use_after_return=1
ASAN_OPTIONS+=:allocator_may_return_null=1
export UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1:exitcode=98
export LSAN_OPTIONS=exitcode=97

# ---- 2. the C unit tests ----
status=0
ctest --test-dir "$asan" --output-on-failure </dev/null || status=1

# ---- 3. whole episodes through the server ----
dir=$(mktemp -d /tmp/fmx-asan-XXXXXX)
trap 'rm -rf "$dir"' EXIT
packs="$asan/test-packs" # qwen2, exported by ctest's fixture
if [ ! -f "$packs/qwen2/task.json" ]; then
  "$asan/fmx" export examples/models/qwen2.py:build -o "$packs/qwen2" --force --quiet
fi
"$asan/fmx" serve --tasks "$packs" --db "$dir/fmx.db" --bind "ipc://$dir/s.sock" \
  --threads 2 --eval-timeout 5 </dev/null 2>"$dir/serve.log" &
pid=$!
if ! PYTHONPATH="$PWD/python" /usr/bin/python3 - "ipc://$dir/s.sock" <<'EOF'; then
"""Drives the sanitized server through every path an episode takes."""
import json
import pathlib
import sys

import zmq

from fmx import Client

addr = sys.argv[1]
solutions = pathlib.Path("examples/solutions")
code = (solutions / "qwen2.py").read_text()
entries = json.loads((solutions / "qwen2.entries.json").read_text())
head = "import torch\nfrom torch import Tensor\nfrom typing import Dict\n\n"
with Client(addr, timeout=120) as c:
    assert c.hello()["protocol"] == 1 and c.spec()["tools"]
    tasks = {t["id"]: t for t in c.list_tasks()}
    # the oracle on the whole model and on a component: every tool, verify, submit
    for task in ("qwen2", "qwen2/Qwen2DecoderLayer"):
        entry = entries[tasks[task]["class"]]
        c.reset(task=task, policy="asan")
        for tool, args in [("read_module_source", {}), ("read_module_source", {"mode": "live"}),
                           ("get_weight_info", {}), ("trace_ops", {}),
                           ("capture_intermediate", {"probe": 0, "values": True}),
                           ("verify_component", {"code": code, "entry": entry})]:
            obs = c.step({"tool": tool, "args": args})[0]
            assert "error" not in obs, (tool, obs["text"][:500])
        assert obs["data"]["status"] == "match", obs["text"][:2000]
        obs, reward, terminated, _, info = c.step(
            {"tool": "submit", "args": {"code": code, "entry": entry}})
        assert terminated and info["grade"]["correctness"] == 1.0, obs["text"][:2000]
    # adversarial candidates and refused actions, then close
    c.reset(task="qwen2/Qwen2MLP", policy="asan")
    wrong = code.replace("F.silu(", "F.gelu(")
    for cand, want in [(wrong, "mismatch"),
                       (head + "def mlp(x: Tensor) -> Tensor:\n    return x +\n", "error"),
                       (head + "def mlp(x: Tensor) -> Tensor:\n"
                        "    return torch.from_file('/etc/passwd', size=4)\n", "error"),
                       ("import os\n" + code, "error")]:
        obs = c.step({"tool": "verify_component", "args": {"code": cand, "entry": "mlp"}})[0]
        assert obs["data"]["status"] == want, obs["text"][:1000]
    # an endless loop: the worker is killed at the deadline, reaped and replaced
    hang = (head + "def mlp(x: Tensor) -> Tensor:\n    for i in range(1 << 40):\n"
            "        x = x + 1.0\n    return x\n")
    obs = c.step({"tool": "verify_component", "args": {"code": hang, "entry": "mlp"}})[0]
    assert obs.get("error") == "timeout", obs["text"][:1000]
    obs = c.step({"tool": "verify_component", "args": {"code": code, "entry": "mlp"}})[0]
    assert obs["data"]["status"] == "match", obs["text"][:1000]
    for action in [{"tool": "no_such_tool", "args": {}},
                   {"tool": "get_weight_info", "args": {"path": "model.nope"}},
                   {"tool": "capture_intermediate", "args": {"probe": 10 ** 6}},
                   {"tool": "verify_component", "args": {"code": 5}}]:
        assert c.step(action)[0]["error"]
    c.close()
    # a malformed message, then an episode left open for SIGTERM to abort
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(addr)
    sock.send(b"\x81\xa2op\xdb\xff\xff\xff\xf0ab")
    assert sock.poll(60000) and b"bad_message" in sock.recv()
    sock.close()
    c.reset(task="qwen2/Qwen2RMSNorm", policy="asan")
    c.step({"tool": "trace_ops", "args": {}})
print("sanitize: episodes played")
EOF
  status=1
fi
kill -TERM "$pid" 2>/dev/null || true
serve=0
wait "$pid" || serve=$?
if [ "$serve" -ne 0 ] || grep -qE 'Sanitizer|runtime error' "$dir/serve.log"; then
  echo "sanitize: fmx serve under ASan/UBSan: exit status $serve" >&2
  cat "$dir/serve.log" >&2
  status=1
fi
echo "sanitize: done in $(($(date +%s) - start)) s"
exit $status
