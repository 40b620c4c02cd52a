#!/usr/bin/env bash
# The whole `mop-ray prune` job on the tiny Mixtral with and without compiled bytecode: what a process start costs
# in an environment that ships no .pyc files and writes none (uv's default install, `pip --no-compile`, a read-only
# image, PYTHONDONTWRITEBYTECODE=1), and what mop_ray.bytecode's cache gives back.
#
#   bash benchmarks/bytecode.sh [RUNS]      # RUNS jobs per case (default 2); prints the driver's calibration
#                                           # imports, the stage's transformers import and load, and the wall time
#
# Cases (each a fresh `mop-ray prune` with its own local Ray):
#   uncompiled  every process compiles from source: an empty PYTHONPYCACHEPREFIX and PYTHONDONTWRITEBYTECODE=1
#   cache       the cache mop-ray sets up in such an environment (a fresh PYTHONPYCACHEPREFIX directory, written
#               by the first job, read by the later ones)
#   installed   the virtual environment's own .pyc files (pip compiles at install), MOP_RAY_PYCACHE=0
set -euo pipefail
runs=${1:-2}
PY=${PY:-python}
W=${W:-/tmp/mop-bytecode}
rm -rf "$W" && mkdir -p "$W"
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 RAY_AUTH_MODE=${RAY_AUTH_MODE:-disabled} RAY_USAGE_STATS_ENABLED=0 \
  HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
"$PY" -c "from mop_ray.zoo.tiny import build_tiny; build_tiny('mixtral', '$W/model')" > /dev/null
mopray=$(dirname "$(command -v "$PY")")/mop-ray
[ -x "$mopray" ] || mopray="$PY -m mop_ray.cli"

job() {  # $1: label; the rest: env arguments
  local label=$1; shift
  rm -rf "$W/out" "$W/out.run"
  local s e
  s=$(date +%s.%N)
  env "$@" $mopray prune --model "$W/model" --out "$W/out" --method mop --keep 4 --tokens 8192 --seq-len 256 \
    --sample 2048 > "$W/log" 2>&1 || { tail -5 "$W/log"; exit 1; }
  e=$(date +%s.%N)
  local cal stage
  cal=$(grep -o "imports [0-9.]*s" "$W/log" | head -1)
  stage=$(grep -o "loaded layers [0-9-]* in [0-9.]*s\|; imports [0-9.]*s" "$W/log" | tr '\n' ' ')
  local wall
  wall=$(python3 -c "print(round($e - $s, 2))")
  printf '%-12s driver calibration %-14s stage %-40s wall %s s\n' "$label" "$cal" "$stage" "$wall"
}

for i in $(seq 1 "$runs"); do
  job uncompiled -u MOP_RAY_PYCACHE PYTHONPYCACHEPREFIX="$W/empty-$i" PYTHONDONTWRITEBYTECODE=1
done
for i in $(seq 1 $((runs + 1))); do
  job "cache-$i" -u PYTHONDONTWRITEBYTECODE -u MOP_RAY_PYCACHE PYTHONPYCACHEPREFIX="$W/cache"
done
for i in $(seq 1 "$runs"); do
  job installed MOP_RAY_PYCACHE=0
done
rm -rf "$W"
