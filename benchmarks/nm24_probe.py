#!/usr/bin/env python3
"""Issue 15, first device run of kernels/nm24_sparse_mma.cu: which metadata word layout does mma.sp read?

Run on the GPU machine from the repository root:

    PYTHONPATH=src python3 benchmarks/nm24_probe.py OUT.json

formats.layouts.nm24_records writes each lane's metadata word as my reading of the PTX ISA's figure
for m16n8k32 .f16 ("h1": word (g, t) holds blocks 4h..4h+3 of row g in bits 0-15 and of row g+8 in
bits 16-31). "h2" is the other plausible reading (rows g and g+8 in separate words). The probe runs
Nm24Linear with the records as built (h1) and re-arranged to h2, against float64, and prints and
writes each relative error: the right layout gives ~1e-3 (fp16 output rounding), the wrong one O(1).
If h2 wins, nm24_records and its CPU model change together (tests/test_nm24_layout.py).
"""

from __future__ import annotations

import json
import sys

import numpy as np
import torch


def h2(rec: np.ndarray) -> np.ndarray:
    """The records with each lane pair's metadata words re-arranged from h1 to h2."""
    r = rec.copy()
    m = r[:, :, 1024:].copy().view("<u4").reshape(r.shape[0], r.shape[1], 8, 4)  # [g, t]
    out = np.empty_like(m)
    for par in range(2):
        w0, w1 = m[..., 2 * par], m[..., 2 * par + 1]
        out[..., 2 * par] = (w0 & 0xFFFF) | ((w1 & 0xFFFF) << 16)
        out[..., 2 * par + 1] = (w0 >> 16) | ((w1 >> 16) << 16)
    r[:, :, 1024:] = out.reshape(r.shape[0], r.shape[1], 32).astype("<u4").view(np.uint8).reshape(
        r.shape[0], r.shape[1], 128)
    return r


def main() -> int:
    import cupy as cp

    from balprune.formats.balanced import BalancedTensor
    from balprune.patterns.balanced import balanced_offsets, geometry_for
    from balprune.patterns.kinds import BalancedPattern
    from balprune.runtime.nm24 import Nm24Linear

    res = {}
    for rows, cols in [(64, 256), (4096, 4096)]:
        w = torch.randn(rows, cols, generator=torch.Generator().manual_seed(1)).half()
        p = BalancedPattern(0.5, blocks=None, block_size=4)
        g = geometry_for(rows, cols, p)
        bt = BalancedTensor.from_offsets(w, p, balanced_offsets(w, g, dtype=g.index_dtype))
        op = Nm24Linear.from_tensor(bt)
        x = torch.randn(cols, generator=torch.Generator().manual_seed(2)).half()
        ref = bt.to_dense().double() @ x.double()
        for name in ("h1", "h2"):
            if name == "h2":
                op.records_dev = cp.asarray(h2(cp.asnumpy(op.records_dev)))
            y = op(x.cuda()).double().cpu()
            err = float((y - ref).norm() / ref.norm())
            res[f"{rows}x{cols}/{name}"] = err
            print(rows, cols, name, "rel err", err, flush=True)
    with open(sys.argv[1], "w") as f:
        json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
