#!/usr/bin/env bash
# A follow-up device call after device_pending.sh: the GPU suites it does not run, then the issue
# tables (8B layer at every config, 1B decode split). Run from the repository root on the device:
#   bash benchmarks/device_next.sh "$OUT"      # <= 10 min; each step has its own limit
# Writes at most 8 files into OUT.
set -uo pipefail
OUT=${1:?output folder}
export PYTHONPATH=src PYTHONUNBUFFERED=1
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,clocks.max.sm --format=csv >"$OUT/gpu.txt" 2>&1
git rev-parse HEAD >>"$OUT/gpu.txt" 2>/dev/null
timeout 200 python3 -m pytest -q -p no:cacheprovider -W ignore::DeprecationWarning tests/gpu/test_llama_gpu.py \
  tests/gpu/test_lm_step_gpu.py tests/gpu/test_nm24_gpu.py tests/gpu/test_recurrence_gpu.py -k "not paper_sized" \
  >"$OUT/t_suites.txt" 2>&1
timeout 100 python3 benchmarks/llm_decode.py --model 1b --configs 50%,70% --contexts 128 --steps 32 --split \
  >"$OUT/decode_1b.txt" 2>&1
timeout 100 python3 benchmarks/llm_decode.py --model 1b --configs 50%,70% --contexts 128,1024 --steps 32 --split \
  --prune-head >>"$OUT/decode_1b.txt" 2>&1
timeout 180 python3 benchmarks/llm_layers.py --models 8b --dtypes float16 --configs 50,70,80,2:4 --batch 1,4 \
  --index auto --out /tmp/llm-layers >"$OUT/layers_8b.txt" 2>&1
cp /tmp/llm-layers/table.txt "$OUT/layers_8b_table.txt" 2>/dev/null
grep -hE "passed|failed" "$OUT"/t_*.txt
