"""Issue 16: a vision runtime end to end in each activation layout and path set, against dense torch, one process.

For a packed VGG / ResNet file and a dtype: balprune's runtime built with its activations NCHW and channels-last
(runtime.model.base.activation_layout), each with ``paths`` auto (every stage on its fastest correct path) and
dense (every conv on cuDNN: what the runtime's layout and fusion give without sparsity), and the dense masked model
in torch in its faster layout (bench.model's peer). Each runner is checked against the float32 reference first
(MODEL_TOLERANCE), then its CUDA graph replayed hot, cuDNN benchmark mode on, float32 in IEEE float32.

    python3 benchmarks/vision_layouts.py PACKED [--dtype float16] [--iters 50]

Prints one JSON line per runner: us per image (median, p10, p90), x torch, relative error, and for the runtime
the count of stages per path.
"""
from __future__ import annotations

import argparse
import collections
import json
import sys

import torch


def main() -> int:
    from balprune.bench.model import _cudnn_benchmark, _faster_layout
    from balprune.bench.run import Session
    from balprune.models import reference_module, reference_outputs, sample_inputs
    from balprune.runtime._linear import TORCH_OF
    from balprune.runtime.measure import MODEL_TOLERANCE, capture_graph, exact_float32, relative_error
    from balprune.runtime.model import load_model, preflight

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("packed")
    ap.add_argument("--dtype", default="float16", choices=tuple(TORCH_OF))
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--runners", default="NCHW/auto,channels-last/auto,NCHW/dense,channels-last/dense")
    a = ap.parse_args()
    checked = preflight(a.packed, (a.dtype,))
    pf, arch = checked
    inputs = sample_inputs(arch)
    with Session(0) as s, _cudnn_benchmark(True), exact_float32():
        dev = torch.device("cuda", 0)
        ref = reference_outputs(reference_module(pf, arch, dtype=torch.float32, device=dev), arch, inputs)
        tm = reference_module(pf, arch, dtype=TORCH_OF[a.dtype], device=dev)
        torch_fn, layout = _faster_layout(tm, arch, inputs, dev, s.timer)
        err = relative_error(torch_fn()[0].float().cpu(), ref)
        t = s.timer.time_calls(capture_graph(torch_fn).replay, iters=a.iters)
        base = t.median_us
        print(json.dumps({"runner": "torch", "layout": layout["layout"], "us": round(base, 2), "p10": round(t.p10_us, 2),
                          "p90": round(t.p90_us, 2), "rel_err": float(f"{err:.2e}")}), flush=True)
        del tm, torch_fn
        for spec in a.runners.split(","):
            act, paths = spec.split("/")
            rt = load_model(a.packed, dtype=a.dtype, paths=paths, checked=checked, activations=act)
            err = relative_error(rt.forward(inputs), ref)
            row = {"runner": f"balprune {paths}", "activations": rt.activations, "rel_err": float(f"{err:.2e}"),
                   "paths": dict(collections.Counter(c.path for c in rt.choices)),
                   "dense_variants": dict(collections.Counter(c.variants.get("dense", "-") for c in rt.choices
                                                              if c.path == "dense"))}
            if err <= MODEL_TOLERANCE[a.dtype]:
                g = rt.capture()
                rt.load_inputs(inputs)
                t = s.timer.time_calls(g.replay, iters=a.iters)
                row.update(us=round(t.median_us, 2), p10=round(t.p10_us, 2), p90=round(t.p90_us, 2),
                           x_torch=round(base / t.median_us, 3))
            print(json.dumps(row), flush=True)
            del rt
            torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
