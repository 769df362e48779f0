"""kernels/balanced_conv.cu's gather kernel (balanced_conv2d_gather: nothing staged) emulated thread by
thread on the CPU, against float64 conv2d.

As for the tiled and small-map kernels (tests/test_conv_kernel_emulation.py, test_conv_map_emulation.py):
``emulate_gather`` mirrors the kernel over every CTA (blockIdx x = pixel run, y = output channel, z = image)
and every thread (lane, threadIdx.y = the warp sharing the channel's taps), all lanes of a CTA in lockstep.
Checked on the way, any of which is a kernel bug: every tap read within the channel's range and every
input read inside the CTA's image (padding taps read nothing), every shared word of the reduction written
once before it is read, every output written exactly once; and the result equals float64 conv2d.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import assert_source_has, balanced_conv_weight
from test_conv_kernel_emulation import _cdiv, _in, _int32, conv_reference

from balprune.formats.layouts import conv_taps
from balprune.runtime.conv import (
    GATHER_MAX_WARPS,
    GATHER_PIXELS_PER_LANE,
    ConvShape,
    gather_kernel_name,
    gather_launch_config,
    kernel_variants,
)


def emulate_gather(grid, block, NP, x, C, H, W, x_batch_stride, tap_w, tap_pos, chunk_start, Cout, kh, kw,
                   stride, pad, OH, OW, bias, relu, y):
    """bp::balanced_conv2d_gather<T, NP><<<grid, block>>>(...): flat numpy arrays (x and y float64).
    Returns (per-output write counts, stats)."""
    gdx, gdy, gdz = grid
    bdx, WG = block
    assert bdx == 32 and 1 <= WG <= GATHER_MAX_WARPS  # __launch_bounds__(32 * kGatherMaxWarps)
    P = OH * OW
    written = np.zeros(y.size, np.int64)
    stats = {"tap_steps": 0, "padding_skips": 0}
    lane = np.arange(32, dtype=np.int64)
    for bz in range(gdz):
        xb = bz * x_batch_stride
        for o in range(gdy):
            _in(np.array([2 * o + 1]), chunk_start.size, "chunk_start read")
            t_beg, t_end = int(chunk_start[2 * o]), int(chunk_start[2 * o + 1])
            for bx in range(gdx):
                p0 = bx * 32 * NP
                red = np.full(GATHER_MAX_WARPS * NP * 32, np.nan)  # __shared__, uninitialised
                for g in range(WG):  # the warps are independent until __syncthreads
                    p = p0 + lane[:, None] + 32 * np.arange(NP)[None, :]  # [lane, j]
                    oy = _cdiv(p, OW)
                    iyb = np.where(p < P, oy * stride - pad, -(1 << 20))
                    ixb = (p - oy * OW) * stride - pad
                    pb = np.where(p < P, iyb * W + ixb, 0)
                    _int32([pb], "pixel offsets")
                    acc = np.zeros((32, NP))
                    for tb in range(t_beg + 32 * g, t_end, 32 * WG):
                        tt = tb + lane
                        ld = tt < t_end
                        _in(tt[ld], tap_w.size, "tap read")
                        wl = np.zeros(32)
                        offl = np.zeros(32, np.int64)
                        dyxl = np.zeros(32, np.int64)
                        pos = tap_pos[tt[ld]].astype(np.int64)
                        dy, dx = (pos >> 4) & 15, pos & 15
                        wl[ld] = tap_w[tt[ld]]
                        offl[ld] = ((pos >> 8) * H + dy) * W + dx
                        dyxl[ld] = dy << 8 | dx
                        _int32([offl], "tap offsets")
                        nb = min(32, t_end - tb)
                        for u in range(nb):  # __shfl_sync(.., u)
                            w, off, dyx = wl[u], offl[u], dyxl[u]
                            iy, ix = iyb + (dyx >> 8), ixb + (dyx & 255)
                            inb = (iy >= 0) & (iy < H) & (ix >= 0) & (ix < W)
                            src = xb + off + pb[inb]
                            _in(src - xb, x_batch_stride, "x read outside the CTA's image")
                            acc[inb] = w * x[src] + acc[inb]
                            stats["padding_skips"] += int((~inb & (p < P)).sum())
                            stats["tap_steps"] += 1
                    for j in range(NP):
                        red[(g * NP + j) * 32 + lane] = acc[:, j]
                # __syncthreads(); warp 0 reduces and stores
                b = float(bias[o]) if bias is not None else 0.0
                for j in range(NP):
                    parts = [red[(k * NP + j) * 32 + lane] for k in range(WG)]
                    assert not np.isnan(parts).any(), "a reduction word read before it was written"
                    v = b + np.sum(parts, axis=0)
                    if relu:
                        v = np.fmax(v, 0.0)
                    pp = p0 + lane + 32 * j
                    m = pp < P
                    dst = (bz * Cout + o) * P + pp[m]
                    _in(dst, y.size, "output index")
                    y[dst] = v[m]
                    np.add.at(written, dst, 1)
    return written, stats


# name -> (C_out, C_in, kh, kw, stride, pad, H, W, sparsity, blocks, batch, bias, relu)
CASES = {
    "3x3-s1-p1-7x7": (12, 10, 3, 3, 1, 1, 7, 7, 0.75, 5, 1, True, True),
    "3x3-s1-p1-14x14-batch": (5, 6, 3, 3, 1, 1, 14, 14, 0.5, 3, 2, True, False),
    "3x3-s2-p1-runs": (6, 4, 3, 3, 2, 1, 30, 30, 0.6, 4, 1, False, True),  # 225 px: 2 runs of 128
    "1x1-s1-ragged": (9, 8, 1, 1, 1, 0, 9, 11, 0.5, 4, 2, True, True),
    "1x1-s2-downsample": (7, 6, 1, 1, 2, 0, 14, 14, 0.5, 2, 1, True, False),
    "5x5-s1-p2": (4, 3, 5, 5, 1, 2, 8, 8, 0.8, 5, 1, True, True),
    "7x7-s2-p3-stem": (4, 3, 7, 7, 2, 3, 17, 15, 0.9, 7, 2, False, False),
    "3x5-nonsquare": (5, 4, 3, 5, 1, 1, 6, 9, 0.5, 6, 1, False, True),
    "many-runs": (3, 4, 3, 3, 1, 1, 24, 30, 0.5, 3, 1, True, True),  # 720 px: 6 runs of 128
    "many-taps-many-warps": (3, 64, 3, 3, 1, 1, 5, 5, 0.25, 8, 1, True, True),  # 432 taps: 8 warps
}


def _run(args, seed=0, warps=None):
    cout, cin, k, kw, stride, pad, h, w, sparsity, blocks, batch, with_bias, relu = args
    bt, g = balanced_conv_weight(cout, cin, k, kw, sparsity, blocks, seed)
    s = ConvShape(cin, h, w, cout, k, kw, stride, pad)
    OH, OW = s.out_height, s.out_width
    tap_w, tap_pos, starts = conv_taps(bt.values.numpy(), bt.indices.numpy(), g.block_length, cin, k, kw, cin)
    taps = int(bt.values.numel()) // cout
    cfg = gather_launch_config(s, taps, batch)
    block = cfg["block"] if warps is None else (32, warps)
    x = torch.randn(batch, cin, h, w, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64)
    bias = torch.randn(cout, generator=torch.Generator().manual_seed(seed + 2)).float() if with_bias else None
    y = np.full(batch * cout * OH * OW, np.nan)
    written, stats = emulate_gather(cfg["grid"], block, cfg["pixels_per_lane"], x.numpy().ravel(), cin, h, w,
                                    cin * h * w, tap_w, tap_pos, np.ascontiguousarray(starts).ravel(), cout, k, kw,
                                    stride, pad, OH, OW, None if bias is None else bias.numpy(), 1 if relu else 0, y)
    assert (written == 1).all(), "an output written never or twice"
    ref = conv_reference(bt, k, kw, x, bias, stride, pad, relu)
    np.testing.assert_allclose(y.reshape(batch, cout, OH, OW), ref.numpy(), rtol=0, atol=1e-9)
    return cfg, stats


@pytest.mark.parametrize("case", list(CASES))
def test_emulated_gather_kernel_equals_float64_conv(case):
    cfg, stats = _run(CASES[case])
    assert stats["tap_steps"] > 0


@pytest.mark.parametrize("warps", [1, 3, GATHER_MAX_WARPS])
def test_any_number_of_warps_shares_the_taps(warps):
    """The taps are split over the CTA's warps by batches of 32: any count gives the same sums."""
    _run(CASES["many-taps-many-warps"], warps=warps)
    _run(CASES["3x3-s1-p1-7x7"], warps=warps)


def test_the_cases_cover_padding_runs_and_several_warps():
    runs = warps = 0
    skips = 0
    for name in ("many-runs", "many-taps-many-warps", "3x3-s1-p1-7x7"):
        cfg, stats = _run(CASES[name])
        runs += cfg["runs"] > 1
        warps += cfg["warps"] > 1
        skips += stats["padding_skips"]
    assert runs and warps and skips


def test_launch_config_on_resnet_and_vgg_shapes():
    """One CTA per (pixel run, output channel); warps by the channel's kept taps; any map size."""
    for s, taps in ((ConvShape(2048, 7, 7, 512, 1, 1), 205), (ConvShape(256, 14, 14, 256, 3, 3, 1, 1), 230),
                    (ConvShape(64, 224, 224, 64, 3, 3, 1, 1), 46), (ConvShape(256, 56, 56, 512, 1, 1, 2, 0), 26)):
        cfg = gather_launch_config(s, taps)
        pixels = s.out_height * s.out_width
        assert cfg["runs"] * 32 * cfg["pixels_per_lane"] >= pixels > (cfg["runs"] - 1) * 32 * cfg["pixels_per_lane"]
        assert cfg["grid"] == (cfg["runs"], s.out_channels, 1)
        assert 1 <= cfg["warps"] <= GATHER_MAX_WARPS and cfg["block"] == (32, cfg["warps"])
    assert gather_launch_config(ConvShape(2048, 7, 7, 512, 1, 1), 205)["warps"] == 5
    assert gather_launch_config(ConvShape(64, 224, 224, 64, 3, 3, 1, 1), 10)["warps"] == 1


def test_every_gather_instantiation_is_compiled():
    names = kernel_variants()
    for d in ("float32", "float16", "bfloat16"):
        for n in GATHER_PIXELS_PER_LANE:
            assert gather_kernel_name(d, n) in names


def test_the_emulation_mirrors_the_gather_kernel_source():
    assert_source_has("balanced_conv.cu", [
        "constexpr int kGatherMaxWarps = 8;",
        "__shared__ float red[kGatherMaxWarps * NP * 32];",
        "const int p0 = blockIdx.x * 32 * NP;",
        "iyb[j] = p < P ? oy * stride - pad : -(1 << 20);",
        "ixb[j] = (p - oy * OW) * stride - pad;",
        "pb[j] = p < P ? iyb[j] * W + ixb[j] : 0;",
        "const int t_end = chunk_start[2 * o + 1];",
        "for (int tb = chunk_start[2 * o] + 32 * g; tb < t_end; tb += 32 * WG) {",
        "offl = ((pos >> kConvPosShift) * H + dy) * W + dx;",
        "dyxl = dy << 8 | dx;",
        "const int iy = iyb[j] + (dyx >> 8), ix = ixb[j] + (dyx & 255);",
        "if ((unsigned)iy < (unsigned)H && (unsigned)ix < (unsigned)W) "
        "acc[j] = fmaf(w, Val<T>::ldg(xb + off + pb[j]), acc[j]);",
        "red[(g * NP + j) * 32 + lane] = acc[j];",
        "for (int k = 0; k < WG; ++k) v += red[(k * NP + j) * 32 + lane];",
        "if (p < P) Val<T>::store(yo + p, v);",
    ])
