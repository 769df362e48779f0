"""Probe (issue 16, not yet run on a GPU): cuDNN's fused conv + bias + ReLU (+ residual add) against what the
vision runtime's dense conv stage does today.

runtime/model/conv_stage.py runs a dense conv as conv2d and then the ReLU (or the residual add and ReLU) as the
launch that moves the result into the stage's NCHW buffer, in NCHW or around a channels-last copy of the input.
torch's own channels-last model keeps every activation channels-last. cuDNN also has one-launch fused ops
(aten.cudnn_convolution_relu / cudnn_convolution_add_relu, with out= variants that write the stage's buffer).
This times the five ways on ResNet-50-like shapes before the runtime takes any of them.

    python3 benchmarks/cudnn_fused_probe.py [--dtype float16]

One JSON line per shape: us per call (CUDA graph of 20 calls, median of 7 replays, cudnn.benchmark on) and each
variant's relative error against a float64 conv; a variant that cannot run gives its error message instead.
"""
from __future__ import annotations

import argparse
import json
import sys

import torch
import torch.nn.functional as F

#: (C_in, C_out, H = W, kernel, stride, residual added before the ReLU)
SHAPES = ((64, 64, 56, 3, 1, False), (256, 64, 56, 1, 1, False), (64, 256, 56, 1, 1, True),
          (256, 256, 14, 3, 1, False), (1024, 256, 14, 1, 1, False), (512, 2048, 7, 1, 1, True),
          (128, 128, 56, 3, 2, False))


def graph_us(fn, calls: int = 20) -> float:
    """Median us per call of ``fn`` replayed from a CUDA graph of ``calls`` calls."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    times = []
    for _ in range(7):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        graph.replay()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b) * 1000.0 / calls)
    return sorted(times)[len(times) // 2]


def variants(x, w, b, r, out, stride: int, pad: int) -> dict:
    """name -> (run, its output buffer): the runtime's two dense forms, torch's all-channels-last form, and
    cuDNN's fused op in NCHW and in channels-last."""
    aten = torch.ops.aten
    cl = torch.channels_last
    xc, wc, outc = x.contiguous(memory_format=cl), w.contiguous(memory_format=cl), out.contiguous(memory_format=cl)
    rc = None if r is None else r.contiguous(memory_format=cl)
    st, pd = [stride, stride], [pad, pad]

    def finish(y, res, dst):  # the ReLU (after the residual add) as the move into dst
        if res is None:
            torch.clamp_min(y, 0, out=dst)
        else:
            torch.add(y, res, out=dst)
            dst.relu_()

    def fused(xi, wi, res, dst):
        if res is None:
            aten.cudnn_convolution_relu.out(xi, wi, b, st, pd, [1, 1], 1, out=dst)
        else:
            aten.cudnn_convolution_add_relu.out(xi, wi, res, 1.0, b, st, pd, [1, 1], 1, out=dst)

    return {
        "runtime_nchw": (lambda: finish(F.conv2d(x, w, b, stride=stride, padding=pad), r, out), out),
        "runtime_channels_last": (lambda: finish(F.conv2d(x.contiguous(memory_format=cl), wc, b, stride=stride,
                                                          padding=pad), r, out), out),
        "all_channels_last": (lambda: finish(F.conv2d(xc, wc, b, stride=stride, padding=pad), rc, outc), outc),
        "fused_nchw": (lambda: fused(x, w, r, out), out),
        "fused_channels_last": (lambda: fused(xc, wc, rc, outc), outc),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dtype", default="float16", choices=("float16", "bfloat16", "float32"))
    a = ap.parse_args()
    dt = getattr(torch, a.dtype)
    torch.backends.cudnn.benchmark = True
    gen = torch.Generator(device="cuda").manual_seed(0)
    for cin, cout, hw, k, stride, residual in SHAPES:
        pad = k // 2
        oh = (hw + 2 * pad - k) // stride + 1
        x = torch.randn(1, cin, hw, hw, device="cuda", generator=gen).to(dt)
        w = (torch.randn(cout, cin, k, k, device="cuda", generator=gen) * 0.05).to(dt)
        b = torch.randn(cout, device="cuda", generator=gen).to(dt)
        r = torch.randn(1, cout, oh, oh, device="cuda", generator=gen).to(dt) if residual else None
        out = torch.empty(1, cout, oh, oh, device="cuda", dtype=dt)
        ref = F.conv2d(x.double(), w.double(), b.double(), stride=stride, padding=pad)
        ref = (ref if r is None else ref + r.double()).relu()
        row = {"shape": {"cin": cin, "cout": cout, "hw": hw, "k": k, "stride": stride, "residual": residual},
               "dtype": a.dtype}
        for name, (run, dst) in variants(x, w, b, r, out, stride, pad).items():
            try:
                dst.fill_(float("nan"))
                run()
                torch.cuda.synchronize()
                row[name] = round(graph_us(run), 2)
                row[name + "_rel_err"] = float(f"{float((dst.double() - ref).norm() / ref.norm()):.1e}")
            except Exception as exc:  # an op this torch / cuDNN does not have for these operands
                row[name] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}"
        print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
