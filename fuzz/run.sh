#!/usr/bin/env bash
# run.sh — builds fuzz/fuzz_proto.c with clang (-fsanitize=fuzzer,address,
# undefined) and runs it for a bounded time; exits non-zero on any crash,
# sanitizer report, leak or invariant failure (the reproducer is kept and
# named at the end).
#
# Two targets from the one source:
#   fuzz_proto    validate + decode + re-encode (env/proto.c, cJSON, msgpack-c:
#                 no libtorch), most of the time;
#   fuzz_episode  the same, then reset/step dispatch, fmx_episode_plan and the
#                 cheap tools on a real pack (tasks, pack, tools, episode,
#                 verify, reward: instrumented; the libtorch bridge is linked
#                 uninstrumented from the regular build, FMX_BUILD_DIR).
#                 Skipped, with a note, when that build has no bridge.
#
#   fuzz/run.sh                  (after scripts/setup.sh; needs clang and
#                                 libclang-rt-14-dev: apt-get install clang
#                                 libclang-rt-14-dev)
#   FUZZ_SECONDS=60              total run time, split between the targets
#   FMX_BUILD_DIR=build          the regular build (its fmx exports the pack)
#   FMX_FUZZ_TASKS=DIR           packs for fuzz_episode (default: qwen2, exported)
#   FMX_FUZZ_DIR=build/fuzz      where the binaries, the grown corpus and
#                                crash reproducers go
set -uo pipefail
cd "$(dirname "$0")/.."
seconds=${FUZZ_SECONDS:-60}
build=${FMX_BUILD_DIR:-build}
out=${FMX_FUZZ_DIR:-$build/fuzz}
mkdir -p "$out"
CC=${CC_FUZZ:-clang}
CXX=${CXX_FUZZ:-clang++}
if ! command -v "$CC" >/dev/null; then
  echo "fuzz: $CC not found (apt-get install clang libclang-rt-14-dev)" >&2
  exit 2
fi

flags=(-g -O1 -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=undefined
  -fno-omit-frame-pointer -std=c11 -I. -Ienv -Ienv/engine)
libs=(-lcjson -lmsgpackc -lm)

# ---- build ----
if ! "$CC" "${flags[@]}" fuzz/fuzz_proto.c env/proto.c env/status.c "${libs[@]}" \
  -o "$out/fuzz_proto" 2>"$out/build.log"; then
  cat "$out/build.log" >&2
  echo "fuzz: building fuzz_proto failed" >&2
  exit 2
fi

episode=1
engine="$build/env/engine/libfmx_engine.a"
link="$build/CMakeFiles/fmx.dir/link.txt"
if [ ! -f "$engine" ] || [ ! -f "$link" ]; then
  echo "fuzz: no $engine (run scripts/setup.sh first): fuzz_episode skipped" >&2
  episode=0
fi
if ((episode)); then
  # libtorch's link line as the regular build has it (Debian's or a wheel's)
  read -r -a torch_libs < <(tr -d '"' <"$link" | tr ' ' '\n' | sed -n '/libfmx_engine\.a$/,$p' | sed 1d |
    grep -E 'torch|c10|protobuf|glog|gflags|cuda|cudart|nvrtc|-Wl,|pthread' | tr '\n' ' ')
  srcs=(env/status.c env/pack.c env/verify.c env/evaluator.c env/pyexec.c env/proto.c env/tasks.c
    env/optrace.c env/tools.c env/episode.c rewards/reward.c)
  objs=()
  for s in fuzz/fuzz_proto.c "${srcs[@]}"; do
    o="$out/$(basename "${s%.c}").episode.o"
    # evaluations run in the evaluation process (env/evaluator.c): its engine library
    if ! "$CC" "${flags[@]}" -DFMX_FUZZ_EPISODE -DFMX_SOURCE_DIR="\"$PWD\"" \
      -DFMX_EVAL_SO="\"$(dirname "$engine")/libfmx_eval.so\"" -c "$s" -o "$o" 2>>"$out/build.log"; then
      cat "$out/build.log" >&2
      echo "fuzz: compiling $s failed" >&2
      exit 2
    fi
    objs+=("$o")
  done
  if ! "$CXX" -fsanitize=fuzzer,address,undefined "${objs[@]}" "$engine" "${torch_libs[@]}" \
    "${libs[@]}" -lseccomp -lcrypto -ldl -lpthread -o "$out/fuzz_episode" 2>>"$out/build.log"; then
    cat "$out/build.log" >&2
    echo "fuzz: linking fuzz_episode failed" >&2
    exit 2
  fi
  tasks=${FMX_FUZZ_TASKS:-}
  if [ -z "$tasks" ]; then
    tasks="$out/tasks"
    if [ ! -f "$tasks/qwen2/task.json" ] &&
      ! "$build/fmx" export examples/models/qwen2.py:build -o "$tasks/qwen2" --force --quiet; then
      echo "fuzz: exporting the qwen2 pack failed" >&2
      exit 2
    fi
  fi
fi

# ---- run ----
# Leaks and UBSan reports are failures; libtorch keeps singletons alive on
# purpose, which LeakSanitizer does not count (they stay reachable).
export ASAN_OPTIONS=${ASAN_OPTIONS:-detect_leaks=1:allocator_may_return_null=1}
export UBSAN_OPTIONS=${UBSAN_OPTIONS:-print_stacktrace=1:halt_on_error=1}
status=0
run() { # name seconds
  local name=$1 secs=$2
  local corpus="$out/corpus-$name"
  mkdir -p "$corpus" "$out/crashes"
  echo "fuzz: $name for ${secs} s"
  (
    [ "$name" != fuzz_episode ] || export FMX_FUZZ_TASKS="$tasks"
    "$out/$name" -max_total_time="$secs" -timeout=10 -rss_limit_mb=4096 -max_len=65536 \
      -dict=fuzz/proto.dict -print_final_stats=1 -artifact_prefix="$out/crashes/$name-" \
      "$corpus" fuzz/corpus
  ) >"$out/$name.log" 2>&1
  local rc=$?
  grep -E '^stat::(number_of_executed_units|average_exec_per_sec|peak_rss_mb)|^#[0-9]+ +DONE' \
    "$out/$name.log" | sed "s/^/  /"
  grep -E 'cov: [0-9]+ ft: [0-9]+' "$out/$name.log" | tail -1 | sed "s/^/  last: /"
  if ((rc != 0)); then
    status=1
    grep -E 'ERROR|SUMMARY|invariant|runtime error|Test unit written' "$out/$name.log" | head -20 >&2
    echo "fuzz: $name FAILED (exit $rc); log $out/$name.log" >&2
  fi
}
if ((episode)); then
  run fuzz_proto $(((seconds + 1) / 2))
  run fuzz_episode $((seconds / 2))
else
  run fuzz_proto "$seconds"
fi
((status == 0)) && echo "fuzz: no crash"
exit $status
