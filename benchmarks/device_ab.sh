#!/usr/bin/env bash
# One device call for kernel changes written without a GPU: their risky correctness cases first, then same-run
# timings against a previous tree -- the layer probe and the 1B decode step. Run from the repository root:
#   mkdir ab_base && git archive REV src kernels benchmarks | tar -x -C ab_base     # here (untracked: it travels)
#   bash benchmarks/device_ab.sh "$OUT" ab_base      # there; <= 9 min
set -uo pipefail
OUT=${1:?output folder}
BASE=${2:?a folder holding the previous tree: src, kernels and benchmarks}
export PYTHONPATH=src PYTHONUNBUFFERED=1
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,clocks.max.sm --format=csv >"$OUT/gpu.txt" 2>&1
timeout 110 python3 -m pytest -q -x -p no:cacheprovider -W ignore::DeprecationWarning tests/gpu/test_bitmask_gpu.py \
  -k "gaps or L1024 or L448 or K1500 or K1000 or K33 or K970 or tall" >"$OUT/t_bitmask_risky.txt" 2>&1
timeout 100 python3 -m pytest -q -x -p no:cacheprovider -W ignore::DeprecationWarning tests/gpu/test_llama_gpu.py \
  -k "fused-ops or graph_replay or overlapped" >"$OUT/t_llama.txt" 2>&1
grep -hE "passed|failed" "$OUT"/t_*.txt
rm -rf /tmp/main_tree && cp -r "$BASE" /tmp/main_tree
for sw in "1b 6" "1b 5" "8b 6"; do
  set -- $sw
  echo "== $1 walk $2 main" && (cd /tmp/main_tree && timeout 30 python3 benchmarks/bitmask_probe.py --shapes $1 \
    --configs 50%,70% --batch 1 --walk $2)
  echo "== $1 walk $2 new" && timeout 30 python3 benchmarks/bitmask_probe.py --shapes $1 --configs 50%,70% \
    --batch 1 --walk $2
done >"$OUT/probe.txt" 2>&1
for t in main new; do
  d=. && [ $t = main ] && d=/tmp/main_tree
  echo "== decode 1b $t" && (cd $d && timeout 70 python3 benchmarks/llm_decode.py --model 1b --configs 70% \
    --contexts 128 --steps 32 --prune-head --split)
done >"$OUT/decode.txt" 2>&1
grep -h "ms_per_token\|products_ms" "$OUT/decode.txt" | cut -c1-300
