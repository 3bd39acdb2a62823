#!/usr/bin/env bash
# Run the test suite, with OpenBLAS preloaded on Linux when present (MLX's CPU wheel links reference BLAS).
set -euo pipefail
cd "$(dirname "$0")/.."
[ -f .venv/bin/activate ] && . .venv/bin/activate
if [ "$(uname -s)" = Linux ]; then
  for lib in /usr/lib/x86_64-linux-gnu/libopenblas.so.0 /usr/lib/aarch64-linux-gnu/libopenblas.so.0; do
    if [ -e "$lib" ]; then export LD_PRELOAD="$lib${LD_PRELOAD:+:$LD_PRELOAD}"; break; fi
  done
fi
exec python -m pytest -q -ra "$@"
