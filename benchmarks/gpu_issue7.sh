#!/usr/bin/env bash
# Issue 7's GPU runs, one step per device command (each well under 10 minutes), results under $OUT.
#
#   bash benchmarks/gpu_issue7.sh mixtral [RUNS]  # Mixtral-8x7B shape, 8 layers, 262,144 tokens, mop 8 -> 4, RUNS
#                                                 # runs of speed.py (default 2), each with the first wave's per-call
#                                                 # GPU times (first_wave_ms) printed
#   bash benchmarks/gpu_issue7.sh scaling         # the same job on 1, 2, ... GPUs, up to the machine's count
#   bash benchmarks/gpu_issue7.sh first-call      # a stage's first micro-batch calls, cold and after its warm-up
#   bash benchmarks/gpu_issue7.sh tests           # the tests that need a GPU
#
# Needs mop-ray importable (PYTHONPATH) and CORPUS (default ../shared/data/corpus; on the lent machine a copy in
# .device/corpus): the six train.jsonl.gz files, as the mixture the RESULTS.md runs calibrate on (the embedded
# corpus' math source holds too few blocks of 2048 tokens for 262,144 tokens). D (default /tmp/mopbench): where
# the synthetic checkpoint goes (24 GB for 8 layers).
set -euo pipefail
step=${1:?usage: gpu_issue7.sh mixtral [RUNS] | scaling | first-call | tests}
OUT=${OUT:-/tmp/out}
D=${D:-/tmp/mopbench}
TAG=${TAG:-}  # in the mixtral step's output names: speed-mixtral-8l$TAG-$i.{json,md}
CORPUS=$(cd "${CORPUS:-../shared/data/corpus}" && pwd)
mkdir -p "$OUT" "$D"

mixture() {  # $D/mix.yaml: one source per corpus domain's train split
  printf 'sources:\n' > "$D/mix.yaml"
  for dom in code docs literature math qa wiki; do
    printf '  - {name: %s, path: %s/%s/train.jsonl.gz}\n' "$dom" "$CORPUS" "$dom" >> "$D/mix.yaml"
  done
}

model() {  # $D/mx8: the Mixtral-8x7B-shaped checkpoint, 8 layers (made once per machine)
  [ -f "$D/mx8/model.safetensors.index.json" ] ||
    python benchmarks/make_synthetic.py --preset mixtral-8x7b --layers 8 --out "$D/mx8" 2>&1 | tail -3
}

case $step in
  mixtral)
    mixture; model
    for i in $(seq 1 "${2:-2}"); do  # MOP_RAY_WARM_UP=0 in the environment: the stages' warm-up off
      python benchmarks/speed.py --model "$D/mx8" --calib "$D/mix.yaml" --method mop --keep 4 --tokens 262144 \
        --seq-len 2048 --sample 65536 --out-json "$OUT/speed-mixtral-8l$TAG-$i.json" > "$OUT/speed-mixtral-8l$TAG-$i.md" 2>&1
      grep -E "\| (total|observe|write) \||^First wave" "$OUT/speed-mixtral-8l$TAG-$i.md" || tail -20 "$OUT/speed-mixtral-8l$TAG-$i.md"
    done ;;
  scaling)
    mixture; model
    n=$(nvidia-smi -L | wc -l)
    gpus=$(for g in 1 2 4 8; do [ "$g" -le "$n" ] && printf '%s ' "$g"; done)
    python benchmarks/speed.py --model "$D/mx8" --calib "$D/mix.yaml" --method mop --keep 4 --tokens 262144 \
      --seq-len 2048 --sample 65536 --gpus $gpus --out-json "$OUT/speed-mixtral-8l-scaling-$n.json" \
      > "$OUT/speed-mixtral-8l-scaling-$n.md" 2>&1
    tail -30 "$OUT/speed-mixtral-8l-scaling-$n.md" ;;
  first-call)
    [ -f "$D/mx2/model.safetensors.index.json" ] ||
      python benchmarks/make_synthetic.py --preset mixtral-8x7b --layers 2 --out "$D/mx2" 2>&1 | tail -1
    python benchmarks/first_call.py --model "$D/mx2" --layers 1 --calls 6 --out-json "$OUT/first-call.json" \
      > "$OUT/first-call.txt" 2>&1
    grep "calls (ms)" "$OUT/first-call.txt" ;;
  tests)
    # the GPU-only tests (staged copies, CUDA graphs) and those whose numbers differ on a GPU (recorded products,
    # FP8 dequantized on the device, bf16 rows, selection beside the waves)
    python -m pytest -q -p no:cacheprovider tests/test_arch.py tests/test_enu.py tests/test_fp8.py tests/test_warm_up.py \
      "tests/test_faults.py::test_a_stage_lost_while_selecting_after_or_beside_observe" \
      "tests/test_observe.py::test_a_bfloat16_stage_records_its_sample_as_exact_bfloat16_bits" 2>&1 |
      tee "$OUT/gpu-tests.log" | tail -15 ;;
  *)
    echo "gpu_issue7.sh: unknown step '$step'; expected mixtral, scaling, first-call or tests" >&2; exit 2 ;;
esac
