#!/usr/bin/env bash
# Same-call A/B of two trees on one GPU: $OLD (a folder holding another tree's src/ and kernels/, e.g. from
# `git archive BASE src kernels | tar -x -C $OLD`) vs this tree: bench of two lstm-lm layers alternating old/new
# twice, then `bench --model` (fp16, hot) once each; a table of medians last. Usage: OLD=DIR OUT=DIR bash benchmarks/ab_bench.sh
set -u
: "${OLD:?set OLD to a folder holding the other tree (src/, kernels/)}" "${OUT:?set OUT to a results folder}"
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
W=/tmp/ab; mkdir -p $W
PYTHONPATH=src python3 -m balprune example lstm-lm -o $W/lm.pt --force >/dev/null
PYTHONPATH=src python3 -m balprune prune $W/lm.pt --blocks 32 --sparsity 0.9 -o $W/lm.b.safetensors --force --json >/dev/null
for r in 1 2; do
  for side in old new; do
    if [ $side = old ]; then P=$OLD/src; export BALPRUNE_KERNELS_DIR=$OLD/kernels; else P=src; unset BALPRUNE_KERNELS_DIR; fi
    PYTHONPATH=$P python3 -m balprune bench $W/lm.b.safetensors --layer 'lstm.weight_ih_l0' --layer 'decoder.weight' --batch 1,4 --json $OUT/bench-$side-$r.json > $OUT/bench-$side-$r.txt 2>&1; echo "bench $side $r rc=$?"
  done
done
for side in old new; do
  if [ $side = old ]; then P=$OLD/src; export BALPRUNE_KERNELS_DIR=$OLD/kernels; else P=src; unset BALPRUNE_KERNELS_DIR; fi
  PYTHONPATH=$P python3 -m balprune bench $W/lm.b.safetensors --model --dtype float16 --hot --json $OUT/model-$side.json > $OUT/model-$side.txt 2>&1; echo "model $side rc=$?"
done
python3 benchmarks/ab_table.py $OUT
