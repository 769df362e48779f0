"""Where the time of a small batch-1 layer goes (kernels/NOTES.md v5/v6): graph-replayed, hot.

For each shape: balprune's kernel with its launch variants, the same kernel built with
-DBP_DIAG=3 (x staging skipped: wrong results, timing only), a plain read of its bytes, an
almost empty launch, and dense cuBLAS. Usage: PYTHONPATH=src python3 benchmarks/diag_small_layers.py
"""

from __future__ import annotations

import torch

from balprune.bench.sweep import sweep_matrix
from balprune.runtime.balanced import BalancedLinear
from balprune.runtime.measure import cupy_on_torch_stream, measure_us
from balprune.runtime.model.stages import launch_variants

SHAPES = [("lstm fused 6000x3004 80%", 6000, 3004, 0.8, 64), ("bilstm hh 4096x1024 87.5%", 4096, 1024, 0.875, 32),
          ("fc6 4096x25088 92%", 4096, 25088, 0.92, 32), ("fc7 4096x4096 92%", 4096, 4096, 0.92, 32)]


def main() -> None:
    import cupy as cp

    from balprune.runtime.measure import Timer

    timer = Timer(0)
    dev = torch.device("cuda", 0)
    for label, rows, cols, s, blocks in SHAPES:
        bt = sweep_matrix(rows, cols, s, blocks, torch.float16)
        g = bt.geometry
        op = BalancedLinear(bt.values, bt.indices, cols=g.cols, block_length=g.block_length)
        x = torch.randn(cols, device=dev).half()
        y = torch.empty(rows, device=dev).half()
        xc, yc = cp.from_dlpack(x), cp.from_dlpack(y)
        out = {}
        with cupy_on_torch_stream():
            for name, v in launch_variants(op, 1).items():
                out[name or "default"] = measure_us(v.prepared_launch(xc, yc, 1))
            for name, v in launch_variants(BalancedLinear(bt.values, bt.indices, cols=g.cols, block_length=g.block_length,
                                                          defines=("BP_DIAG=3",)), 1).items():
                out["no x staging " + (name or "default")] = measure_us(v.prepared_launch(xc, yc, 1))
            out["plain read of the bytes"] = measure_us(timer.read_launch(op.weight_bytes))
            out["near-empty launch"] = measure_us(timer.read_launch(16))
            W = bt.to_dense().to(dev).half()
            out["dense cuBLAS"] = measure_us(lambda W=W, x=x, y=y: torch.mv(W, x, out=y))
        print(f"{label}: {op.weight_bytes / 1e6:.1f} MB, B={g.blocks} L={g.block_length} k={g.keep}")
        for k, v in sorted(out.items(), key=lambda kv: kv[1]):
            print(f"   {v:7.2f} us  {k}")


def cold_big() -> None:
    """16384 x 8192 at 90%, batch 1, cold (weight copies > 4.5x L2, rotated), eager: staging variants."""
    import cupy as cp

    from balprune.runtime.measure import Timer, copies_for

    timer = Timer(0)
    dev = torch.device("cuda", 0)
    for dt in (torch.float32, torch.float16):
        bt = sweep_matrix(16384, 8192, 0.9, 32, dt)
        g = bt.geometry
        x = torch.randn(8192, device=dev).to(dt)
        y = torch.empty(16384, device=dev).to(dt)
        xc, yc = cp.from_dlpack(x), cp.from_dlpack(y)
        for label, kw in (("default", {}), ("x raw", {"staging": "raw"}),
                          ("x raw, 512 threads", {"staging": "raw", "threads": 512})):
            ops = []
            n = None
            while n is None or len(ops) < n:
                ops.append(BalancedLinear(bt.values, bt.indices, cols=g.cols, block_length=g.block_length, **kw))
                n = copies_for(ops[0].weight_bytes, timer.info.l2_bytes)
            t = timer.time([o.prepared_launch(xc, yc, 1) for o in ops], iters=200)
            print(f"16384x8192 90% {str(dt).split('.')[-1]} b1 cold: {label}: {t.median_us:.1f} us")
            del ops
            cp.get_default_memory_pool().free_all_blocks()


if __name__ == "__main__":
    import sys

    cold_big() if "--cold-big" in sys.argv else main()
