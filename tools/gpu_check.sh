#!/usr/bin/env bash
# The one-command GPU check (tools/gpu_check.py): bash tools/gpu_check.sh [--out DIR] [--device cuda|cpu] [--quick]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
[ -x "$PY" ] || PY=python3
exec "$PY" -m tools.gpu_check "$@"
