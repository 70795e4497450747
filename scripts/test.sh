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
scripts/setup.sh
build=${FMX_BUILD_DIR:-build}
case "$build" in /*) ;; *) build="$PWD/$build" ;; esac

status=0
echo "== C unit tests (ctest)"
ctest --test-dir "$build" --output-on-failure </dev/null || status=1

echo "== Python tests (pytest)"
FMX_BIN="$build/fmx" PYTHONPATH="$PWD/python" \
  /usr/bin/python3 -m pytest -q -p no:cacheprovider tests/python </dev/null || status=1

# ---- sanitizers: a second build of the C code (the libtorch bridge is
# reused from $build), its unit tests and one served episode ----
if [ "${FMX_SKIP_SANITIZE:-0}" != 1 ]; then
  echo "== Sanitizers (scripts/sanitize.sh)"
  FMX_BUILD_DIR="$build" scripts/sanitize.sh </dev/null || status=1
fi
# ---- protocol fuzzing: libFuzzer over msgpack validate/decode and step
# dispatch, for a bounded time (FUZZ_SECONDS, default 60); any crash fails ----
if [ "${FMX_SKIP_FUZZ:-0}" != 1 ]; then
  echo "== Fuzzing (fuzz/run.sh, ${FUZZ_SECONDS:-60} s)"
  FMX_BUILD_DIR="$build" fuzz/run.sh </dev/null || status=1
fi
exit $status
