#!/usr/bin/env bash
# tracer.sh — the tracer policy on the example packs: what it writes and what
# it costs. Exports each example into a temporary folder, then per example the
# median wall time of `fmx trace` (no server; most of it is importing torch)
# over 5 runs; then one `fmx run --policy oracle,tracer` over every task (its
# own server): episodes/s, the policy rows and the whole-model rows of the
# leaderboard (LOC as the reward counts it, the oracle's being the reference
# solution's). Numbers only; never a test.
#
#   bench/tracer.sh              # uses build/fmx (FMX_BIN or FMX_BUILD_DIR to change)
set -euo pipefail
cd "$(dirname "$0")/.."
fmx=${FMX_BIN:-${FMX_BUILD_DIR:-build}/fmx}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

printf '%-6s %14s\n' example trace_ms_p50
for ex in qwen2 gpt2; do
  "$fmx" export "examples/models/$ex.py:build" -o "$tmp/packs/$ex" --quiet
  times=()
  for _ in 1 2 3 4 5; do
    start=$(date +%s%N)
    "$fmx" trace "$tmp/packs/$ex" -o "$tmp/$ex.py"
    times+=($(( ($(date +%s%N) - start) / 1000000 )))
  done
  printf '%-6s %14s\n' "$ex" "$(printf '%s\n' "${times[@]}" | sort -n | sed -n 3p)"
done
echo
"$fmx" run --policy oracle,tracer --tasks "$tmp/packs" --db "$tmp/fmx.db" --jobs 2 |
  grep -E 'episodes in|^rank|^[0-9]+ |^task|^(qwen2|gpt2) '
