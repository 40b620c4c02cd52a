#!/usr/bin/env bash
# Issue 7's GPU runs, one step per device command (each well under 10 minutes), results under $OUT.
#
#   bash benchmarks/gpu_issue7.sh mixtral [RUNS]  # Mixtral-8x7B shape, 8 layers, 262,144 tokens, mop 8 -> 4, RUNS
#                                                 # runs of speed.py (default 2), each with the first wave's per-call
#                                                 # GPU times (first_wave_ms) printed
#   bash benchmarks/gpu_issue7.sh ab BASE [ROUNDS] # the mixtral job alternately from an earlier tree BASE (its mop_ray/,
#                                                 # actors/ and benchmarks/, e.g. `git archive REV mop_ray actors
#                                                 # benchmarks | tar -x -C .device/base`) and from this one, ROUNDS
#                                                 # rounds (default 2) after one job that fills the caches: a
#                                                 # before/after on one machine, whichever card comes;
#                                                 # its runs come back in one file, $OUT/ab$TAG.tar.gz
#   bash benchmarks/gpu_issue7.sh scaling         # the same job on 1, 2, ... GPUs, up to the machine's count, the
#                                                 # page cache dropped (one disk for all) and warm (--page-cache)
#   bash benchmarks/gpu_issue7.sh deepseek [RUNS] # DeepSeek-V3 shape, 1 dense + 1 MoE layer (27.9 GB), mop 256 -> 128,
#                                                 # 131,072 tokens, sample 65,536: RUNS runs of speed.py (default 1)
#   bash benchmarks/gpu_issue7.sh first-call      # a stage's first micro-batch calls, cold and after its warm-up
#   bash benchmarks/gpu_issue7.sh profile         # a wave's micro-batch call, op by op (observe_profile.py, 2 layers)
#   bash benchmarks/gpu_issue7.sh kernels         # the fused kernels against torch (kernel_speed.py; no checkpoint)
#   bash benchmarks/gpu_issue7.sh read            # one layer read + built on the GPU: via the host vs straight onto
#                                                 # the GPU, cold and from the page cache (read_to_device.py, 2 layers)
#   bash benchmarks/gpu_issue7.sh ram [COUNTS]    # host RAM at several layer counts (default 2 4): the Mixtral shape,
#                                                 # 16,384 tokens, sample 8,192; the peak by process
#   bash benchmarks/gpu_issue7.sh imports         # a stage's imports with and without a side thread importing
#                                                 # transformers' torch-free dependencies (import_overlap.py)
#   bash benchmarks/gpu_issue7.sh rounds [LAYERS] # the mixtral job (LAYERS layers, default 8) with 2 stages on one
#                                                 # GPU: 2 rounds
#   bash benchmarks/gpu_issue7.sh tests           # the tests that need a GPU
#   bash benchmarks/gpu_issue7.sh layers ["N M"]  # the mixtral job at N and M layers (default "12 8"), one checkpoint
#                                                 # on the disk at a time, outputs and run dirs on /dev/shm
#   bash benchmarks/gpu_issue7.sh full            # the mixtral job at all 32 layers, one stage streaming them
#                                                 # through the GPU (93.1 GB of weights): the checkpoint (93.4 GB,
#                                                 # more than the 64 GiB disk) made in /dev/shm (read at memory
#                                                 # speed, so the floor is the compute), output (48.3 GB) and records
#                                                 # (13.7 GB: sample 49,152, the most that fits) on the disk
#   bash benchmarks/gpu_issue7.sh next [SECONDS]  # what is still unmeasured, most wanted first (tests, deepseek 1,
#                                                 # profile, full), each started only while 150 s
#                                                 # of SECONDS (default 540) are left; a later call on the same warm
#                                                 # machine goes on where the last stopped
#   bash benchmarks/gpu_issue7.sh startup         # the machine's bytecode state (mop_ray.bytecode), the imports of a
#                                                 # driver and a stage with and without the cache, then the mixtral
#                                                 # job with the cache off (MOP_RAY_PYCACHE=0) and on
#
# Needs mop-ray importable (PYTHONPATH) and CORPUS (default ../shared/data/corpus; on the lent machine a copy in
# .device/corpus): the six train.jsonl.gz files, as the mixture the RESULTS.md runs calibrate on (the embedded
# corpus' math source holds too few blocks of 2048 tokens for 262,144 tokens). D (default /tmp/mopbench): where
# the synthetic checkpoint goes (24 GB for 8 layers).
set -euo pipefail
step=${1:?usage: gpu_issue7.sh mixtral [RUNS] | ab BASE [ROUNDS] | deepseek [RUNS] | scaling | first-call | profile | kernels | read | ram [COUNTS] | imports [ROUNDS] | rounds [LAYERS] | layers [COUNTS] | full | tests | startup | next [SECONDS]}
OUT=${OUT:-/tmp/out}
D=${D:-/tmp/mopbench}
TAG=${TAG:-}  # in the mixtral step's output names: speed-mixtral-8l$TAG-$i.{json,md}
# SPEED_ARGS: more speed.py options for the mixtral and ab steps' jobs, e.g. --select-after-observe
CORPUS=$(cd "${CORPUS:-../shared/data/corpus}" && pwd)
mkdir -p "$OUT" "$D"

mixture() {  # $D/mix.yaml: one source per corpus domain's train split
  printf 'sources:\n' > "$D/mix.yaml"
  for dom in code docs literature math qa wiki; do
    printf '  - {name: %s, path: %s/%s/train.jsonl.gz}\n' "$dom" "$CORPUS" "$dom" >> "$D/mix.yaml"
  done
}

model() {  # $D/mx${1:-8}: the Mixtral-8x7B-shaped checkpoint with $1 layers, default 8 (made once per machine)
  local n=${1:-8}
  [ -f "$D/mx$n/model.safetensors.index.json" ] ||
    python benchmarks/make_synthetic.py --preset mixtral-8x7b --layers "$n" --out "$D/mx$n" 2>&1 | tail -3
}

mixtral_job() {  # $1: the tree whose mop_ray runs it, $2: the output name's tag: the Mixtral job, 8 layers, mop 8 -> 4
  (cd "$1" && PYTHONPATH="$1:${PYTHONPATH:-}" python benchmarks/speed.py --model "$D/mx8" --calib "$D/mix.yaml" \
    --method mop --keep 4 --tokens 262144 --seq-len 2048 --sample 65536 --out-json "$OUT/speed-mixtral-8l$2.json" \
    ${SPEED_ARGS:-} > "$OUT/speed-mixtral-8l$2.md" 2>&1)
  grep -E "\| (total|observe|write) \||^First wave|^Whole job|^Critical path" "$OUT/speed-mixtral-8l$2.md" ||
    tail -20 "$OUT/speed-mixtral-8l$2.md"
}

case $step in
  mixtral)
    mixture; model
    for i in $(seq 1 "${2:-2}"); do  # MOP_RAY_WARM_UP=0 in the environment: the stages' warm-up off
      mixtral_job "$(pwd)" "$TAG-$i"
    done ;;
  ab)
    mixture; model
    base=$(cd "${2:?usage: gpu_issue7.sh ab BASE [ROUNDS]}" && pwd); here=$(pwd)
    mixtral_job "$here" "$TAG-new-0"; mixtral_job "$base" "$TAG-base-0"  # the bytecode and Triton caches, both trees
    for i in $(seq 1 "${3:-2}"); do mixtral_job "$base" "$TAG-base-$i"; mixtral_job "$here" "$TAG-new-$i"; done
    # one file back for all runs (a device call returns at most 8 files)
    (cd "$OUT" && tar -czf "ab$TAG.tar.gz" speed-mixtral-8l"$TAG"-base-* speed-mixtral-8l"$TAG"-new-* &&
      rm -f speed-mixtral-8l"$TAG"-base-* speed-mixtral-8l"$TAG"-new-*) ;;
  deepseek)
    mixture
    [ -f "$D/dsv3/model.safetensors.index.json" ] ||
      python benchmarks/make_synthetic.py --preset deepseek-v3 --layers 2 --dense-layers 1 --out "$D/dsv3" 2>&1 | tail -1
    for i in $(seq 1 "${2:-1}"); do
      python benchmarks/speed.py --model "$D/dsv3" --calib "$D/mix.yaml" --method mop --keep 128 --tokens 131072 \
        --seq-len 2048 --sample 65536 --read-floor-gb 4 --out-json "$OUT/speed-dsv3-64k$TAG-$i.json" \
        > "$OUT/speed-dsv3-64k$TAG-$i.md" 2>&1
      grep -E "\| (total|observe|select|write) \||^First wave|^Whole job" "$OUT/speed-dsv3-64k$TAG-$i.md" ||
        tail -20 "$OUT/speed-dsv3-64k$TAG-$i.md"
    done ;;
  scaling)  # each GPU count with the page cache dropped (the stages share one disk) and warm (the pipeline alone)
    mixture; model
    n=$(nvidia-smi -L | wc -l)
    gpus=$(for g in 1 2 4 8; do [ "$g" -le "$n" ] && printf '%s ' "$g"; done)
    for cache in cold warm; do
      python benchmarks/speed.py --model "$D/mx8" --calib "$D/mix.yaml" --method mop --keep 4 --tokens 262144 \
        --seq-len 2048 --sample 65536 --gpus $gpus --page-cache $cache \
        --out-json "$OUT/speed-mixtral-8l-scaling-$n-$cache.json" > "$OUT/speed-mixtral-8l-scaling-$n-$cache.md" 2>&1
      tail -30 "$OUT/speed-mixtral-8l-scaling-$n-$cache.md"
    done ;;
  first-call)
    model 2
    python benchmarks/first_call.py --model "$D/mx2" --layers 1 --calls 6 --out-json "$OUT/first-call.json" \
      > "$OUT/first-call.txt" 2>&1
    grep "calls (ms)" "$OUT/first-call.txt" ;;
  profile)  # where a wave's micro-batch call goes: observe_profile.py on 2 layers (decoder only, + statistics,
    # + sample) with the top ops of one call
    model 2
    python benchmarks/observe_profile.py --model "$D/mx2" --micro-batches 8 --out-json "$OUT/observe-profile$TAG.json" \
      > "$OUT/observe-profile$TAG.txt" 2>&1
    head -3 "$OUT/observe-profile$TAG.txt" ;;
  kernels)
    python benchmarks/kernel_speed.py --out-json "$OUT/kernel-speed$TAG.json" 2>&1 | tee "$OUT/kernel-speed$TAG.txt" ;;
  read)
    model 2
    python benchmarks/read_to_device.py --model "$D/mx2" --out-json "$OUT/read-to-device$TAG.json" 2>&1 |
      tee "$OUT/read-to-device$TAG.txt" ;;
  ram)
    mixture
    for n in ${2:-2 4}; do
      model "$n"
      python benchmarks/speed.py --model "$D/mx$n" --calib "$D/mix.yaml" --method mop --keep 4 --tokens 16384 \
        --seq-len 2048 --sample 8192 --read-floor-gb 2 --write-floor-gb 1 --out-json "$OUT/rss-mixtral-${n}l$TAG.json" \
        > "$OUT/rss-mixtral-${n}l$TAG.md" 2>&1
      python - "$OUT/rss-mixtral-${n}l$TAG.json" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))["runs"][0]
gb = lambda b: round(b / 1e9, 2)
print(sys.argv[1].rsplit("/", 1)[-1], "total rss/pss", gb(r["host_memory"]["peak_bytes"]["total"]["rss"]),
      gb(r["host_memory"]["peak_bytes"]["total"]["pss"]),
      {k: gb(v) for k, v in r["host_memory"]["rss_at_peak_by_process"].items() if v > 2e8})
PY
      rm -rf "$D/mx$n.speed"
    done ;;
  imports)
    python benchmarks/import_overlap.py --rounds "${2:-3}" --pycache "$D/pycache" --out-json "$OUT/imports$TAG.json" \
      2>&1 | tee "$OUT/imports$TAG.txt" | tail -4 ;;
  rounds)  # [LAYERS] (default 8)
    n=${2:-8}; mixture; model "$n"
    python benchmarks/speed.py --model "$D/mx$n" --calib "$D/mix.yaml" --method mop --keep 4 --tokens 262144 \
      --seq-len 2048 --sample 65536 --gpus 2 --stages-at-once 1 --out-json "$OUT/speed-mixtral-${n}l-rounds$TAG.json" \
      > "$OUT/speed-mixtral-${n}l-rounds$TAG.md" 2>&1
    grep -E "\| (total|observe|select|write) \||^Whole job|^Critical path|rounds?" "$OUT/speed-mixtral-${n}l-rounds$TAG.md" |
      head -20 || tail -20 "$OUT/speed-mixtral-${n}l-rounds$TAG.md" ;;
  tests)
    # the GPU-only tests (staged copies, CUDA graphs) and those whose numbers differ on a GPU (recorded products,
    # FP8 dequantized on the device, bf16 rows, selection beside the waves)
    # (the bytecode cache: tests/conftest.py sets it for the session, in MOP_RAY_PYCACHE where that is given)
    python -m pytest -q -p no:cacheprovider tests/test_arch.py tests/test_enu.py tests/test_fp8.py tests/test_warm_up.py \
      tests/test_kernels.py tests/test_streaming.py \
      "tests/test_faults.py::test_a_stage_lost_while_selecting_after_or_beside_observe" \
      "tests/test_observe.py::test_a_bfloat16_stage_records_its_sample_as_exact_bfloat16_bits" \
      "tests/test_observe.py::test_token_meta_copies_the_source_ids_and_sample_rows_to_the_gpu" 2>&1 |
      tee "$OUT/gpu-tests.log" | tail -15 ;;
  startup)
    python - <<'PY' | tee "$OUT/startup.txt"
import importlib.util, os, sys
from mop_ray.bytecode import PROBES, uncached
print("python", sys.version.split()[0], "dont_write_bytecode", sys.dont_write_bytecode, "prefix", sys.pycache_prefix)
for p in PROBES:
    spec = importlib.util.find_spec(p)
    d = os.path.dirname(spec.origin) if spec and spec.origin else None
    print(f"{p}: {d} writable={d and os.access(d, os.W_OK)} uncached={uncached(p)}")
PY
    imports() {  # $1: label; a fresh process importing what a driver and a stage import
      local s e; s=$(date +%s.%N)
      python -c "import torch, datasets, transformers.models.mixtral.modeling_mixtral; from transformers import AutoTokenizer"
      e=$(date +%s.%N)
      python -c "print('$1: torch, datasets, tokenizer, Mixtral layer imported in', round($e - $s, 2), 's')"
    }
    { imports plain; imports plain-again
      (export PYTHONPYCACHEPREFIX=$D/pycache; unset PYTHONDONTWRITEBYTECODE; imports cache-first; imports cache-second)
    } | tee -a "$OUT/startup.txt"
    mixture; model
    for case in off on; do
      if [ $case = off ]; then export MOP_RAY_PYCACHE=0; else export MOP_RAY_PYCACHE=$D/pycache; fi
      python benchmarks/speed.py --model "$D/mx8" --calib "$D/mix.yaml" --method mop --keep 4 --tokens 262144 \
        --seq-len 2048 --sample 65536 --out-json "$OUT/speed-mixtral-8l-pycache-$case.json" \
        > "$OUT/speed-mixtral-8l-pycache-$case.md" 2>&1
      python - "$OUT/speed-mixtral-8l-pycache-$case.json" <<'PY' | tee -a "$OUT/startup.txt"
import json, sys
r = json.load(open(sys.argv[1]))["runs"][0]
load, stage = r["placement"][0]["load"], r["stage_actors"][0]
print(sys.argv[1].rsplit("/", 1)[-1], "total", r["wall_s"], "calibrate", r["timings"]["calibrate_s"],
      "driver imports", r["calibrate"]["imports_s"], "stage imports", load["config_s"],
      "layer 0 on the GPU", round(stage["built_unix"]["0"] - r["run_start_unix"], 2),
      "observe", r["timings"]["observe_s"])
PY
    done ;;
  layers)  # ["COUNTS"] (default "12 8"): the mixtral job at several layer counts, one checkpoint on the disk at a
    # time (each made when its turn comes, the others removed), run dirs and outputs in $WORK (default /dev/shm/mopw
    # where it has room, else $D/work): how the fixed start-up weighs against the floor as the layers grow
    mixture
    for n in ${2:-12 8}; do
      for m in "$D"/mx[0-9]*; do [ "$m" = "$D/mx$n" ] || rm -rf "$m"; done
      model "$n"
      work=${WORK:-/dev/shm/mopw}
      mkdir -p "$work" 2>/dev/null && [ "$(df -Pk "$work" | awk 'NR==2 {print $4}')" -gt $((n * 3000000)) ] ||
        work=$D/work
      python benchmarks/speed.py --model "$D/mx$n" --calib "$D/mix.yaml" --method mop --keep 4 --tokens 262144 \
        --seq-len 2048 --sample 65536 --work "$work" --out-json "$OUT/speed-mixtral-${n}l-layers$TAG.json" \
        > "$OUT/speed-mixtral-${n}l-layers$TAG.md" 2>&1
      echo "layers $n (work in $work):"
      grep -E "\| (total|observe|write) \||^Whole job|^Critical path" "$OUT/speed-mixtral-${n}l-layers$TAG.md" ||
        tail -20 "$OUT/speed-mixtral-${n}l-layers$TAG.md"
      rm -rf "$work"
    done ;;
  full)
    mixture
    for m in "$D"/mx[0-9]*; do rm -rf "$m"; done  # the disk takes the output and the records (48.3 + 13.7 GB)
    ckpt=/dev/shm/mx32
    [ -f "$ckpt/model.safetensors.index.json" ] ||
      python benchmarks/make_synthetic.py --preset mixtral-8x7b --layers 32 --no-fsync --out "$ckpt" 2>&1 | tail -1
    python benchmarks/speed.py --model "$ckpt" --calib "$D/mix.yaml" --method mop --keep 4 --tokens 262144 \
      --seq-len 2048 --sample 49152 --work "$D/work" --out-json "$OUT/speed-mixtral-32l-shm$TAG.json" \
      > "$OUT/speed-mixtral-32l-shm$TAG.md" 2>&1 || true
    grep -E "\| (total|observe|write) \||^Whole job|^Critical path" "$OUT/speed-mixtral-32l-shm$TAG.md" ||
      tail -20 "$OUT/speed-mixtral-32l-shm$TAG.md"
    rm -rf "$ckpt" "$D/work" ;;
  next)  # [SECONDS] (default 540): what is still unmeasured, most wanted first, while time is left; a step that
    # ran is written to $D/next.done and skipped by the next call on the same (still warm) machine
    budget=${2:-540}
    for s in "tests" "deepseek 1" "profile" "full"; do
      if grep -qxF "$s" "$D/next.done" 2>/dev/null; then continue; fi
      if [ "$SECONDS" -ge $((budget - 150)) ]; then echo "next: skipped '$s' (${SECONDS}s of ${budget}s gone)"; continue; fi
      echo "next: $s (at ${SECONDS}s)"
      echo "$s" >> "$D/next.done"
      bash "$0" $s || echo "next: '$s' failed"
    done ;;
  *)
    echo "gpu_issue7.sh: unknown step '$step'; expected mixtral, ab, deepseek, scaling, first-call, profile, kernels, read, ram, imports, rounds, layers, full, tests, startup or next" >&2; exit 2 ;;
esac
