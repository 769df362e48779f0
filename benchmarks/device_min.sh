#!/usr/bin/env bash
# The shortest useful device call (a session's last minutes): this session's GPU checks, then the 1B decode step
# in this tree and in a previous one (same run). Run from the repository root; ab_base as in device_combo.sh:
#   bash benchmarks/device_min.sh "$OUT" ab_base      # ~4-5 min; each step has its own limit
set -uo pipefail
OUT=${1:?output folder}
BASE=${2:?a folder holding the previous tree: src, kernels and benchmarks}
export PYTHONPATH=src PYTHONUNBUFFERED=1
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,clocks.max.sm --format=csv >"$OUT/gpu.txt" 2>&1
T="python3 -m pytest -q -x -p no:cacheprovider -W ignore::DeprecationWarning"
timeout 60 $T tests/gpu/test_llama_gpu.py -k "(fused-ops and balanced and not float32) or wide or overlapped" \
  >"$OUT/t_llama.txt" 2>&1
timeout 45 $T tests/gpu/test_bitmask_gpu.py -k "gaps or L1024 or K33 or tall" >"$OUT/t_bitmask.txt" 2>&1
timeout 45 $T tests/gpu/test_model_gpu.py -k "activation_layout" >"$OUT/t_vision.txt" 2>&1
grep -hE "passed|failed|error" "$OUT"/t_*.txt | tail -6
rm -rf /tmp/main_tree && cp -r "$BASE" /tmp/main_tree
for t in new main; do
  d=. && [ $t = main ] && d=/tmp/main_tree
  echo "== decode 1b $t" && (cd $d && timeout 50 python3 benchmarks/llm_decode.py --model 1b --configs 70% \
    --contexts 128 --steps 32 --prune-head)
done >"$OUT/ab.txt" 2>&1
grep -h "ms_per_token\|== " "$OUT/ab.txt" | cut -c1-250
