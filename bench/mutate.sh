#!/usr/bin/env bash
# mutate.sh — `fmx mutate` on the example packs: the mutation score and what it
# costs. Exports each example (with its shipped equivalent list) into a
# temporary folder, runs `fmx mutate --json` on the whole model, and prints per
# example: mutants, verdicts, score, wall time, generator time, and the median
# and max time to compile + verify one mutant on every probe. Numbers only;
# never a test.
#
#   bench/mutate.sh              # uses build/fmx (FMX_BIN or FMX_BUILD_DIR to change)
set -euo pipefail
cd "$(dirname "$0")/.."
fmx=${FMX_BIN:-${FMX_BUILD_DIR:-build}/fmx}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

printf '%-6s %7s %6s %8s %6s %7s %7s %8s %8s %9s %9s\n' example mutants killed survived equiv invalid \
  score wall_s gen_ms median_ms max_ms
for ex in qwen2 gpt2; do
  "$fmx" export "examples/models/$ex.py:build" -o "$tmp/$ex" --quiet \
    --equivalent "examples/solutions/$ex.equivalent.json"
  start=$(date +%s.%N)
  rc=0
  "$fmx" mutate "$tmp/$ex" "examples/solutions/$ex.py" --json >"$tmp/$ex.json" || rc=$?
  end=$(date +%s.%N)
  [ $rc -le 1 ] || { echo "fmx mutate failed on $ex (exit $rc)" >&2; exit 2; }
  /usr/bin/python3 - "$ex" "$tmp/$ex.json" "$start" "$end" <<'PY'
import json, statistics, sys
ex, path, start, end = sys.argv[1], sys.argv[2], float(sys.argv[3]), float(sys.argv[4])
r = json.load(open(path))
n = r["summary"]
ms = [m["ms"] for m in r["mutants"]]
score = f"{100 * n['score']:.1f}%" if n["score"] is not None else "n/a"
print(f"{ex:<6} {n['mutants']:>7} {n['killed']:>6} {n['survived']:>8} {n['equivalent']:>6} {n['invalid']:>7} "
      f"{score:>7} {end - start:>8.2f} {r['generator_ms']:>8.0f} {statistics.median(ms):>9.1f} {max(ms):>9.1f}")
for m in r["mutants"]:
    if m["verdict"] == "survived":
        print(f"       survived {m['id']} {m['operator']} L{m['line']}: {m['before']} -> {m['after']}")
PY
done
echo "($(nproc) cpus; $("$fmx" version))"
