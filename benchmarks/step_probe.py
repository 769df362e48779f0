#!/usr/bin/env python3
"""Issue 18: where the persistent decode step's time goes (kernels/llama_step.cu), without hardware counters.

Run on the GPU machine from the repository root:

    PYTHONPATH=src python3 benchmarks/step_probe.py [--model 1b] [--config 70%] [--dtype float16]
        [--context 128] [--probes 0,1,2,4,8,23,31,7,15] [--slots 32768] [--replays 20]

The decoder layers of llm_decode.py's random model (same shapes, pruned in memory the same way, 32 blocks per
row), the step kernel launched alone at a fixed cache position: ``replays`` launches captured in one CUDA
graph, best of three replays, us per launch (runtime.measure.measure_us). Each probe is a build of the kernel
with BP_STEP_PROBE set (the kernel's header): a bit set leaves that part out (1 attention, 2 staging of x, 4 task dots, 8 grid
barriers, 16 the weight stream), so what it computes is wrong and only its time counts. The differences
place the time: 0 - 4 is the dots' share the stream does not hide, 23 - 31 the grid barriers (5 per layer),
15 the stream alone against the floor (its bytes at the same run's plain-read bandwidth), 32 asks for no
weights across a barrier. ``--slots``: ring slot sizes to compare (bytes). ``--timeline``: first, builds 64 and 96
(probe 64: thread 0 of every CTA stamps its clock at 15 points of every layer, see the kernel's header), one
eager launch after three: per point, the time since the previous point (us, each CTA's mean over the layers),
median and max over the CTAs. ``--profile N``: N eager launches of the first probe's build and nothing else
(what ncu profiles: benchmarks/device.sh ncu).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from llm_decode import CONFIGS, MODELS, weights  # noqa: E402

from balprune.runtime.measure import Timer, cupy_on_torch_stream, measure_us  # noqa: E402
from balprune.runtime.model.llama import LlamaDecoder, dense_projection  # noqa: E402
from balprune.runtime.model.llama_step import StepKernel  # noqa: E402

PARTS = {1: "attention", 2: "staging", 4: "task dots", 8: "grid barriers", 16: "weight stream",
         32: "stream across barriers"}
#: the kernel's timeline points of a layer (kStampsPerLayer slots, 15 used)
POINTS = ["start", "qkv staged", "qkv rows", "barrier", "attention", "barrier", "o staged", "o rows", "barrier",
          "gate/up staged", "gate/up rows", "barrier", "down staged", "down rows", "barrier"]
STAMPS_PER_LAYER, STAMP_LAYERS, STAMP_CTAS = 16, 64, 160


def left_out(probe: int) -> str:
    return ", ".join(name for bit, name in PARTS.items() if probe & bit) or "nothing"


def timeline(kernel: StepKernel, layers: int) -> dict:
    """One eager launch (after three) of a probe-64 build: per point, us since the previous point (each CTA's
    mean over the layers; the first point: since the previous layer's last), median and max over the CTAs."""
    import cupy as cp

    from balprune.runtime.measure import cupy_on_torch_stream

    slots = STAMPS_PER_LAYER * STAMP_LAYERS + 4
    stamps = cp.ndarray((STAMP_CTAS, slots), dtype=cp.uint64, memptr=kernel.module.get_global("bp_step_stamps"))
    with cupy_on_torch_stream():
        for _ in range(4):
            stamps.fill(0)
            kernel.launch()
        cp.cuda.get_current_stream().synchronize()
    t = stamps[: kernel.grid].get().astype(np.float64)
    edge = STAMPS_PER_LAYER * STAMP_LAYERS
    g0, g1, c0, c1 = t[:, edge], t[:, edge + 1], t[:, edge + 2], t[:, edge + 3]
    ns_per_clock = (g1 - g0) / (c1 - c0)
    pts = t[:, : layers * STAMPS_PER_LAYER].reshape(-1, layers, STAMPS_PER_LAYER)[:, :, : len(POINTS)]
    at = (pts - c0[:, None, None]) * ns_per_clock[:, None, None] / 1e3  # us since the CTA's start
    flat = at.reshape(at.shape[0], -1)
    gaps = np.diff(np.concatenate([np.zeros((flat.shape[0], 1)), flat], axis=1), axis=1)
    gaps = gaps.reshape(at.shape).mean(axis=1)  # [cta, point]
    span = (g1 - g0) / 1e3
    return {"span_us_median": round(float(np.median(span)), 1), "span_us_max": round(float(span.max()), 1),
            "first_start_to_last_end_us": round(float((g1.max() - g0.min()) / 1e3), 1),
            "per_layer_us": {f"{i:2d} {name}": [round(float(np.median(gaps[:, i])), 2), round(float(gaps[:, i].max()), 2)]
                             for i, name in enumerate(POINTS)}}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="1b", choices=list(MODELS))
    ap.add_argument("--config", default="70%", choices=[c for c in CONFIGS if c != "dense"])
    ap.add_argument("--dtype", default="float16", choices=("float32", "float16", "bfloat16"))
    ap.add_argument("--context", type=int, default=128)
    ap.add_argument("--probes", default="0,1,2,4,8,23,31,7,15")
    ap.add_argument("--slots", default="32768", help="ring slot sizes in bytes, comma-separated")
    ap.add_argument("--replays", type=int, default=20)
    ap.add_argument("--builds", default="", help="builds to time beside each other: ';'-separated sets of -D "
                    "defines, each comma-separated ('' = the runtime's build; e.g. ';BP_STEP_X=1'); each probe-0 build's "
                    "output is compared with the first's from the same input")
    ap.add_argument("--timeline", action="store_true", help="the probe 64 and 96 timelines first")
    ap.add_argument("--profile", type=int, default=0, metavar="N",
                    help="only N eager launches of the first probe's build, nothing timed (for ncu: "
                         "benchmarks/device.sh ncu)")
    a = ap.parse_args()
    cfg, dt = MODELS[a.model], getattr(torch, a.dtype)
    bw = Timer(0).read_bandwidth_gbps()
    dec = LlamaDecoder(cfg, weights(cfg, CONFIGS[a.config], dt), dtype=dt, device=torch.device("cuda"),
                       max_len=a.context + 8, make_projection=dense_projection(a.dtype), keep_stacked=True)
    with torch.no_grad(), cupy_on_torch_stream():
        dec.prefill(torch.arange(a.context) % cfg.vocab_size)
    torch.cuda.synchronize()
    head = {"model": a.model, "config": a.config, "dtype": a.dtype, "context": a.context, "read_GBps": round(bw, 1),
            "layers": cfg.num_hidden_layers, "grid_barriers": 5 * cfg.num_hidden_layers,
            "device": torch.cuda.get_device_name()}
    print(json.dumps(head), flush=True)
    if a.profile:
        probe = int(a.probes.split(",")[0])
        kernel = StepKernel(dec, dec.stacked, 0, defines=(f"BP_STEP_PROBE={probe}",) if probe else ())
        with torch.no_grad(), cupy_on_torch_stream():
            for _ in range(a.profile):
                kernel.launch()
        torch.cuda.synchronize()
        return 0
    if a.timeline:
        for probe in (64, 96):
            kernel = StepKernel(dec, dec.stacked, 0, defines=(f"BP_STEP_PROBE={probe}",))
            with torch.no_grad():
                us = measure_us(kernel.launch, reps=a.replays)
                row = {"probe": probe, "left_out": left_out(probe), "us_graph": round(us, 1),
                       **timeline(kernel, cfg.num_hidden_layers)}
            print(json.dumps(row), flush=True)
    h0 = dec.h.clone()

    def one_step(kernel: StepKernel) -> torch.Tensor:
        """The final norm's output of one launch from the same h (the cache slot it appends is rewritten alike)."""
        dec.h.copy_(h0)
        with torch.no_grad(), cupy_on_torch_stream():
            kernel.launch()
        torch.cuda.synchronize()
        return dec.xn.float().clone()

    reference = None
    for slot in (int(s) for s in a.slots.split(",")):
        for build in a.builds.split(";"):
            extra = tuple(d for d in build.split(",") if d)
            for probe in (int(p) for p in a.probes.split(",")):
                defines = ((f"BP_STEP_PROBE={probe}",) if probe else ()) + extra
                kernel = StepKernel(dec, dec.stacked, 0, slot_bytes=slot, defines=defines)
                row = {"probe": probe, "build": build or "runtime"}
                if probe == 0:
                    out = one_step(kernel)
                    if reference is None:
                        reference = out
                    row["max_abs_diff_vs_first"] = float((out - reference).abs().max())
                with torch.no_grad():
                    us = measure_us(kernel.launch, reps=a.replays)
                row |= {"left_out": left_out(probe), "slot_bytes": kernel.slot_bytes, "slots": kernel.slots,
                        "shared_bytes": kernel.shared_bytes, "record_MB": round(kernel.record_bytes / 1e6, 2),
                        "floor_us": round(kernel.record_bytes / bw / 1e3, 1), "us": round(us, 1),
                        "stream_GBps": round(kernel.record_bytes / us / 1e3, 1)}
                print(json.dumps(row), flush=True)
                del kernel
    return 0


if __name__ == "__main__":
    sys.exit(main())
