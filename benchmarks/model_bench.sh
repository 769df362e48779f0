#!/usr/bin/env bash
# End-to-end batch-1 model benchmarks (the paper's three workloads) for BENCHMARKS.md:
#   bash benchmarks/model_bench.sh OUT [MODELS] [DTYPES]
# MODELS: comma-separated from lstm-lm (80%), ctc-bilstm (87.5%), vgg16 (92%), default all three;
# DTYPES: default float32,float16. Checkpoints and packed files go to $WORK (default /tmp/bp-models);
# OUT gets one JSON report and the printed tables per model.
set -euo pipefail
OUT=${1:?usage: model_bench.sh OUT [MODELS] [DTYPES]}
MODELS=${2:-lstm-lm,ctc-bilstm,vgg16}
DTYPES=${3:-float32,float16}
WORK=${WORK:-/tmp/bp-models}
BP=${BALPRUNE:-balprune}
mkdir -p "$OUT" "$WORK"
for m in ${MODELS//,/ }; do
  case $m in
    lstm-lm) s=0.8 ;;
    ctc-bilstm) s=0.875 ;;
    vgg16) s=0.92 ;;
    *) echo "unknown model $m" >&2; exit 2 ;;
  esac
  packed="$WORK/$m.balanced.safetensors"
  if [ ! -f "$packed" ]; then
    $BP example "$m" -o "$WORK/$m.safetensors" --force
    $BP prune "$WORK/$m.safetensors" --blocks 32 --sparsity "$s" -o "$packed" --force > /dev/null
  fi
  COLUMNS=200 $BP bench "$packed" --model --dtype "$DTYPES" --json "$OUT/$m.json" | tee "$OUT/$m.txt"
done
