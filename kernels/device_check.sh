#!/usr/bin/env bash
# The one command for a GPU machine: environment facts, the GPU tests, then the timings.
#   bash kernels/device_check.sh [OUT_DIR] [--quick]
# Run from the repository root. Results: OUT_DIR/{nvidia_smi.csv,pytest_gpu.log,bench.log,results.json}.
set -uo pipefail
OUT=${1:-${OUT:-/tmp/balprune-device}}
QUICK=${2:-}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=src PYTHONDONTWRITEBYTECODE=1

nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,clocks.mem,temperature.gpu,power.draw,power.limit \
  --format=csv >"$OUT/nvidia_smi.csv" 2>&1
cat "$OUT/nvidia_smi.csv"
python3 -c "import torch, cupy; print('torch', torch.__version__, 'cupy', cupy.__version__, torch.cuda.get_device_name())"

echo "== pytest -m gpu"
XDIST=""
python3 -c "import xdist" 2>/dev/null && XDIST="-n 12"
timeout 270 python3 -m pytest -q -m gpu tests/gpu -p no:cacheprovider $XDIST >"$OUT/pytest_gpu.log" 2>&1
echo "pytest rc=$?"
grep -E "passed|failed|FAILED|ERROR|Error" "$OUT/pytest_gpu.log" | tail -15

echo "== benchmark"
timeout 220 python3 benchmarks/gpu_spmv.py --out "$OUT" $QUICK >"$OUT/bench.log" 2>&1
echo "bench rc=$?"
grep -vE "^  " "$OUT/bench.log" | tail -30
echo "== timings"
grep -E "^  .*(_cold|empty|read_|copy_)" "$OUT/bench.log" | sed 's/  */ /g' | cut -c1-120 | head -70
nvidia-smi --query-gpu=clocks.sm,clocks.mem,temperature.gpu,power.draw --format=csv,noheader >>"$OUT/nvidia_smi.csv" 2>&1

# Kernel durations without launch overhead, and DRAM traffic, from the hardware counters (cold:
# ncu flushes the caches before each replay). Clocks left as they are.
NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu /usr/local/cuda/bin/ncu 2>/dev/null | head -1)
if [ -n "$NCU" ]; then
  echo "== ncu ($NCU)"
  timeout 80 "$NCU" --clock-control none -k "regex:balanced|gemv|gemm" \
    --metrics gpu__time_duration.sum,dram__bytes_read.sum,dram__throughput.avg.pct_of_peak_sustained_elapsed,sm__warps_active.avg.pct_of_peak_sustained_active,l1tex__data_bank_conflicts_pipe_lsu_mem_shared_op_ld.sum \
    python3 benchmarks/gpu_spmv.py --probe >"$OUT/ncu.txt" 2>&1
  echo "ncu rc=$?"
  grep -E "balanced|gemv|gemm|duration|dram__|warps_active|bank_conflicts" "$OUT/ncu.txt" | sed 's/  */ /g' | cut -c1-100 | head -60
fi
