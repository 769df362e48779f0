"""The balanced direct-conv layout (formats.layouts.conv_taps) and launch choice, on the CPU.

conv_taps_reference walks the taps chunk by chunk as kernels/balanced_conv.cu does (and asserts each
tap lies in its chunk's staged channels and the kernel window, which is when the kernel's shared-
memory reads are in bounds); here it is held to float64 conv2d of the dense masked weight for every
shape class the kernel takes. Running the kernel itself is tests/gpu/test_conv_gpu.py's job.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from helpers import balanced_conv_weight
from torch.nn import functional as F

from balprune.errors import FormatError, UsageError
from balprune.formats.layouts import CONV_POS_SHIFT, CONV_TILE_COLS, conv_taps, conv_taps_reference
from balprune.runtime.conv import MAX_THREADS, TILE_BYTES, ConvShape, launch_config
from balprune.runtime.kernels import kernel_source

# (C_out, C_in, k, stride, padding, H, W, sparsity, blocks, chunk channels)
CASES = {
    "3x3-s1-p1": (8, 6, 3, 1, 1, 11, 13, 0.75, 4, 4),
    "3x3-s2-p1": (5, 7, 3, 2, 1, 12, 9, 0.5, 3, 3),
    "1x1-s1": (9, 16, 1, 1, 0, 7, 40, 0.5, 4, 16),
    "1x1-s2-downsample": (6, 8, 1, 2, 0, 9, 9, 0.75, 2, 5),
    "5x5-s1-p2": (4, 3, 5, 1, 2, 10, 10, 0.8, 5, 2),
    "7x7-s2-p3-stem": (4, 3, 7, 2, 3, 17, 15, 0.9, 7, 3),
    "blocks-straddle-channels": (3, 5, 3, 1, 0, 6, 6, 0.6, 7, 2),  # L = 45/7 -> 7: blocks cross channels
    # 147 columns in 30 blocks of 5: the last block has 2 real columns and keeps 3 (fill-up padding)
    "stem-fill-up": (4, 3, 7, 2, 3, 17, 15, 0.5, 32, 3),
}


@pytest.mark.parametrize("case", list(CASES))
def test_the_layouts_model_is_conv2d_of_the_masked_weight(case):
    cout, cin, k, s, p, h, w, sparsity, blocks, cc = CASES[case]
    bt, g = balanced_conv_weight(cout, cin, k, k, sparsity, blocks)
    tap_w, tap_pos, starts = conv_taps(bt.values.numpy(), bt.indices.numpy(), g.block_length, cin, k, k, cc)
    assert tap_w.dtype == np.float32 and tap_pos.dtype == np.int32 and starts.dtype == np.int32
    padding = max(0, g.keep - (cin * k * k - (g.blocks - 1) * g.block_length))  # kept past the last real column
    assert starts.shape == (cout, -(-cin // cc) + 1) and len(tap_w) == cout * (g.keep * g.blocks - padding)
    x = torch.randn(cin, h, w, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    dense = bt.to_dense().double().reshape(cout, cin, k, k)
    want = F.conv2d(x[None], dense, stride=s, padding=p)[0].numpy()
    got = conv_taps_reference(tap_w, tap_pos, starts, x.numpy(), k, k, s, p, cc)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-9)


def test_taps_are_in_column_order_and_chunks_partition_them():
    bt, g = balanced_conv_weight(6, 10, 3, 3, 0.75, 5)
    tap_w, tap_pos, starts = conv_taps(bt.values.numpy(), bt.indices.numpy(), g.block_length, 10, 3, 3, 4)
    per_row = g.keep * g.blocks
    c = tap_pos >> CONV_POS_SHIFT
    cols = c * 9 + ((tap_pos >> 4) & 15) * 3 + (tap_pos & 15)
    for o in range(6):
        row = cols[o * per_row:(o + 1) * per_row]
        assert (np.diff(row) > 0).all()  # distinct kept columns, ascending
        assert starts[o, 0] == o * per_row and starts[o, -1] == (o + 1) * per_row
        for j in range(starts.shape[1] - 1):
            chunk = c[starts[o, j]:starts[o, j + 1]]
            assert ((chunk >= 4 * j) & (chunk < 4 * j + 4)).all()
    # the same input gives the same arrays
    again = conv_taps(bt.values.numpy().copy(), bt.indices.numpy().copy(), g.block_length, 10, 3, 3, 4)
    assert all(np.array_equal(a, b) for a, b in zip((tap_w, tap_pos, starts), again))


def test_layout_limits_are_format_errors():
    bt, g = balanced_conv_weight(4, 3, 3, 3, 0.5, 3)
    with pytest.raises(FormatError, match="kernel sides 1..16"):
        conv_taps(bt.values.numpy(), bt.indices.numpy(), g.block_length, 1, 17, 1, 1)
    with pytest.raises(FormatError, match="do not cover"):  # a view claiming fewer columns than the blocks hold
        conv_taps(bt.values.numpy(), bt.indices.numpy(), g.block_length, 1, 3, 3, 1)


def test_kernel_constants_match_the_cuda_source():
    src = kernel_source("balanced_conv.cu")
    assert int(re.search(r"kConvTileCols = (\d+);", src).group(1)) == CONV_TILE_COLS
    assert int(re.search(r"kConvPosShift = (\d+);", src).group(1)) == CONV_POS_SHIFT


SHAPES = [ConvShape(3, 224, 224, 64, 3, 3, 1, 1), ConvShape(64, 224, 224, 64, 3, 3, 1, 1),
          ConvShape(512, 14, 14, 512, 3, 3, 1, 1), ConvShape(3, 224, 224, 64, 7, 7, 2, 3),
          ConvShape(256, 56, 56, 64, 1, 1, 1, 0), ConvShape(1024, 14, 14, 2048, 1, 1, 2, 0),
          ConvShape(512, 7, 7, 512, 3, 3, 1, 1), ConvShape(5, 3, 3, 2, 3, 3, 1, 0), ConvShape(8, 40, 40, 8, 16, 16, 1, 0)]


@pytest.mark.parametrize("s", SHAPES, ids=lambda s: f"{s.in_channels}x{s.height}-{s.out_channels}-k{s.kh}s{s.stride}")
@pytest.mark.parametrize("batch", [1, 8])
def test_launch_config_covers_the_output_within_the_kernels_limits(s, batch):
    cfg = launch_config(s, batch)
    tx, wr, co = cfg["block"]
    py = cfg["rows_per_lane"]
    assert tx == 32 and tx * wr * co <= MAX_THREADS and cfg["shared_mem"] <= TILE_BYTES
    tiles_x = -(-s.out_width // 32)
    assert cfg["grid"][0] == tiles_x * -(-s.out_height // (py * wr)) and cfg["grid"][1] * co >= s.out_channels
    assert cfg["grid"][2] == batch and cfg["chunks"] * cfg["chunk_channels"] >= s.in_channels
    tih, tiw = (py * wr - 1) * s.stride + s.kh, 31 * s.stride + s.kw
    assert cfg["shared_mem"] == 4 * cfg["chunk_channels"] * tih * tiw


def test_a_tile_that_cannot_fit_is_a_usage_error():
    with pytest.raises(UsageError, match="exceeds the kernel's"):
        launch_config(ConvShape(4, 800, 800, 4, 16, 16, 16, 0))
    with pytest.raises(UsageError, match="smaller than the kernel"):
        launch_config(ConvShape(4, 2, 2, 4, 3, 3, 1, 0))
    with pytest.raises(UsageError, match="exceeds the kernel's grid"):
        launch_config(ConvShape(4, 8, 8, 2_000_000, 1, 1, 1, 0))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_16_bit_weights_reach_the_layout_as_their_numbers(dtype):
    """The bf16 bug of the first GPU run: the raw 16-bit containers (how the SpMV operators upload bf16)
    were taken as numbers by conv_taps. BalancedConv2d converts with tap_values; conv_taps refuses
    anything but floats."""
    from balprune.runtime.conv import tap_values

    bt, g = balanced_conv_weight(6, 4, 3, 3, 0.5, 4)
    values = bt.values.to(dtype)
    tap_w, _, _ = conv_taps(tap_values(values), bt.indices.numpy(), g.block_length, 4, 3, 3, 2)
    want, _, _ = conv_taps(values.double().numpy(), bt.indices.numpy(), g.block_length, 4, 3, 3, 2)
    np.testing.assert_array_equal(tap_w, want.astype(np.float32))
    raw = values.contiguous().view(torch.int16).numpy().view(np.uint16)
    with pytest.raises(FormatError, match="float values"):
        conv_taps(raw, bt.indices.numpy(), g.block_length, 4, 3, 3, 2)
