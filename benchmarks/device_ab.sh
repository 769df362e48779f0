#!/usr/bin/env bash
# One device call for a bitmask-kernel change written without a GPU: its risky correctness cases first, then
# same-run timings against the previous kernel (a copy of the tree with it) -- the layer probe and the 1B decode
# step. Run from the repository root on the device:
#   git show REV:kernels/balanced_bitmask.cu > main_bitmask.cu; git show REV:kernels/bp_common.cuh > main_common.cuh
#   bash benchmarks/device_ab.sh "$OUT" main_bitmask.cu main_common.cuh      # <= 8 min
set -uo pipefail
OUT=${1:?output folder}
MAIN_KERNEL=${2:?the previous kernels/balanced_bitmask.cu}
MAIN_COMMON=${3:?the previous kernels/bp_common.cuh}
export PYTHONPATH=src PYTHONUNBUFFERED=1
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,clocks.max.sm --format=csv >"$OUT/gpu.txt" 2>&1
timeout 110 python3 -m pytest -q -x -p no:cacheprovider -W ignore::DeprecationWarning tests/gpu/test_bitmask_gpu.py \
  -k "gaps or L1024 or L448 or K1500 or K1000 or K33 or K970 or tall" >"$OUT/t_bitmask_risky.txt" 2>&1
grep -hE "passed|failed" "$OUT/t_bitmask_risky.txt"
rm -rf /tmp/main_tree && mkdir /tmp/main_tree && cp -r src benchmarks kernels /tmp/main_tree/ \
  && cp "$MAIN_KERNEL" /tmp/main_tree/kernels/balanced_bitmask.cu && cp "$MAIN_COMMON" /tmp/main_tree/kernels/bp_common.cuh
for sh in 1b 8b; do
  for walk in 6 5; do
    echo "== $sh walk $walk main" && (cd /tmp/main_tree && timeout 30 python3 benchmarks/bitmask_probe.py --shapes $sh \
      --configs 50%,70% --batch 1 --walk $walk)
    echo "== $sh walk $walk new" && timeout 30 python3 benchmarks/bitmask_probe.py --shapes $sh --configs 50%,70% \
      --batch 1 --walk $walk
  done
done >"$OUT/probe.txt" 2>&1
for t in main new; do
  d=. && [ $t = main ] && d=/tmp/main_tree
  echo "== decode 1b $t" && (cd $d && timeout 70 python3 benchmarks/llm_decode.py --model 1b --configs 70% \
    --contexts 128 --steps 32 --prune-head --split)
done >"$OUT/decode.txt" 2>&1
grep -h "ms_per_token\|products_ms" "$OUT/decode.txt" | cut -c1-300
