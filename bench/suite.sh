#!/usr/bin/env bash
# suite.sh — fmx on real transformers architectures: every config of
# examples/suite (one small config per model type) exported with random
# sensitive weights, its whole model written by the tracer, verified on every
# probe (bfloat16 and hidden ones included) and run in plain Python; prints the
# Markdown table of the README (export, trace, verify, run, traced LOC, seconds
# per model type) and the share that passed every step. Needs transformers:
# ../shared/pydeps is used when it exists (FMX_PYDEPS to name another folder).
# Numbers only; never a test (tests/python/test_suite.py is the test).
#
#   bench/suite.sh [--only llama,bert] [--jobs N]   # uses build/fmx (FMX_BIN or FMX_BUILD_DIR to change)
set -euo pipefail
cd "$(dirname "$0")/.."
fmx=${FMX_BIN:-${FMX_BUILD_DIR:-build}/fmx}
fmx=$(realpath "$fmx")
pydeps=${FMX_PYDEPS:-../shared/pydeps}
[ -d "$pydeps" ] && export FMX_PYDEPS=$(realpath "$pydeps")
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
start=$(date +%s)
FMX_BIN=$fmx "$fmx" suite -o "$tmp/packs" --check --jobs 1 --quiet "$@" || true  # one at a time: the seconds are each its own
echo
echo "($(python3 -c 'import platform; print(platform.processor() or platform.machine())'), $(nproc) cores," \
  "torch $(/usr/bin/python3 -c 'import torch; print(torch.__version__)')," \
  "$(( $(date +%s) - start )) s in all)"
