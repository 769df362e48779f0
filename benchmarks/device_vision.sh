#!/usr/bin/env bash
# Issue 16 on the device: the vision runtime's activation layouts checked, then ResNet-50 (90%) and VGG-16 (92%)
# end to end in each layout (benchmarks/vision_layouts.py). Run from the repository root:
#   bash benchmarks/device_vision.sh "$OUT"      # <= 10 min; each step has its own limit
set -uo pipefail
OUT=${1:?output folder}
export PYTHONPATH=src PYTHONUNBUFFERED=1
W=/tmp/bp-vision
mkdir -p "$OUT" "$W"
BP="python3 -m balprune"
nvidia-smi --query-gpu=name,clocks.max.sm --format=csv >"$OUT/gpu.txt" 2>&1
timeout 170 python3 -m pytest -q -p no:cacheprovider -W ignore::DeprecationWarning tests/gpu/test_model_gpu.py \
  -k "activation_layout or (runtime_matches and (vgg or resnet)) or (graph_replay and (vgg or resnet))" \
  >"$OUT/t_vision.txt" 2>&1
grep -hE "passed|failed" "$OUT/t_vision.txt"
( $BP example resnet50 -o $W/r50.safetensors --force && \
  $BP prune $W/r50.safetensors --block-size 10 --sparsity 0.9 -o $W/r50.bal.safetensors --force ) >"$OUT/prep.txt" 2>&1
timeout 200 python3 benchmarks/vision_layouts.py $W/r50.bal.safetensors --dtype float16 \
  --runners channels-last/auto,NCHW/auto,channels-last/dense >"$OUT/r50.txt" 2>&1
( $BP example vgg16 -o $W/vgg.safetensors --force && \
  $BP prune $W/vgg.safetensors --blocks 32 --sparsity 0.92 -o $W/vgg.bal.safetensors --force ) >>"$OUT/prep.txt" 2>&1
timeout 150 python3 benchmarks/vision_layouts.py $W/vgg.bal.safetensors --dtype float16 \
  --runners channels-last/auto,NCHW/auto >"$OUT/vgg.txt" 2>&1
cat "$OUT/r50.txt" "$OUT/vgg.txt" | cut -c1-400
