#!/usr/bin/env python3
"""CPU time of building each device layout the model runtime uploads for one balanced linear (load time).

    PYTHONPATH=src python3 benchmarks/layout_time.py [--shapes 8b|1b] [--configs 50,70,80] [--repeat 2]

Per Llama linear shape and sparsity (fp16, 32 blocks, random weights): seconds (best of --repeat) of the
mask walks' layout (bitmask_segments, walk 5 and the paired walk 6),
the delta walk's (delta_segments) and, for a bitmask-stored file, the offsets a load recovers from the mask
(offsets_from_mask). The model runtime builds all of them per product to time the kernels (model.stages); the
offsets kernel's interleave runs on the GPU.
"""
from __future__ import annotations

import argparse
import functools
import json
import time

import torch

from balprune.formats.balanced import BalancedTensor
from balprune.formats.layouts import bitmask_segments, delta_segments, mask_from_offsets, offsets_from_mask
from balprune.patterns.balanced import balanced_offsets, geometry_for
from balprune.patterns.kinds import BalancedPattern

SHAPES = {"8b": {"q/o": (4096, 4096), "k/v": (1024, 4096), "gate/up": (14336, 4096), "down": (4096, 14336)},
          "1b": {"q/o": (2048, 2048), "k/v": (512, 2048), "gate/up": (8192, 2048), "down": (2048, 8192)}}


def best(f, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        f()
        times.append(time.perf_counter() - t)
    return round(min(times), 3)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="8b")
    ap.add_argument("--configs", default="50,70,80")
    ap.add_argument("--repeat", type=int, default=2)
    a = ap.parse_args()
    for lname, (R, K) in SHAPES[a.shapes].items():
        w = (torch.randn(R, K, generator=torch.Generator().manual_seed(R + K)) * 0.02).half()
        for c in a.configs.split(","):
            pat = BalancedPattern(int(c) / 100, blocks=32)
            g = geometry_for(R, K, pat)
            bt = BalancedTensor.from_offsets(w, pat, balanced_offsets(w, g, dtype=g.index_dtype))
            v, i = bt.values.numpy(), bt.indices.numpy()
            mask = mask_from_offsets(bt.indices, g.blocks, g.block_length)
            L, P = g.block_length, functools.partial
            row = {"layer": lname, "shape": [R, K], "sparsity": c,
                   "walk5_layout": best(P(bitmask_segments, v, i, L), a.repeat),
                   "walk6_layout": best(P(bitmask_segments, v, i, L, paired=True), a.repeat),
                   "delta_layout": best(P(delta_segments, v, i, L), a.repeat),
                   "offsets_from_mask": best(P(offsets_from_mask, mask, g.blocks, L, g.keep), a.repeat)}
            print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
