#!/usr/bin/env bash
# test.sh — every fmx test: installs what is missing and builds (setup.sh),
# then the C unit tests (CTest), the Python tests (pytest, with Debian's
# /usr/bin/python3) and the sanitizer run (scripts/sanitize.sh: the C code
# and a whole served episode under ASan + UBSan + LeakSanitizer, in
# build-asan/; FMX_SKIP_SANITIZE=1 leaves it out) and a bounded libFuzzer
# run (fuzz/run.sh; FMX_SKIP_FUZZ=1 leaves it out). Exits non-zero if any
# test fails.
set -euo pipefail
cd "$(dirname "$0")/.."

# each stage's wall time, printed at the end (and as each stage ends)
timings=()
stage_start=$SECONDS
stage_done() { # NAME STATUS
  local took=$((SECONDS - stage_start))
  timings+=("$(printf '%-12s %4d s  %s' "$1" "$took" "$2")")
  echo "-- $1: $2 in ${took} s"
  stage_start=$SECONDS
}
trap 'echo "== stage times"; printf "  %s\n" "${timings[@]}"; echo "  total        $SECONDS s"' EXIT

scripts/setup.sh
stage_done setup ok
build=${FMX_BUILD_DIR:-build}
case "$build" in /*) ;; *) build="$PWD/$build" ;; esac

status=0
run_stage() { # NAME COMMAND...: runs it, records its time and outcome
  local name=$1
  shift
  if "$@" </dev/null; then
    stage_done "$name" ok
  else
    stage_done "$name" FAILED
    status=1
  fi
}

echo "== C unit tests (ctest)"
run_stage ctest ctest --test-dir "$build" --output-on-failure

echo "== Python tests (pytest)"
run_stage pytest env FMX_BIN="$build/fmx" PYTHONPATH="$PWD/python" \
  /usr/bin/python3 -m pytest -q -p no:cacheprovider --durations=15 -n 2 --dist loadfile tests/python

# ---- sanitizers: a second build of the C code (the libtorch bridge is
# reused from $build), its unit tests and one served episode ----
if [ "${FMX_SKIP_SANITIZE:-0}" != 1 ]; then
  echo "== Sanitizers (scripts/sanitize.sh)"
  run_stage sanitizers env FMX_BUILD_DIR="$build" scripts/sanitize.sh
fi
# ---- protocol fuzzing: libFuzzer over msgpack validate/decode and step
# dispatch, for a bounded time (FUZZ_SECONDS, default 60); any crash fails ----
if [ "${FMX_SKIP_FUZZ:-0}" != 1 ]; then
  echo "== Fuzzing (fuzz/run.sh, ${FUZZ_SECONDS:-60} s)"
  run_stage fuzz env FMX_BUILD_DIR="$build" fuzz/run.sh
fi
exit $status
