#!/usr/bin/env bash
# Device calls for BENCHMARKS.md and kernels/NOTES.md, as steps a call composes (a call is <= 10 min and brings
# back <= 8 files, so each mode is sized for one call). Run from the repository root on the device:
#   bash benchmarks/device.sh MODE "$OUT" [BASE]
# MODE (steps in the order they run; each step has its own time limit, so a cut call keeps what it finished):
#   min     checks, decode-ab                               (~4 min: a session's last device minutes)
#   combo   checks, decode-ab, resnet50, probe-ab           (~9 min: one call for a session's changes)
#   vision  vision-tests, resnet50, vgg16                   (~8 min)
#   next    suites, decode, layers-8b                       (~10 min)
#   step    step-tests, checks, decode-ab                   (~8 min: the persistent decode step, kernels/llama_step.cu)
#   probe   step-probe, decode-new, step-tests, base probe, llama-tests (~7 min: the persistent step's time)
#   probe1  the timeline and the full build only, decode-new (~3 min: a session's last device minutes)
#   builds  builds of the persistent step (1B 70%) timed and compared: BASE is step_probe.py's --builds, e.g.
#           ';BP_STEP_X=1' (~2 min)
#   ncu     the persistent step under ncu --set full: details, the SASS lines warps stall on (~3 min)
#   delta   the delta walk: its GPU tests, bitmask_probe on the 8B shapes (hot and cold) for each build in BASE
#           (';'-separated -D lists, '' = this tree's, e.g. ';BP_DELTA_AHEAD=6'), the large shapes with x staged
#           in fp16 at batch 1 (--x-own), the 8B layer at 50% (~9 min); with a previous tree in ab_base, the probe
#           in that tree first
#   delta-pf  the delta walk's GPU tests, bitmask_probe on the 8B shapes (hot and cold) at BP_DELTA_PF_L2 = 0 / 2 / 4
#           / 8 (kernels/NOTES.md v42), then gate/up and down with the grid capped at 3 and 2 CTAs an SM (~7 min)
#   ncu-delta  the delta walk's first launch on 8B gate/up at 50% (batch 1, caches flushed: cold) under ncu --set
#           full: details (stall reasons, DRAM throughput, occupancy), the SASS lines warps stall on (~3 min)
# BASE: a previous tree for the same-run A/B steps (mode builds: the builds to compare), made here (untracked: it travels with the working tree):
#   mkdir ab_base && git archive REV src kernels benchmarks | tar -x -C ab_base
set -uo pipefail
MODE=${1:?usage: device.sh MODE OUT [BASE]}
OUT=${2:?output folder}
BASE=${3:-}
export PYTHONPATH=src PYTHONUNBUFFERED=1
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,clocks.max.sm --format=csv >"$OUT/gpu.txt" 2>&1
T="python3 -m pytest -q -x -p no:cacheprovider -W ignore::DeprecationWarning"
W=/tmp/bp-vision

base_tree() {  # the A/B steps' previous tree, at /tmp/main_tree
  [ -n "$BASE" ] || { echo "this mode needs BASE" >&2; exit 2; }
  [ -d /tmp/main_tree ] || cp -r "$BASE" /tmp/main_tree
}
checks() {  # the risky cases of the bitmask kernel, the fused decode step, the vision activation layouts
  timeout 70 $T tests/gpu/test_bitmask_gpu.py -k "gaps or L1024 or L448 or K1500 or K33 or tall" >"$OUT/t_bitmask.txt" 2>&1
  timeout 110 $T tests/gpu/test_llama_gpu.py -k "fused-ops or graph_replay or overlapped or wide" >"$OUT/t_llama.txt" 2>&1
  timeout 70 $T tests/gpu/test_model_gpu.py -k "activation_layout" >"$OUT/t_vision.txt" 2>&1
}
step_tests() {
  timeout 240 ${T/ -x/} --tb=short --show-capture=no tests/gpu/test_llama_step_gpu.py -k "small or graph or auto or variants" >"$OUT/t_step.txt" 2>&1
  timeout 100 ${T/ -x/} --tb=short --show-capture=no tests/gpu/test_llama_step_gpu.py -k "wide and not graph" >>"$OUT/t_step.txt" 2>&1
}
step_probe() {  # where the persistent step's time goes (benchmarks/step_probe.py): this tree's timeline and parts left
  # out in turn; with "base", the base tree's timeline (appended)
  if [ "${1:-}" = base ]; then
    base_tree
    { echo "== step probe base"
      (cd /tmp/main_tree && timeout 120 python3 benchmarks/step_probe.py --model 1b --config 70% --timeline --probes 0)
    } >>"$OUT/step_probe.txt" 2>&1
    return
  fi
  { echo "== step probe new"
    timeout 200 python3 benchmarks/step_probe.py --model 1b --config 70% --timeline --probes 0,4,8,15,23,31
  } >"$OUT/step_probe.txt" 2>&1
}
decode_new() {  # the 1B step at 70% (head pruned), this tree only: the persistent step against the fused layers
  timeout 80 python3 benchmarks/llm_decode.py --model 1b --configs 70% --contexts 128 --steps 32 --prune-head \
    >"$OUT/decode_new.txt" 2>&1
}
vision_tests() {
  timeout 170 $T tests/gpu/test_model_gpu.py \
    -k "activation_layout or (runtime_matches and (vgg or resnet)) or (graph_replay and (vgg or resnet))" \
    >"$OUT/t_vision.txt" 2>&1
}
suites() {
  timeout 200 python3 -m pytest -q -p no:cacheprovider -W ignore::DeprecationWarning tests/gpu/test_llama_gpu.py \
    tests/gpu/test_lm_step_gpu.py tests/gpu/test_nm24_gpu.py tests/gpu/test_recurrence_gpu.py -k "not paper_sized" \
    >"$OUT/t_suites.txt" 2>&1
}
decode_ab() {  # the 1B step at 70% (head pruned) in the previous tree and in this one
  base_tree
  for t in main new; do
    d=. && [ $t = main ] && d=/tmp/main_tree
    echo "== decode 1b $t" && (cd $d && timeout 55 python3 benchmarks/llm_decode.py --model 1b --configs 70% \
      --contexts 128 --steps 32 --prune-head --split)
  done >"$OUT/decode_ab.txt" 2>&1
}
probe_ab() {  # the bitmask kernel on the 1B shapes, walk 6, previous tree and this one
  base_tree
  for t in main new; do
    d=. && [ $t = main ] && d=/tmp/main_tree
    echo "== probe 1b walk 6 $t" && (cd $d && timeout 25 python3 benchmarks/bitmask_probe.py --shapes 1b \
      --configs 50%,70% --batch 1 --walk 6)
  done >"$OUT/probe_ab.txt" 2>&1
}
decode() {
  timeout 100 python3 benchmarks/llm_decode.py --model 1b --configs 50%,70% --contexts 128,1024 --steps 32 --split \
    --prune-head >"$OUT/decode_1b.txt" 2>&1
}
layers_8b() {
  timeout 180 python3 benchmarks/llm_layers.py --models 8b --dtypes float16 --configs 50,70,80,2:4 --batch 1,4 \
    --index auto --out /tmp/llm-layers >"$OUT/layers_8b.txt" 2>&1
  cp /tmp/llm-layers/table.txt "$OUT/layers_8b_table.txt" 2>/dev/null
}
vision_model() {  # NAME EXAMPLE PRUNE-ARGS... : end to end in each activation layout (vision_layouts.py)
  local name=$1 example=$2
  shift 2
  mkdir -p $W
  [ -f $W/$name.bal.safetensors ] || ( python3 -m balprune example "$example" -o $W/$name.safetensors --force && \
    python3 -m balprune prune $W/$name.safetensors "$@" -o $W/$name.bal.safetensors --force ) >>"$OUT/prep.txt" 2>&1
  timeout 150 python3 benchmarks/vision_layouts.py $W/$name.bal.safetensors --dtype float16 --iters 30 \
    --runners channels-last/auto,channels-last/dense,NCHW/auto >"$OUT/$name.txt" 2>&1
}
case $MODE in
  min) checks; decode_ab ;;
  combo) checks; decode_ab; vision_model r50 resnet50 --block-size 10 --sparsity 0.9; probe_ab ;;
  vision) vision_tests; vision_model r50 resnet50 --block-size 10 --sparsity 0.9
          vision_model vgg16 vgg16 --blocks 32 --sparsity 0.92 ;;
  next) suites; decode; layers_8b ;;
  step) step_tests; checks; decode_ab ;;
  builds) [ -n "$BASE" ] || { echo "builds needs the builds as its third argument (step_probe.py --builds)" >&2; exit 2; }
          timeout 150 python3 benchmarks/step_probe.py --probes 0 --builds "$BASE" >"$OUT/step_builds.txt" 2>&1
          grep '"us"' "$OUT/step_builds.txt" | cut -c1-250 ;;
  ncu) timeout 200 ncu -k regex:llama_step --launch-skip 2 --launch-count 1 --set full --import-source no -f \
         -o "$OUT/step" python3 benchmarks/step_probe.py --profile 3 >"$OUT/ncu_run.txt" 2>&1
       ncu -i "$OUT/step.ncu-rep" --page details >"$OUT/ncu_details.txt" 2>&1
       ncu -i "$OUT/step.ncu-rep" --page source --csv --print-source sass >/tmp/src.csv 2>"$OUT/ncu_src_err.txt"
       python3 benchmarks/ncu_top.py /tmp/src.csv --top 80 >"$OUT/ncu_top.txt" 2>&1
       gzip -c /tmp/src.csv >"$OUT/ncu_src.csv.gz"
       tail -3 "$OUT/ncu_run.txt"; grep -E "Duration|Warp Cycles Per Issued|Issued Warp|Stall|Eligible" "$OUT/ncu_details.txt" | head -20
       head -40 "$OUT/ncu_top.txt" | cut -c1-200 ;;
  delta) timeout 120 $T tests/gpu/test_bitmask_gpu.py -k "long_runs or walk7" >"$OUT/t_bitmask.txt" 2>&1
         IFS=';' read -ra builds <<<"${BASE:-}"
         [ ${#builds[@]} -gt 0 ] || builds=("")
         if [ -d ab_base ]; then  # a previous tree (see BASE above), timed first: this tree's change against it
           echo "== probe 8b base tree"
           (cd ab_base && timeout 100 python3 benchmarks/bitmask_probe.py --shapes 8b --configs 50%,70% --batch 1 \
             --walk 7 --cold)
         fi >"$OUT/probe_delta.txt" 2>&1
         for b in "${builds[@]}"; do
           echo "== probe 8b defines=$b"
           timeout 100 python3 benchmarks/bitmask_probe.py --shapes 8b --configs 50%,70% --batch 1 --walk 7 --cold \
             ${b:+--defines "$b"}
         done >>"$OUT/probe_delta.txt" 2>&1
         { echo "== probe 8b x staged in fp16 at batch 1"
           timeout 60 python3 benchmarks/bitmask_probe.py --shapes 8b --layers down,gate/up --configs 50%,70% \
             --batch 1 --walk 7 --cold --x-own; } >>"$OUT/probe_delta.txt" 2>&1
         grep -oE '== .*|"layer": "[^"]*"|"config": "[^"]*"|"(bitmask|bitmask_cold|read_cold|dense_cold)": [0-9.]+' \
           "$OUT/probe_delta.txt" | paste -sd' ' | sed 's/ == /\n== /g'
         timeout 170 python3 benchmarks/llm_layers.py --models 8b --dtypes float16 --configs 50 --batch 1 --index auto \
           --out /tmp/llm-layers >"$OUT/layers_8b.txt" 2>&1
         cp /tmp/llm-layers/table.txt "$OUT/layers_8b_table.txt" 2>/dev/null ;;
  delta-pf)
         timeout 100 $T tests/gpu/test_bitmask_gpu.py -k "long_runs or walk7" >"$OUT/t_bitmask.txt" 2>&1
         tail -1 "$OUT/t_bitmask.txt"
         for b in "" BP_DELTA_PF_L2=2 BP_DELTA_PF_L2=4 BP_DELTA_PF_L2=8; do
           echo "== probe 8b defines=$b"
           timeout 85 python3 benchmarks/bitmask_probe.py --shapes 8b --configs 50%,70% --batch 1 --walk 7 --cold \
             ${b:+--defines "$b"}
         done >"$OUT/probe_pf.txt" 2>&1
         for c in 3 2; do
           echo "== probe 8b ctas per SM $c"
           timeout 55 python3 benchmarks/bitmask_probe.py --shapes 8b --layers gate/up,down --configs 50%,70% --batch 1 \
             --walk 7 --cold --ctas-per-sm $c
         done >>"$OUT/probe_pf.txt" 2>&1
         grep -oE '^== .*|"layer": "[^"]*"|"config": "[^"]*"|"(bitmask|bitmask_cold|read_cold)": [0-9.]+' \
           "$OUT/probe_pf.txt" | paste -sd' ' | sed 's/ == /\n== /g' ;;
  ncu-delta)
         timeout 200 ncu -k regex:balanced_delta_spmm --launch-count 1 --set full --import-source no -f -o "$OUT/delta" \
           python3 benchmarks/bitmask_probe.py --shapes 8b --layers gate/up --configs 50% --batch 1 --walk 7 \
           >"$OUT/ncu_run.txt" 2>&1
         ncu -i "$OUT/delta.ncu-rep" --page details >"$OUT/ncu_details.txt" 2>&1
         ncu -i "$OUT/delta.ncu-rep" --page source --csv --print-source sass >/tmp/src.csv 2>"$OUT/ncu_src_err.txt"
         python3 benchmarks/ncu_top.py /tmp/src.csv --top 80 >"$OUT/ncu_top.txt" 2>&1
         grep -E "Duration|DRAM Throughput|Memory Throughput|Achieved Occupancy|Warp Cycles Per Issued|Issued Warp|Stall|Eligible" \
           "$OUT/ncu_details.txt" | head -24
         head -30 "$OUT/ncu_top.txt" | cut -c1-200 ;;
  probe1) { echo "== step probe new"; timeout 120 python3 benchmarks/step_probe.py --model 1b --config 70% --timeline \
            --probes 0; } >"$OUT/step_probe.txt" 2>&1; decode_new ;;
  probe) step_probe; decode_new; step_tests; step_probe base
         timeout 110 $T tests/gpu/test_llama_gpu.py -k "fused-ops or graph_replay or overlapped or wide" >"$OUT/t_llama.txt" 2>&1 ;;
  *) echo "unknown mode $MODE (min, combo, vision, next, step, probe, probe1, builds, ncu, delta, delta-pf, ncu-delta)" >&2; exit 2 ;;
esac
grep -hE "passed|failed|error" "$OUT"/t_*.txt 2>/dev/null | tail -6
grep -h "ms_per_token\|products_ms\|== " "$OUT"/decode*.txt 2>/dev/null | cut -c1-400
cut -c1-300 "$OUT"/step_probe.txt 2>/dev/null
cut -c1-300 "$OUT"/r50.txt "$OUT"/vgg16.txt 2>/dev/null | tail -10
