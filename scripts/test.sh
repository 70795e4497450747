#!/usr/bin/env bash
# test.sh — every fmx test: installs what is missing and builds (setup.sh),
# then the C unit tests (CTest) and the Python tests (pytest, with Debian's
# /usr/bin/python3). Exits non-zero if any test fails.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
build=${FMX_BUILD_DIR:-build}

status=0
echo "== C unit tests (ctest)"
ctest --test-dir "$build" --output-on-failure </dev/null || status=1

echo "== Python tests (pytest)"
FMX_BIN="$PWD/$build/fmx" PYTHONPATH="$PWD/python" \
  /usr/bin/python3 -m pytest -q -p no:cacheprovider tests/python </dev/null || status=1
exit $status
