#!/usr/bin/env bash
# One device call that verifies and times a bitmask-kernel change written without a GPU (used for kernels/NOTES.md
# v28 and v29 and the fused dense conv variant): correctness first, the risky cases before the sweep, then the
# same-run timings against the previous kernel. Run from the repository root on the device (PYTHONPATH=src set here):
#   git show REV:kernels/balanced_bitmask.cu > main_bitmask.cu   # here, the kernel to compare with (untracked: it travels)
#   bash benchmarks/device_pending.sh "$OUT" main_bitmask.cu   # there; <= 10 min:
# step 4 may be cut by the call's limit: rerun what it did not reach in a second call
# Writes at most 8 files into OUT (the device tool brings back 8): the logs named below.
set -uo pipefail
OUT=${1:?output folder}
MAIN_KERNEL=${2:?the main branch kernels/balanced_bitmask.cu}
export PYTHONPATH=src PYTHONUNBUFFERED=1
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,clocks.max.sm --format=csv >"$OUT/gpu.txt" 2>&1
git rev-parse HEAD >>"$OUT/gpu.txt" 2>/dev/null

# 1. the v28 kernel on its risky cases (empty words, long rows, ragged shapes, phantom segments), every dtype
timeout 100 python3 -m pytest -q -x -p no:cacheprovider -W ignore::DeprecationWarning tests/gpu/test_bitmask_gpu.py \
  -k "gaps or L1024 or L448 or K1500 or K1000 or K33 or K970 or tall" >"$OUT/t_bitmask_risky.txt" 2>&1

# 1b. the attention kernel's independent sums (the fused decode step against the float32 reference)
timeout 90 python3 -m pytest -q -x -p no:cacheprovider -W ignore::DeprecationWarning tests/gpu/test_llama_gpu.py \
  -k "(fused-ops and balanced) or graph_replay or overlapped" >"$OUT/t_llama_attention.txt" 2>&1

# 2. same-run timings: main's kernel (a copy of the tree with it) against v28, walk 6 and walk 5
rm -rf /tmp/main_tree && mkdir /tmp/main_tree && cp -r src benchmarks kernels /tmp/main_tree/ \
  && cp "$MAIN_KERNEL" /tmp/main_tree/kernels/balanced_bitmask.cu
for sh in 8b 1b; do
  for walk in 6 5; do
    echo "== $sh walk $walk main" && (cd /tmp/main_tree && timeout 30 python3 benchmarks/bitmask_probe.py --shapes $sh \
      --configs 50%,70% --batch 1 --walk $walk)
    echo "== $sh walk $walk v28" && timeout 30 python3 benchmarks/bitmask_probe.py --shapes $sh --configs 50%,70% \
      --batch 1 --walk $walk
  done
done >"$OUT/probe.txt" 2>&1
echo "== decode 1b, this tree" >>"$OUT/probe.txt"
timeout 60 python3 benchmarks/llm_decode.py --model 1b --configs 70% --contexts 128 --steps 32 --split >>"$OUT/probe.txt" 2>&1

# 3. cuDNN's fused ops against the runtime's dense conv stage
timeout 30 python3 benchmarks/cudnn_fused_probe.py >"$OUT/cudnn_fused.txt" 2>&1

# 4. the whole bitmask sweep, then the suites the fused variant and the dispatcher touch
timeout 120 python3 -m pytest -q -x -p no:cacheprovider -W ignore::DeprecationWarning tests/gpu/test_bitmask_gpu.py \
  >"$OUT/t_bitmask_all.txt" 2>&1
timeout 100 python3 -m pytest -q -p no:cacheprovider -W ignore::DeprecationWarning tests/gpu/test_model_gpu.py \
  tests/gpu/test_bench_gpu.py -k "not paper_sized" >"$OUT/t_model_bench.txt" 2>&1
grep -hE "passed|failed" "$OUT"/t_*.txt
