"""BalancedConv2d (kernels/balanced_conv.cu, direct convolution) on a GPU against float64 conv2d.

Every shape class the kernel takes: kernel sides 1, 3, 5, 7; strides 1 and 2; paddings 0..3; channel
counts that are not a multiple of the staged chunk or of the CTA's channel group; outputs that end
inside a 32-column tile and inside a row tile; blocks that straddle input channels; batch 1 and 3;
fp32, fp16, bf16; bias and ReLU. The reference is float64 conv2d of the same (dtype-rounded) weights
and inputs; the bound is norm-wise: the output's one rounding to the dtype plus fp32 accumulation.
Outputs start as NaN so an unwritten element fails. Both kernels: the tiled one on every case, the
small-map one (balanced_conv2d_map, with its atomics and epilogue when it slices the input channels)
on every case whose map it takes.
"""

from __future__ import annotations

import pytest
import torch
from helpers import gpu_skip_reason
from torch.nn import functional as F

SKIP = gpu_skip_reason()
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(SKIP is not None, reason=SKIP or "")]

from balprune.formats.balanced import BalancedTensor  # noqa: E402
from balprune.patterns.balanced import balanced_offsets, geometry_for  # noqa: E402
from balprune.patterns.kinds import BalancedPattern  # noqa: E402

BOUND = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
DTYPES = tuple(BOUND)
# name -> (C_out, C_in, k, stride, padding, H, W, sparsity, blocks)
CASES = {
    "vgg-first-3x3": (64, 3, 3, 1, 1, 56, 56, 0.5, 3),
    "3x3-ragged": (37, 19, 3, 1, 1, 23, 45, 0.9, 8),
    "3x3-s2": (20, 16, 3, 2, 1, 33, 31, 0.75, 16),
    "1x1-bottleneck": (48, 64, 1, 1, 0, 14, 14, 0.9, 8),
    "1x1-s2-downsample": (40, 24, 1, 2, 0, 15, 15, 0.5, 4),
    "5x5-p2": (8, 6, 5, 1, 2, 20, 70, 0.8, 5),
    "7x7-s2-p3-stem": (16, 3, 7, 2, 3, 64, 64, 0.9, 7),
    "deep-small-map": (96, 128, 3, 1, 1, 7, 7, 0.92, 32),
    "padding-3-3x3": (4, 5, 3, 1, 3, 5, 5, 0.5, 5),
    "blocks-straddle": (6, 5, 3, 1, 0, 9, 40, 0.6, 7),
    "stem-fill-up": (16, 3, 7, 2, 3, 64, 64, 0.5, 32),  # the last block keeps padding columns
}


def _weight(case: str, dtype: torch.dtype) -> BalancedTensor:
    cout, cin, k, _, _, _, _, sparsity, blocks = CASES[case]
    w = torch.randn(cout, cin, k, k, generator=torch.Generator().manual_seed(cout * 31 + cin)).to(dtype)
    m = w.reshape(cout, -1)
    pattern = BalancedPattern(sparsity, blocks=blocks)
    g = geometry_for(*m.shape, pattern)
    return BalancedTensor.from_offsets(m, pattern, balanced_offsets(m, g, dtype=g.index_dtype))  # the [C_out, K] view


def _check(case: str, dtype: torch.dtype, batch: int, bias: bool, relu: bool, kernel: str = "tiled") -> None:
    from balprune.runtime.conv import MAP_NAMED_RUNS, BalancedConv2d, ConvShape, map_launch_config

    cout, cin, k, stride, pad, h, w, _, _ = CASES[case]
    shape = ConvShape(cin, h, w, cout, k, k, stride, pad)
    if kernel == "map" and map_launch_config(shape, batch, MAP_NAMED_RUNS) is None:
        pytest.skip(f"{case}: the small-map kernel does not take this map (the tiled kernel's)")
    bt = _weight(case, dtype)
    dense = bt.to_dense().double().reshape(cout, cin, k, k)
    b = torch.randn(cout, generator=torch.Generator().manual_seed(5)) if bias else None
    op = BalancedConv2d(bt.values, bt.indices, in_channels=cin, kh=k, kw=k, block_length=bt.geometry.block_length,
                        stride=stride, padding=pad, bias=b, kernel=kernel)
    x = torch.randn(batch, cin, h, w, generator=torch.Generator().manual_seed(7)).to(dtype)
    ref = F.conv2d(x.double(), dense, None if b is None else b.double(), stride=stride, padding=pad)
    if relu:
        ref = ref.clamp_min(0)
    got = op(x.cuda() if batch > 1 else x[0].cuda(), relu=relu)
    got = (got if batch > 1 else got[None]).double().cpu()
    assert got.shape == ref.shape and torch.isfinite(got).all()
    err = float((got - ref).norm() / ref.norm().clamp_min(1e-30))
    assert err <= BOUND[dtype], f"{case} {dtype} batch {batch}: relative error {err:.3g}"


@pytest.mark.parametrize("kernel", ["tiled", "map", "gather"])
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("batch", [1, 3])
def test_balanced_conv_against_float64(case, dtype, batch, kernel):
    _check(case, dtype, batch, bias=False, relu=False, kernel=kernel)


@pytest.mark.parametrize("kernel,case", [("tiled", "3x3-ragged"), ("map", "deep-small-map"),
                                         ("map", "1x1-bottleneck"),  # sliced (atomics) and one slice
                                         ("gather", "3x3-ragged"), ("gather", "deep-small-map")])
@pytest.mark.parametrize("bias,relu", [(True, True), (True, False), (False, True)])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
def test_balanced_conv_epilogue(dtype, bias, relu, kernel, case):
    _check(case, dtype, 1, bias=bias, relu=relu, kernel=kernel)


def test_bad_inputs_are_refused_before_any_launch():
    from balprune.errors import UsageError
    from balprune.runtime.conv import BalancedConv2d

    bt = _weight("3x3-ragged", torch.float32)
    op = BalancedConv2d(bt.values, bt.indices, in_channels=19, kh=3, kw=3, block_length=bt.geometry.block_length,
                        padding=1)
    with pytest.raises(UsageError, match="19 channels"):
        op(torch.zeros(18, 8, 8, device="cuda"))
    with pytest.raises(UsageError, match="CUDA"):
        op(torch.zeros(19, 8, 8))
    with pytest.raises(UsageError, match="float32"):
        op(torch.zeros(19, 8, 8, device="cuda", dtype=torch.float16))
