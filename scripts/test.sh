#!/usr/bin/env bash
# Run the test suite (inside .venv, OpenBLAS preloaded on Linux).
set -euo pipefail
exec "$(dirname "$0")/with-openblas" python -m pytest -q -ra "$@"
