#!/usr/bin/env bash
# Create .venv and install mop-ray with its test extras. Idempotent; safe to re-run.
# CPU machines get the CPU build of torch (2.13.0); set MOP_RAY_TORCH to another spec (or "skip") on GPU boxes.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
TORCH=${MOP_RAY_TORCH:-torch==2.13.0}
if [ "$TORCH" != "skip" ] && ! .venv/bin/python -c "import torch" 2>/dev/null; then
    .venv/bin/pip install -q "$TORCH"
fi
.venv/bin/pip install -q -e '.[test]'
