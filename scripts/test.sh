#!/usr/bin/env bash
# Run the test suite with OpenBLAS preloaded when present (MLX's CPU wheel links reference BLAS).
set -euo pipefail
for lib in /usr/lib/x86_64-linux-gnu/libopenblas.so.0 /usr/lib/aarch64-linux-gnu/libopenblas.so.0; do
  if [ -e "$lib" ] && [ "$(uname -s)" = Linux ]; then export LD_PRELOAD="$lib${LD_PRELOAD:+:$LD_PRELOAD}"; break; fi
done
exec python -m pytest -q "$@"
