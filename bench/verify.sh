#!/usr/bin/env bash
# bench/verify.sh — how fast `fmx verify` is: for each example and for the
# Qwen2-style example at Qwen2.5-0.5B's dimensions, compile ms, verify ms per
# probe, the bare forward of the same compiled code in the same run, their
# ratio, and peak RSS against the bytes of weights (mmapped, not copied).
# Packs are exported into bench-packs/ on first use (the 0.5B one takes about a
# minute and 2.5 GB). FMX_DEVICE=cuda measures on the GPU.
#   bench/verify.sh [--no-large]
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
build=${FMX_BUILD_DIR:-build}
out=bench-packs
mkdir -p "$out"

export_once() { # name spec [args...]
  local name=$1 spec=$2
  shift 2
  [ -f "$out/$name/task.json" ] || "$build/fmx" export "$spec" -o "$out/$name" --force --quiet "$@"
}

export_once qwen2 examples/models/qwen2.py:build
export_once gpt2 examples/models/gpt2.py:build
runs=("qwen2 examples/solutions/qwen2.py" "gpt2 examples/solutions/gpt2.py"
  # decode tasks: verify ms per generation step against the bare decode step of the same file
  "--decode qwen2 examples/solutions/qwen2_decode.py" "--decode gpt2 examples/solutions/gpt2_decode.py")
if [ "${1:-}" != "--no-large" ]; then
  export_once qwen2-0.5b examples/models/qwen2.py:build \
    --set num_hidden_layers=24 --set hidden_size=896 --set num_attention_heads=14 \
    --set num_key_value_heads=2 --set intermediate_size=4864 --set vocab_size=151936 \
    --set tie_word_embeddings=true --set rope_theta=1000000.0 \
    --probe-shapes 1x16:none,2x12:left,1x32:none,2x9:right --probes 2 --hidden 2
  # the reference solution with the 0.5B constants
  sed -e 's/^N_LAYERS = .*/N_LAYERS = 24/' -e 's/^N_HEADS = .*/N_HEADS = 14/' \
    -e 's/^N_KV_HEADS = .*/N_KV_HEADS = 2/' -e 's/^ROPE_THETA = .*/ROPE_THETA = 1000000.0/' \
    examples/solutions/qwen2.py > "$out/qwen2-0.5b.py"
  sed -e 's/^N_LAYERS = .*/N_LAYERS = 24/' -e 's/^N_HEADS = .*/N_HEADS = 14/' \
    -e 's/^N_KV_HEADS = .*/N_KV_HEADS = 2/' -e 's/^ROPE_THETA = .*/ROPE_THETA = 1000000.0/' \
    examples/solutions/qwen2_decode.py > "$out/qwen2-0.5b_decode.py"
  runs+=("qwen2-0.5b $out/qwen2-0.5b.py" "--decode qwen2-0.5b $out/qwen2-0.5b_decode.py")
fi
for r in "${runs[@]}"; do
  set -- $r
  decode=()
  [ "$1" = --decode ] && { decode=(--decode); shift; }
  # one process per pack, so peak RSS is that pack's alone
  "$build/bench/bench_verify" --repeat 5 "${decode[@]}" "$out/$1" "$2"
done
