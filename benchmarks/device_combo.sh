#!/usr/bin/env bash
# One device call when the session's device time allows only one: this session's kernel and runtime changes
# checked (the risky bitmask cases, the fused decode step, the vision activation layouts), then the same-run
# A/B of the 1B decode step and the 1B bitmask probe against a previous tree, then ResNet-50 end to end in its
# activation layouts. Run from the repository root:
#   mkdir ab_base && git archive REV src kernels benchmarks | tar -x -C ab_base     # here (untracked: it travels)
#   bash benchmarks/device_combo.sh "$OUT" ab_base      # there; <= 9.5 min
set -uo pipefail
OUT=${1:?output folder}
BASE=${2:?a folder holding the previous tree: src, kernels and benchmarks}
export PYTHONPATH=src PYTHONUNBUFFERED=1
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,clocks.max.sm --format=csv >"$OUT/gpu.txt" 2>&1
T="python3 -m pytest -q -x -p no:cacheprovider -W ignore::DeprecationWarning"
timeout 70 $T tests/gpu/test_bitmask_gpu.py -k "gaps or L1024 or L448 or K1500 or K33 or tall" >"$OUT/t_bitmask.txt" 2>&1
timeout 110 $T tests/gpu/test_llama_gpu.py -k "fused-ops or graph_replay or overlapped or wide" >"$OUT/t_llama.txt" 2>&1
timeout 70 $T tests/gpu/test_model_gpu.py -k "activation_layout" >"$OUT/t_vision.txt" 2>&1
grep -hE "passed|failed|error" "$OUT"/t_*.txt | tail -6
rm -rf /tmp/main_tree && cp -r "$BASE" /tmp/main_tree
{
  for t in main new; do
    d=. && [ $t = main ] && d=/tmp/main_tree
    echo "== decode 1b $t" && (cd $d && timeout 55 python3 benchmarks/llm_decode.py --model 1b --configs 70% \
      --contexts 128 --steps 32 --prune-head --split)
  done
} >"$OUT/ab.txt" 2>&1
W=/tmp/bp-vision && mkdir -p $W
( python3 -m balprune example resnet50 -o $W/r50.safetensors --force && python3 -m balprune prune \
  $W/r50.safetensors --block-size 10 --sparsity 0.9 -o $W/r50.bal.safetensors --force ) >"$OUT/prep.txt" 2>&1
timeout 140 python3 benchmarks/vision_layouts.py $W/r50.bal.safetensors --dtype float16 --iters 30 \
  --runners channels-last/auto,channels-last/dense,NCHW/auto >"$OUT/r50.txt" 2>&1
for t in main new; do  # last: the call's limit may cut it
  d=. && [ $t = main ] && d=/tmp/main_tree
  echo "== probe 1b walk 6 $t" && (cd $d && timeout 25 python3 benchmarks/bitmask_probe.py --shapes 1b \
    --configs 50%,70% --batch 1 --walk 6)
done >"$OUT/probe.txt" 2>&1
grep -h "ms_per_token\|products_ms\|== " "$OUT/ab.txt" | cut -c1-250
cut -c1-300 "$OUT/r50.txt" | tail -6
