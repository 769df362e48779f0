"""VGG-16's fc6 / fc7 / fc8 as the model runs them (bias, ReLU on fc6/fc7), graph-replayed, hot.

For each layer (92% balanced, 32 blocks per row, as `benchmarks/model_bench.sh` prunes vgg16):
every candidate the model dispatcher measures (dense torch addmv + relu, each balanced launch
variant), then two floors timed the same way: an almost empty launch (16 bytes read) and a
plain read of the balanced weights' bytes (bench_util.cu's bp_read_reduce). It prints the
5x-dense target (issue 5) as a time beside them: a target below the empty launch plus nothing
cannot be met by any one launch timed this way.

    PYTHONPATH=src python3 benchmarks/diag_fc_layers.py [--dtype float16] [--layers fc7,fc8]
        [--define NAME=VALUE ...] [--json FILE]
"""

from __future__ import annotations

import argparse
import json

import torch

LAYERS = [("fc6", 4096, 25088, True), ("fc7", 4096, 4096, True), ("fc8", 1000, 4096, False)]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dtype", default="float16", choices=("float32", "float16", "bfloat16"))
    ap.add_argument("--json")
    ap.add_argument("--define", action="append", default=[],
                    help="NAME=VALUE for the balanced kernel's build (experiments; repeatable)")
    ap.add_argument("--layers", default="fc6,fc7,fc8")
    a = ap.parse_args()

    from balprune.bench.sweep import sweep_matrix
    from balprune.runtime._linear import TORCH_OF
    from balprune.runtime.measure import Timer, cupy_on_torch_stream, measure_us
    from balprune.runtime.measure import relative_error as rel_error
    from balprune.runtime.model.stages import CupyViews, ModelKernels, Projection, sparse_operator

    tdt = TORCH_OF[a.dtype]
    dev = torch.device("cuda", 0)
    timer = Timer(0)
    kernels, views = ModelKernels(a.dtype, 0), CupyViews()
    results = {}
    for name, rows, cols, relu in LAYERS:
        if name not in a.layers.split(","):
            continue
        bt = sweep_matrix(rows, cols, 0.92, 32, tdt, seed=rows + cols)
        g = torch.Generator().manual_seed(1)
        x = torch.randn(cols, generator=g).to(dev, tdt)
        y = torch.empty(rows, dtype=tdt, device=dev)
        bias = torch.randn(rows, generator=g)
        p = Projection(name, bt.to_dense().reshape(rows, cols).to(dev, tdt), x, y, dtype=a.dtype, kernels=kernels,
                       views=views, pattern="balanced", sparse=sparse_operator(bt, a.dtype, 0, name), bias=bias,
                       relu=relu)
        p.sparse[1].defines = tuple(a.define)  # before any build; the launch variants share it
        ref = p.reference()
        times, errors = {}, {}
        with cupy_on_torch_stream():
            for key, fn in p.candidates().items():
                errors[key] = rel_error(fn(), ref)
                times[key] = measure_us(fn)
            op = p.sparse[1]
            floors = {"almost empty launch": measure_us(timer.read_launch(16)),
                      "plain read of the balanced bytes": measure_us(timer.read_launch(op.weight_bytes))}
        dense = times.pop("dense")
        best = min(times, key=times.get)
        target = dense / 5.0
        print(f"{name} {rows}x{cols} {a.dtype}: balanced {op.weight_bytes / 1e6:.2f} MB, dense {dense:.2f} us, "
              f"best {best} {times[best]:.2f} us ({dense / times[best]:.2f}x); 5x needs <= {target:.2f} us")
        for k, v in sorted(times.items(), key=lambda kv: kv[1]):
            print(f"   {v:7.2f} us  {k}  (error {errors[k]:.1e})")
        for k, v in floors.items():
            print(f"   {v:7.2f} us  floor: {k}{'  (above the 5x target)' if v > target else ''}")
        results[name] = {"dense_us": dense, "times_us": times, "errors": errors, "floors_us": floors,
                         "target_5x_us": target, "weight_bytes": op.weight_bytes}
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"dtype": a.dtype, "device": torch.cuda.get_device_name(0), "layers": results}, f, indent=1)


if __name__ == "__main__":
    main()
