#!/usr/bin/env bash
# The GPU issue's figures in one go, on a GPU machine, from the repository root:
#   bash benchmarks/paper_bench.sh OUT_DIR [DTYPES (default: float16 float32)] [--no-sweep]
# 1. `balprune bench` on the paper's shapes (16384x8192, VGG-16 fc6/fc7, LSTM-1500 gates) pruned to
#    90% balanced (32 blocks per row), batch 1 and 8, cold and hot, eager and CUDA graph, with every
#    peer: OUT/paper-<dtype>.json and .txt.
# 2. `balprune bench-sweep` (the paper's micro-benchmark, 16384x8192, sparsity 0.5..0.97, batch 1 and
#    8, cold): OUT/sweep-<dtype>.json, .png and .txt.
set -uo pipefail
OUT=${1:?usage: paper_bench.sh OUT_DIR [DTYPES] [--no-sweep]}
DTYPES=${2:-"float16 float32"}
SWEEP=1
[ "${3:-}" = "--no-sweep" ] && SWEEP=0
mkdir -p "$OUT"
export PYTHONPATH=src PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 COLUMNS=200
BP="python3 -m balprune"
git rev-parse --short HEAD 2>/dev/null >"$OUT/commit.txt"
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,temperature.gpu,power.draw --format=csv >"$OUT/nvidia_smi.csv" 2>&1
for DT in $DTYPES; do
  SRC=/tmp/bp_paper_$DT.safetensors
  python3 benchmarks/paper_shapes.py --dtype "$DT" -o "$SRC" >/dev/null
  $BP prune "$SRC" --blocks 32 --sparsity 0.9 -o "/tmp/bp_paper_$DT.bal.safetensors" --force >/dev/null
  $BP bench "/tmp/bp_paper_$DT.bal.safetensors" --batch 1,8 --graph --json "$OUT/paper-$DT.json" >"$OUT/paper-$DT.txt" 2>"$OUT/paper-$DT.err"
  echo "bench $DT rc=$?"
  if [ "$SWEEP" = 1 ]; then
    $BP bench-sweep --dtype "$DT" --batch 1,8 --json "$OUT/sweep-$DT.json" --plot "$OUT/sweep-$DT.png" >"$OUT/sweep-$DT.txt" 2>"$OUT/sweep-$DT.err"
    echo "sweep $DT rc=$?"
  fi
done
