#!/usr/bin/env bash
# setup.sh — makes a fresh Debian 12 machine ready for fmx: installs the
# Debian packages that are missing (apt-get, as root or through sudo), then
# configures and builds into build/. Safe to run again: it only installs what
# is missing and cmake rebuilds only what changed.
#
#   scripts/setup.sh            install + build
#   FMX_BUILD_DIR=dir ...       build somewhere else
set -euo pipefail
cd "$(dirname "$0")/.."

packages=(
  build-essential cmake pkg-config
  libtorch-dev python3-torch python3-numpy
  libcjson-dev libcmocka-dev libsqlite3-dev libssl-dev libzmq3-dev libmsgpack-dev libseccomp-dev
  clang libclang-rt-14-dev
  python3-pytest python3-pytest-xdist python3-zmq python3-msgpack
  python3-setuptools python3-pip python3-venv python3-wheel  # pip install ./python, offline
  libcurl4-openssl-dev
  chromium  # headless, for the HTML leaderboard test (tests/python/test_research.py)
  # what real transformers needs beside ../shared/pydeps (its README): the suite and its tests
  python3-regex python3-tqdm python3-filelock python3-fsspec python3-yaml python3-requests python3-packaging
)

missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "fmx setup: installing ${missing[*]}" >&2
  sudo=()
  [ "$(id -u)" -eq 0 ] || sudo=(sudo -n)
  "${sudo[@]}" apt-get update -qq </dev/null
  DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -qq --no-install-recommends \
    "${missing[@]}" </dev/null
fi

build=${FMX_BUILD_DIR:-build}
if [ ! -f "$build/CMakeCache.txt" ]; then
  cmake -S . -B "$build" -DCMAKE_BUILD_TYPE=RelWithDebInfo ${FMX_CMAKE_ARGS:-} >/dev/null
fi
if ! cmake --build "$build" -j"$(nproc)" >"$build/build.log" 2>&1; then
  grep -E 'error|Error' -A3 "$build/build.log" | head -60 >&2
  echo "fmx setup: build failed (full log: $build/build.log)" >&2
  exit 2
fi
