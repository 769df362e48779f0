"""ncu target: the fused LSTM-1500 gate matrix (6000x3004, 80%, fp16) at batch 1 with three launch settings.

Usage (device): ncu --section SpeedOfLight --section LaunchStats --section WarpStateStats python3 benchmarks/ncu_small_layer.py
"""
import cupy as cp
import torch

from balprune.bench.sweep import sweep_matrix
from balprune.runtime.balanced import BalancedLinear

rows, cols, s, blocks = 6000, 3004, 0.8, 64
bt = sweep_matrix(rows, cols, s, blocks, torch.float16)
g = bt.geometry
x = cp.asarray(torch.randn(cols).half().numpy())
y = cp.empty(rows, dtype=cp.float16)
for kw in ({}, {"staging": "raw", "threads": 256}, {"staging": "raw", "threads": 1024}):
    op = BalancedLinear(bt.values, bt.indices, cols=g.cols, block_length=g.block_length, **kw)
    f = op.prepared_launch(x, y, 1)
    for _ in range(3):
        f()
    cp.cuda.Device().synchronize()
