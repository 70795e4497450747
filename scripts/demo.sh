#!/usr/bin/env bash
# demo.sh — fmx's main job on the embedded examples: set up (install + build),
# export the Qwen2-style and GPT-2-style example packs, then verify each
# reference solution against its pack: the whole model on every probe with
# layer taps, then every component class on its first instance.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
fmx=${FMX_BUILD_DIR:-build}/fmx
mkdir -p packs

for ex in qwen2 gpt2; do
  echo
  echo "== export examples/models/$ex.py -> packs/$ex"
  "$fmx" export "examples/models/$ex.py:build" -o "packs/$ex" --force
done

status=0
for ex in qwen2 gpt2; do
  echo
  echo "== verify examples/solutions/$ex.py against packs/$ex (whole model, all probes)"
  "$fmx" verify "packs/$ex" "examples/solutions/$ex.py" --probes all || status=1
done

echo
echo "== components (first instance of every module class, all probes)"
printf '%-6s %-36s %-26s %-14s %s\n' pack component class entry result
for ex in qwen2 gpt2; do
  # class -> entry pairs, then the first module path of each class.
  while read -r cls entry; do
    path=$("$fmx" info "packs/$ex" --json | /usr/bin/python3 -c '
import json, sys
cls = sys.argv[1]
print(next((m["path"] for m in json.load(sys.stdin)["modules"] if m["class"] == cls), "?"))' "$cls")
    if out=$("$fmx" verify "packs/$ex" "examples/solutions/$ex.py" --component "$path" \
          --entry "$entry" --probes all 2>&1 | tail -1); then :; else status=1; fi
    printf '%-6s %-36s %-26s %-14s %s\n' "$ex" "${path:-(root)}" "$cls" "$entry" "$out"
  done < <(/usr/bin/python3 -c '
import json, sys
for c, e in json.load(open(sys.argv[1])).items(): print(c, e)' "examples/solutions/$ex.entries.json")
done
echo
[ $status -eq 0 ] && echo "all reference solutions match their packs" || echo "some verifications FAILED"
exit $status
