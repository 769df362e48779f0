"""Can any kernel meet the GPU issue's batch-1 / batch-8 targets on this GPU? The floor check.

For the target layer (16384 x 8192, 90% balanced, 32 blocks per row: 26 kept of 256 per block,
uint8 indices) this measures, in one run, cold (weights rotated through copies totalling > 4.5x
the L2) and per launch exactly as `balprune bench` times kernels:

- the dense cuBLAS peer the targets are stated against (torch.mv / torch.mm on 16384 x 8192);
- three ways of merely READING as many bytes as the balanced kernel must move (values + indices
  + x + y), each doing no other work worth the name:
  * bp_read_reduce, balprune's streaming-read probe (bench's "plain read" column);
  * cuBLAS GEMV (torch.mv) over a dense matrix holding the same number of bytes (NVIDIA's own
    tuned streaming kernel: a GEMV reads each byte once);
  * torch.sum over a flat tensor of the same bytes (PyTorch's tuned reduction).

It then prints each target as a time (the dense time divided by the target ratio; or the bytes
at 80% of the measured read bandwidth) beside the fastest of the three reads. A target below
every plain read of the kernel's own bytes cannot be met by any kernel that moves those bytes.

    python benchmarks/floor_check.py [--json FILE]
"""

from __future__ import annotations

import argparse
import json

ROWS, COLS, BLOCKS, KEEP = 16384, 8192, 32, 26  # 90%: 26 of 256 per block


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--json")
    ap.add_argument("--iters", type=int, default=200)
    a = ap.parse_args()
    import torch

    from balprune.runtime.measure import Timer, copies_for, cupy_on_torch_stream

    timer = Timer(0)
    l2 = timer.info.l2_bytes
    dev = torch.device("cuda", 0)
    bw = timer.read_bandwidth_gbps()
    out = {"device": timer.info.name, "read_bandwidth_gbps": bw, "rows": []}
    print(f"{timer.info.name}: read bandwidth {bw:.0f} GB/s (4 GiB streaming read), L2 {l2 >> 20} MiB")

    def cold(make, nbytes: int) -> float:
        """Median per-launch us over rotating copies of what make() builds (cold)."""
        fns = [make() for _ in range(copies_for(nbytes, l2))]
        with cupy_on_torch_stream():
            return timer.time(fns, iters=a.iters).median_us

    def gemv(rows: int, dtype, x):
        """A maker of (a fresh dense [rows, COLS] matrix times x): torch.mv / torch.mm = cuBLAS."""
        def make():
            w = torch.randn(rows, COLS, dtype=dtype, device=dev)
            return (lambda: torch.mv(w, x)) if x.dim() == 1 else (lambda: torch.mm(w, x))
        return make

    def flat_sum(n: int, dtype):
        def make():
            t = torch.ones(n, dtype=dtype, device=dev)
            return lambda: t.sum()
        return make

    for dtype, esize, batch, ratio in ((torch.float16, 2, 1, 7.0), (torch.float16, 2, 8, 5.0),
                                       (torch.float32, 4, 1, 8.0)):
        own = ROWS * BLOCKS * KEEP * (esize + 1) + (COLS + ROWS) * esize * batch  # values + u8 indices + x + y
        x = torch.randn(COLS, batch, dtype=dtype, device=dev)
        x = x[:, 0].contiguous() if batch == 1 else x
        dense = cold(gemv(ROWS, dtype, x), ROWS * COLS * esize)
        reads = {"bp_read_reduce": cold(lambda n=own: timer.read_launch(n), own),
                 "cuBLAS GEMV, same bytes": cold(gemv(own // (COLS * esize), dtype, x), own),
                 "torch.sum, same bytes": cold(flat_sum(own // esize, dtype), own)}
        best = min(reads.values())
        name = f"{str(dtype).split('.')[-1]} batch {batch}"
        targets = {f">= {ratio:g}x dense": dense / ratio}
        if batch == 1:
            targets[">= 80% of read bandwidth"] = own / (0.8 * bw * 1e3)
        print(f"\n{name}: the balanced kernel moves {own / 1e6:.1f} MB; dense cuBLAS {dense:.1f} us")
        for k, v in reads.items():
            print(f"  read of those bytes, {k:26s} {v:7.1f} us")
        for k, v in targets.items():
            verdict = "below every plain read: no kernel moving these bytes meets it" if v < best \
                else "above the fastest read"
            print(f"  target {k:26s} needs <= {v:6.1f} us: {verdict} ({best:.1f} us)")
        out["rows"].append({"case": name, "kernel_bytes": own, "dense_us": dense, "reads_us": reads,
                            "targets_us": targets, "fastest_read_us": best})
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
