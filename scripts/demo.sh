#!/usr/bin/env bash
# demo.sh — fmx's main job on the embedded examples: set up (install +
# build), export the Qwen2-style and GPT-2-style example packs, start the
# environment server on them, play the oracle policy (reads every tool,
# verifies the reference solution, submits it), the tracer policy (writes the
# code from the op traces, no LLM) and the null policy (submits nothing
# useful) on every task, print the leaderboard from the SQLite
# episode log, stop the server. Then the probe strength of each pack. When
# transformers is importable (../shared/pydeps, FMX_PYDEPS), it also exports
# four architectures of the suite (examples/suite) and plays the tracer and null
# policies on their tasks; it says which it used.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
fmx=${FMX_BUILD_DIR:-build}/fmx
db=packs/fmx.db
mkdir -p packs

for ex in qwen2 gpt2; do
  echo "== export examples/models/$ex.py -> packs/$ex"
  equivalent=()
  [ -f "examples/solutions/$ex.equivalent.json" ] &&
    equivalent=(--equivalent "examples/solutions/$ex.equivalent.json")
  "$fmx" export "examples/models/$ex.py:build" -o "packs/$ex" --force --quiet "${equivalent[@]}"
done

# The suite of real transformers architectures (examples/suite), when transformers is
# importable: ../shared/pydeps beside the tree, FMX_PYDEPS, or an installed one.
pydeps=${FMX_PYDEPS:-../shared/pydeps}
[ -d "$pydeps" ] && export FMX_PYDEPS=$(realpath "$pydeps")
suite=(llama gemma2 bert vit)
rm -rf packs/suite
if transformers=$(/usr/bin/python3 -c 'import os, sys
p = os.environ.get("FMX_PYDEPS")
if p: sys.path.append(p)
import transformers
print(transformers.__version__, "from", os.path.dirname(os.path.dirname(transformers.__file__)))' 2>/dev/null); then
  echo "== suite: transformers $transformers: ${suite[*]} -> packs/suite"
  "$fmx" suite -o packs/suite --only "$(IFS=,; echo "${suite[*]}")" --quiet
  used="the embedded examples and the suite (${suite[*]}: real transformers $transformers)"
else
  echo "== suite: skipped: transformers is not importable (no ../shared/pydeps; FMX_PYDEPS names another folder)"
  used="the embedded examples only (no transformers, no suite)"
fi

# A fresh log for this run; the server on a private ipc socket, stopped on exit.
rm -f "$db" "$db-wal" "$db-shm"
tmp=$(mktemp -d)
addr="ipc://$tmp/fmx.sock"
"$fmx" serve --tasks packs --db "$db" --bind "$addr" 2>"$tmp/serve.log" &
server=$!
stop_server() {
  if kill -0 "$server" 2>/dev/null; then
    kill -TERM "$server"
    wait "$server" || { echo "fmx serve did not stop cleanly:" >&2; cat "$tmp/serve.log" >&2; }
  fi
  rm -rf "$tmp"
}
trap stop_server EXIT

echo
echo "== fmx serve --tasks packs --db $db --bind $addr"
PYTHONPATH=python /usr/bin/python3 - "$addr" <<'EOF'
import sys
from fmx import Client

with Client(sys.argv[1], timeout=60) as env:  # waits for the server to come up
    hello = env.hello()
    tasks = env.list_tasks()
print(f"{hello['server']} ({hello['engine']}): {len(tasks)} tasks:",
      ", ".join(t["id"] for t in tasks))
EOF

echo
echo "== fmx run --policy oracle,tracer,null: one episode of each policy on every task"
status=0
"$fmx" run --connect "$addr" --policy oracle,tracer,null --tasks packs --db "$db" || status=$?
stop_server
trap - EXIT

if [ -d packs/suite ]; then
  echo
  echo "== fmx run --policy tracer,null --tasks packs/suite: the suite's tasks (no reference solutions: no oracle)"
  "$fmx" run --policy tracer,null --tasks packs/suite --db "$db" | sed -n '/^rank/,/^$/p' || status=$?
fi

echo
echo "== probe strength: mutants of each reference solution, verified on every probe"
for ex in qwen2 gpt2; do
  # every mutant that is not listed as equivalent must be killed (exit 1 = survivors)
  if out=$("$fmx" mutate "packs/$ex" "examples/solutions/$ex.py"); then :; else status=1; fi
  printf '%-13s %s\n' "$ex" "$(tail -1 <<<"$out")"
  sed -n '/^survivors/,/^$/p' <<<"$out"
  # the decode task's solution (the model with its KV cache), graded per generation step
  equivalent=()
  [ -f "examples/solutions/${ex}_decode.equivalent.json" ] &&
    equivalent=(--equivalent "examples/solutions/${ex}_decode.equivalent.json")
  if out=$("$fmx" mutate "packs/$ex" "examples/solutions/${ex}_decode.py" --decode "${equivalent[@]}"); then :; else status=1; fi
  printf '%-13s %s\n' "$ex/decode" "$(tail -1 <<<"$out")"
  sed -n '/^survivors/,/^$/p' <<<"$out"
done

echo
# how the tracer did, from the log (it writes its own code: no reference involved)
tracer=$(/usr/bin/python3 - "$db" <<'EOF'
import sqlite3, sys
rows = sqlite3.connect(sys.argv[1]).execute(
    "SELECT s.correctness FROM submissions s JOIN episodes e ON e.id = s.episode "
    "JOIN policies p ON p.id = e.policy_id WHERE p.name = 'tracer'").fetchall()
print(f"the tracer passes {sum(c == 1.0 for c, in rows)} of {len(rows)} tasks (it says it cannot write decode tasks)")
EOF
)
if [ $status -eq 0 ]; then
  echo "ran on $used"
  echo "the oracle passes every example task, $tracer, the null policy scores 0; episodes in $db"
else
  echo "demo FAILED (see above)"
fi
exit $status
