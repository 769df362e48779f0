#!/usr/bin/env python3
"""Issue 16: the balanced direct convolution (kernels/balanced_conv.cu) against cuDNN, layer by layer.

Run on the GPU machine from the repository root:

    PYTHONPATH=src python3 benchmarks/conv_layers.py [--nets vgg16,resnet50] [--dtypes float16,float32]
        [--batch 1] [--json OUT.json]

For every conv shape of VGG-16 (at 92% balanced) and ResNet-50 (at 90%; 224x224 input), random
weights, 32 blocks per row where the row allows it: per-call device time (us) of
``BalancedConv2d`` with its bias + ReLU epilogue (each of its kernels that takes the shape: the tiled
one, the small-map one up to MAP_NAMED_RUNS runs of pixels, the gather one on any map; the fastest is the
layer's sparse time), and of ``relu(conv2d(x, W, b))`` in torch with
cudnn.benchmark on, NCHW and channels-last, each replayed from a CUDA graph (hot: what the layer
costs inside a captured model; balprune.runtime.measure.measure_us). Also the sparse output's
norm-wise error against float64 conv2d of the same weights and input, and the ratio of the faster
dense layout to the sparse kernel. One JSON line per layer, then totals per net and dtype.
"""
from __future__ import annotations

import argparse
import json
import sys

import torch
from torch.nn import functional as F

from balprune.formats.balanced import BalancedTensor
from balprune.patterns.balanced import balanced_offsets, geometry_for
from balprune.patterns.kinds import BalancedPattern
from balprune.runtime.conv import (
    MAP_NAMED_RUNS,
    BalancedConv2d,
    ConvShape,
    gather_launch_config,
    launch_config,
    map_launch_config,
)
from balprune.runtime.measure import cupy_on_torch_stream, measure_us

# name -> (C_in, C_out, k, stride, padding, H=W of the input); one entry per distinct shape, with
# how many times the net runs it
VGG16 = {f"features.{i}": (cin, cout, 3, 1, 1, hw, 1) for i, cin, cout, hw in (
    (0, 3, 64, 224), (2, 64, 64, 224), (5, 64, 128, 112), (7, 128, 128, 112), (10, 128, 256, 56),
    (12, 256, 256, 56), (14, 256, 256, 56), (17, 256, 512, 28), (19, 512, 512, 28), (21, 512, 512, 28),
    (24, 512, 512, 14), (26, 512, 512, 14), (28, 512, 512, 14))}
# torchvision ResNet-50 (v1.5: the stride sits in the 3x3); the last field counts the blocks using it
RESNET50 = {
    "conv1(7x7,dense-ok)": (3, 64, 7, 2, 3, 224, 1),
    "l1.conv1-first": (64, 64, 1, 1, 0, 56, 1), "l1.conv1": (256, 64, 1, 1, 0, 56, 2),
    "l1.conv2": (64, 64, 3, 1, 1, 56, 3), "l1.conv3": (64, 256, 1, 1, 0, 56, 3), "l1.down": (64, 256, 1, 1, 0, 56, 1),
    "l2.conv1-first": (256, 128, 1, 1, 0, 56, 1), "l2.conv2-s2": (128, 128, 3, 2, 1, 56, 1),
    "l2.conv1": (512, 128, 1, 1, 0, 28, 3), "l2.conv2": (128, 128, 3, 1, 1, 28, 3),
    "l2.conv3": (128, 512, 1, 1, 0, 28, 4), "l2.down": (256, 512, 1, 2, 0, 56, 1),
    "l3.conv1-first": (512, 256, 1, 1, 0, 28, 1), "l3.conv2-s2": (256, 256, 3, 2, 1, 28, 1),
    "l3.conv1": (1024, 256, 1, 1, 0, 14, 5), "l3.conv2": (256, 256, 3, 1, 1, 14, 5),
    "l3.conv3": (256, 1024, 1, 1, 0, 14, 6), "l3.down": (512, 1024, 1, 2, 0, 28, 1),
    "l4.conv1-first": (1024, 512, 1, 1, 0, 14, 1), "l4.conv2-s2": (512, 512, 3, 2, 1, 14, 1),
    "l4.conv1": (2048, 512, 1, 1, 0, 7, 2), "l4.conv2": (512, 512, 3, 1, 1, 7, 2),
    "l4.conv3": (512, 2048, 1, 1, 0, 7, 3), "l4.down": (1024, 2048, 1, 2, 0, 14, 1),
}
NETS = {"vgg16": (VGG16, 0.92), "resnet50": (RESNET50, 0.90)}


#: Columns per balanced block at least (where the row has them).
MIN_BLOCK = 10


def _blocks(k: int) -> int:
    """32 blocks per row (the paper's setting) where that leaves blocks of at least MIN_BLOCK columns, else
    blocks of about MIN_BLOCK: a block of 2 or 4 columns cannot be 90% sparse (it keeps 1 of them), which is why
    ResNets are pruned with --block-size 10 (README)."""
    return 32 if k >= 32 * MIN_BLOCK else max(1, k // MIN_BLOCK)


def layer_row(name, spec, sparsity, dtype, batch) -> dict:
    cin, cout, k, stride, pad, hw, count = spec
    gen = torch.Generator().manual_seed(cin * 131 + cout * 7 + k)
    w = (torch.randn(cout, cin * k * k, generator=gen) * 0.02).to(dtype)
    pattern = BalancedPattern(sparsity, blocks=_blocks(cin * k * k))
    g = geometry_for(cout, cin * k * k, pattern)
    bt = BalancedTensor.from_offsets(w, pattern, balanced_offsets(w, g, dtype=g.index_dtype))
    bias = (torch.randn(cout, generator=gen) * 0.1).to(dtype).float()  # the dense peer's bias, exactly
    shape = ConvShape(cin, hw, hw, cout, k, k, stride, pad)
    # every kernel wherever the model runtime times it (the map kernel by name: MAP_NAMED_RUNS; gather: any map)
    kernels = ["tiled"] + (["map"] if map_launch_config(shape, batch, MAP_NAMED_RUNS) is not None else []) + ["gather"]
    ops = {kn: BalancedConv2d(bt.values, bt.indices, in_channels=cin, kh=k, kw=k, block_length=g.block_length,
                              stride=stride, padding=pad, bias=bias, validate=False, name=name, kernel=kn)
           for kn in kernels}
    x = torch.randn(batch, cin, hw, hw, generator=gen).to(dtype).cuda()
    wd = bt.to_dense().reshape(cout, cin, k, k).to(dtype).cuda()
    bd = bias.to(dtype).cuda()
    ref = F.relu(F.conv2d(x.double(), wd.double(), bd.double(), stride, pad))
    errs, times = {}, {}
    for kn, op in ops.items():
        # the prepared launch on static buffers: what the model runtime binds (runtime.model.conv_stage)
        y = torch.empty_like(ref, dtype=dtype)
        with cupy_on_torch_stream():
            launch = op.prepared_launch(x, y, relu=True)
            launch()
            torch.cuda.synchronize()
            errs[kn] = float((y.double() - ref).norm() / ref.norm())
            times[kn] = round(measure_us(launch), 2)
    fastest = min(times, key=times.get)
    t_sparse, err = times[fastest], errs[fastest]
    t_nchw = measure_us(lambda: F.relu(F.conv2d(x, wd, bd, stride, pad)))
    xcl, wcl = x.to(memory_format=torch.channels_last), wd.to(memory_format=torch.channels_last)
    t_cl = measure_us(lambda: F.relu(F.conv2d(xcl, wcl, bd, stride, pad)))
    cfg = {"tiled": lambda: launch_config(shape, batch), "map": lambda: map_launch_config(shape, batch, MAP_NAMED_RUNS),
           "gather": lambda: gather_launch_config(shape, ops["gather"].taps_per_channel, batch)}[fastest]()
    best = min(t_nchw, t_cl)
    return {"layer": name, "shape": [cout, cin, k, k], "stride": stride, "hw": hw, "count": count,
            "sparsity": sparsity, "sparsity_achieved": round(float((bt.to_dense() == 0).double().mean()), 4),
            "block_length": g.block_length, "dtype": str(dtype).split(".")[-1],
            "batch": batch, "rel_err": err, "sparse_us": round(t_sparse, 2), "kernel": fastest, "kernels_us": times,
            "kernels_err": errs, "cudnn_nchw_us": round(t_nchw, 2),
            "cudnn_cl_us": round(t_cl, 2), "dense/sparse": round(best / t_sparse, 3),
            "launch": {k2: v for k2, v in cfg.items() if k2 not in ("grid", "block")} | {
                "grid": list(cfg["grid"]), "block": list(cfg["block"])}}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--nets", default="vgg16,resnet50")
    ap.add_argument("--dtypes", default="float16,float32")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--layers", default="", help="comma-separated layer names (default: all)")
    ap.add_argument("--json", default="")
    a = ap.parse_args()
    torch.backends.cudnn.benchmark = True
    rows, totals = [], []
    pick = {s for s in a.layers.split(",") if s}
    for net in a.nets.split(","):
        shapes, sparsity = NETS[net]
        for dname in a.dtypes.split(","):
            dtype = getattr(torch, dname)
            tot = {"net": net, "dtype": dname, "sparse_us": 0.0, "cudnn_best_us": 0.0, "best_of_both_us": 0.0}
            for name, spec in shapes.items():
                if pick and name not in pick:
                    continue
                try:
                    r = layer_row(name, spec, sparsity, dtype, a.batch)
                except Exception as e:  # one failing shape must not hide the others' figures
                    r = {"layer": name, "dtype": dname, "error": f"{type(e).__name__}: {e}"[:400]}
                    print(json.dumps(r), flush=True)
                    rows.append(r)
                    continue
                print(json.dumps(r), flush=True)
                rows.append(r)
                n = spec[-1]
                best = min(r["cudnn_nchw_us"], r["cudnn_cl_us"])
                tot["sparse_us"] += n * r["sparse_us"]
                tot["cudnn_best_us"] += n * best
                tot["best_of_both_us"] += n * min(best, r["sparse_us"])
            tot = {k: (round(v, 1) if isinstance(v, float) else v) for k, v in tot.items()}
            print(json.dumps({"total": tot}), flush=True)
            totals.append(tot)
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"rows": rows, "totals": totals}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
