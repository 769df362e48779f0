"""kernels/balanced_conv.cu's small-map kernel (balanced_conv2d_map + conv_epilogue) emulated thread by
thread on the CPU, against float64 conv2d.

As tests/test_conv_kernel_emulation.py does for the tiled kernel: ``emulate_map`` mirrors the kernel
line by line over every CTA (blockIdx x = pixel run + channel group, y = input-channel slice, z =
image) and every thread (lane, threadIdx.y = the warp's output channel), with the dynamic shared
array sized exactly as the launch's shared_mem bytes. Checked on the way, any of which is a kernel
bug: every shared index in [0, size) and staged by this CTA; every global read in bounds (x within
the CTA's image and slice, taps within the channel's slice range); with one slice every output
written exactly once through the epilogue, with several every output receiving exactly one partial
sum per slice (atomicAdd into the zeroed fp32 buffer) before conv_epilogue writes it once.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from helpers import STAGE_INPUT_LINES, assert_source_has, balanced_conv_weight, emulate_stage_input
from test_conv_kernel_emulation import _cdiv, _cmod, _in, _int32, conv_reference

from balprune.formats.layouts import CONV_POS_SHIFT, conv_taps
from balprune.runtime.conv import (
    MAP_MAX_RUNS,
    MAP_MAX_WARPS,
    MAP_NAMED_RUNS,
    MAP_TARGET_CTAS,
    PIXELS_PER_LANE,
    TILE_BYTES,
    ConvShape,
    kernel_variants,
    map_kernel_name,
    map_launch_config,
)


def emulate_map(grid, block, shared_mem, NP, x, C, H, W, x_batch_stride, tap_w, tap_pos, chunk_start,
                Cout, kh, kw, stride, pad, OH, OW, CS, nslices, runs, bias, relu, y, part):
    """bp::balanced_conv2d_map<T, NP><<<grid, block, shared_mem>>>(...) then, when nslices > 1,
    bp::conv_epilogue<T>(part, ...). Flat numpy arrays (x, y, part float64). Returns (per-output write
    counts of y, per-output partial-sum counts, stats)."""
    gdx, gdy, gdz = grid
    bdx, bdy = block
    assert bdx == 32 and bdx * bdy <= 512  # __launch_bounds__(512)
    assert shared_mem % 4 == 0
    PIX = 32 * NP
    P = OH * OW
    written = np.zeros(y.size, np.int64)
    partials = np.zeros(y.size, np.int64)
    stats = {"tap_steps": 0, "max_xs_read": -1, "ctas": 0}
    nthreads = bdx * bdy
    lin = np.arange(nthreads, dtype=np.int64)
    lane, ty = lin % bdx, lin // bdx
    for bz in range(gdz):
        for by in range(gdy):
            for bx in range(gdx):
                stats["ctas"] += 1
                xs = np.full(shared_mem // 4, np.nan)
                staged = np.zeros(xs.size, bool)
                run = _cmod(bx, runs)
                o = _cdiv(bx, runs) * bdy + ty
                slice_ = by
                c0 = slice_ * CS
                cs = min(CS, C - c0)
                assert cs >= 1, "a slice past the last input channel"
                p0 = run * PIX
                p1 = min(P, p0 + PIX)
                assert p1 > p0, "a pixel run past the map"
                PW = (OW - 1) * stride + kw
                row0 = _cdiv(p0, OW) * stride
                TR = (_cdiv(p1 - 1, OW) - _cdiv(p0, OW)) * stride + kh
                xb = bz * x_batch_stride
                _int32([PW, row0, TR], "run geometry")
                words = _int32(cs * TR * PW, "words")
                # stage_input(xs, cs, TR, PW, tid, nthreads, xb, c0, H, W, row0 - pad, -pad)

                def load(off, c0=c0, xb=xb):
                    assert (off >= 0).all() and (off // (H * W) < C).all(), "staging reads a channel >= C"
                    _in(off, x_batch_stride, "x read outside the CTA's image")
                    return x[xb + off]

                def store(words, vals, words_max=words, xs=xs, staged=staged):
                    _in(words, xs.size, "xs store")
                    assert (words < words_max).all(), "a word past the slice staged"
                    assert not staged[words].any(), "a shared word staged twice"
                    assert len(set(words.tolist())) == words.size, "two threads store one word"
                    xs[words] = vals
                    staged[words] = True

                emulate_stage_input(lin, nthreads, cs, TR, PW, c0, H, W, row0 - pad, -pad, load, store)
                live = o < Cout  # if (o >= Cout) return;
                if not live.any():
                    continue
                base = np.zeros((nthreads, NP), np.int64)
                for j in range(NP):
                    p = np.minimum(p0 + lane + 32 * j, p1 - 1)
                    oy, ox = _cdiv(p, OW), p - _cdiv(p, OW) * OW
                    base[:, j] = (oy * stride - row0) * PW + ox * stride
                acc = np.zeros((nthreads, NP))
                my = np.where(live, o, 0) * (nslices + 1)
                _in(my[live] + slice_ + 1, chunk_start.size, "chunk_start read")
                t_beg = np.where(live, chunk_start[my + slice_], 0)
                t_end = np.where(live, chunk_start[my + slice_ + 1], 0)
                n = t_end - t_beg
                warp0 = lin - lane  # thread index of lane 0 of each thread's warp
                wl = np.zeros(nthreads)
                offl = np.zeros(nthreads, np.int64)
                for u in range(int(max(0, n.max()))):
                    if u % 32 == 0:  # each lane loads tap tb + lane (tb = t_beg + u) and turns it into an offset
                        tt = t_beg + u + lane
                        ld = live & (tt < t_end)
                        _in(tt[ld], tap_w.size, "tap read")
                        assert (tt[ld] >= t_beg[ld]).all()
                        pos = tap_pos[tt[ld]].astype(np.int64)
                        c_local = (pos >> CONV_POS_SHIFT) - c0
                        assert ((c_local >= 0) & (c_local < cs)).all(), "a tap outside the CTA's slice"
                        wl[:], offl[:] = 0.0, 0
                        wl[ld] = tap_w[tt[ld]].astype(np.float64)
                        offl[ld] = (c_local * TR + ((pos >> 4) & 15)) * PW + (pos & 15)
                    a = live & (u < n)
                    src = warp0[a] + u % 32  # __shfl_sync(.., u): lane u of the warp's batch
                    w = wl[src]
                    sidx = offl[src][:, None] + base[a]
                    _in(sidx, xs.size, "xs read")
                    assert staged[sidx].all(), "a tap reads a shared word nobody staged"
                    stats["max_xs_read"] = max(stats["max_xs_read"], int(sidx.max()))
                    acc[a] = w[:, None] * xs[sidx] + acc[a]
                    stats["tap_steps"] += 1
                plane = (bz * Cout + o) * P
                for j in range(NP):
                    p = p0 + lane + 32 * j
                    m = live & (p < p1)
                    dst = plane[m] + p[m]
                    _in(dst, y.size, "output index")
                    if nslices > 1:
                        np.add.at(part, dst, acc[m, j])  # atomicAdd(part + plane + p, acc[j])
                        np.add.at(partials, dst, 1)
                    else:
                        v = acc[m, j] + (bias[o[m]].astype(np.float64) if bias is not None else 0.0)
                        if relu:
                            v = np.fmax(v, 0.0)
                        y[dst] = v
                        np.add.at(written, dst, 1)
    if nslices > 1:  # conv_epilogue over every element
        i = np.arange(y.size)
        v = part + (bias[_cmod(_cdiv(i, P), Cout)].astype(np.float64) if bias is not None else 0.0)
        y[:] = np.fmax(v, 0.0) if relu else v
        written += 1
    return written, partials, stats


def derive_map_launch(s: ConvShape, batch: int, np_: int, co: int, cs: int) -> dict:
    """map_launch_config's dictionary for given pixels per lane, warps and slice channels (its formulas)."""
    oh, ow = s.out_height, s.out_width
    pixels, run = oh * ow, 32 * np_
    runs = math.ceil(pixels / run)
    pw = (ow - 1) * s.stride + s.kw
    tr = max(((min(pixels, p0 + run) - 1) // ow - p0 // ow) * s.stride + s.kh for p0 in range(0, pixels, run))
    slices = math.ceil(s.in_channels / cs)
    return {"pixels_per_lane": np_, "runs": runs, "channels": co, "slice_channels": cs, "slices": slices,
            "rows": tr, "grid": (runs * math.ceil(s.out_channels / co), slices, batch), "block": (32, co),
            "shared_mem": 4 * cs * tr * pw}


# name -> (C_out, C_in, kh, kw, stride, pad, H, W, sparsity, blocks, batch, bias, relu, (NP, warps, slice channels))
CASES = {
    "3x3-s1-p1-7x7-slices": (12, 10, 3, 3, 1, 1, 7, 7, 0.75, 5, 1, True, True, (2, 4, 4)),
    "3x3-s1-p1-14x14-one-slice": (5, 6, 3, 3, 1, 1, 14, 14, 0.5, 3, 2, True, False, (8, 2, 6)),
    "3x3-s2-p1-runs": (6, 4, 3, 3, 2, 1, 30, 30, 0.6, 4, 1, False, True, (2, 4, 3)),  # 225 px in runs of 64
    "1x1-s1-ragged-runs": (9, 8, 1, 1, 1, 0, 9, 11, 0.5, 4, 2, True, True, (1, 4, 3)),  # 99 px in runs of 32
    "1x1-s2-downsample": (7, 6, 1, 1, 2, 0, 14, 14, 0.5, 2, 1, True, False, (2, 8, 2)),
    "5x5-s1-p2": (4, 3, 5, 5, 1, 2, 8, 8, 0.8, 5, 1, True, True, (2, 3, 1)),
    "7x7-s2-p3-stem": (4, 3, 7, 7, 2, 3, 17, 15, 0.9, 7, 2, False, False, (4, 2, 2)),
    "blocks-straddle-channels": (3, 5, 3, 3, 1, 0, 6, 6, 0.6, 7, 1, True, True, (1, 2, 2)),
    "3x5-nonsquare": (5, 4, 3, 5, 1, 1, 6, 9, 0.5, 6, 1, False, True, (2, 2, 3)),
    "1x1-many-runs": (8, 6, 1, 1, 1, 0, 24, 24, 0.5, 3, 1, True, True, (1, 4, 3)),  # 576 px in 18 runs of 32
}


def _run(args, explicit: bool, seed=0, max_runs: int = MAP_MAX_RUNS):
    cout, cin, k, kw, stride, pad, h, w, sparsity, blocks, batch, with_bias, relu, params = args
    bt, g = balanced_conv_weight(cout, cin, k, kw, sparsity, blocks, seed)
    s = ConvShape(cin, h, w, cout, k, kw, stride, pad)
    OH, OW = s.out_height, s.out_width
    if explicit:
        cfg = derive_map_launch(s, batch, *params)
    else:
        cfg = map_launch_config(s, batch, max_runs)
        assert cfg is not None
        assert derive_map_launch(s, batch, cfg["pixels_per_lane"], cfg["channels"], cfg["slice_channels"]) == cfg
    assert cfg["pixels_per_lane"] in PIXELS_PER_LANE and cfg["block"][1] <= MAP_MAX_WARPS
    assert cfg["shared_mem"] <= TILE_BYTES
    tap_w, tap_pos, starts = conv_taps(bt.values.numpy(), bt.indices.numpy(), g.block_length, cin, k, kw,
                                       cfg["slice_channels"])
    x = torch.randn(batch, cin, h, w, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64)
    bias = torch.randn(cout, generator=torch.Generator().manual_seed(seed + 2)).float() if with_bias else None
    y = np.full(batch * cout * OH * OW, np.nan)
    part = np.zeros(y.size)  # torch.zeros in BalancedConv2d.__call__ (slices > 1)
    written, partials, stats = emulate_map(
        cfg["grid"], cfg["block"], cfg["shared_mem"], cfg["pixels_per_lane"], x.numpy().ravel(), cin, h, w,
        cin * h * w, tap_w, tap_pos, np.ascontiguousarray(starts).ravel(), cout, k, kw, stride, pad, OH, OW,
        cfg["slice_channels"], cfg["slices"], cfg["runs"], None if bias is None else bias.numpy(),
        1 if relu else 0, y, part)
    assert (written == 1).all()
    if cfg["slices"] > 1:
        assert (partials == cfg["slices"]).all(), "an output missed a slice's partial sum or got one twice"
    ref = conv_reference(bt, k, kw, x, bias, stride, pad, relu)
    np.testing.assert_allclose(y.reshape(batch, cout, OH, OW), ref.numpy(), rtol=0, atol=1e-9)
    return cfg, stats


@pytest.mark.parametrize("case", list(CASES))
def test_emulated_map_kernel_with_explicit_launch(case):
    cfg, stats = _run(CASES[case], explicit=True)
    assert stats["tap_steps"] > 0


@pytest.mark.parametrize("case", list(CASES))
def test_emulated_map_kernel_with_launch_config(case):
    cfg, stats = _run(CASES[case], explicit=False)
    assert stats["tap_steps"] > 0


def test_explicit_launches_cover_slices_runs_and_ragged_groups():
    slices = runs = ragged = one = 0
    for args in CASES.values():
        cout, cin, kh, kw, stride, pad, h, w = args[:8]
        s = ConvShape(cin, h, w, cout, kh, kw, stride, pad)
        cfg = derive_map_launch(s, args[10], *args[-1])
        slices += cfg["slices"] > 1
        one += cfg["slices"] == 1
        runs += cfg["runs"] > 1 and (s.out_height * s.out_width) % (32 * cfg["pixels_per_lane"]) != 0
        ragged += cout % cfg["channels"] != 0
    assert min(slices, runs, ragged, one) >= 1


@pytest.mark.parametrize("shape", [
    ConvShape(512, 7, 7, 512, 3, 3, 1, 1), ConvShape(256, 14, 14, 256, 3, 3, 1, 1),
    ConvShape(1024, 14, 14, 2048, 1, 1, 2, 0), ConvShape(2048, 7, 7, 512, 1, 1), ConvShape(512, 14, 14, 512, 3, 3, 1, 1),
    ConvShape(128, 28, 28, 128, 3, 3, 1, 1)])
def test_launch_config_on_resnet_and_vgg_small_maps(shape):
    """The shapes the kernel is for: one staging of each input slice, the GPU filled, within the limits."""
    cfg = map_launch_config(shape, 1)
    assert cfg is not None and cfg["runs"] <= MAP_MAX_RUNS and cfg["shared_mem"] <= TILE_BYTES
    n_ctas = cfg["grid"][0] * cfg["grid"][1]
    assert n_ctas >= min(MAP_TARGET_CTAS, shape.out_channels * cfg["runs"] * cfg["slices"])
    assert cfg["slices"] * cfg["slice_channels"] >= shape.in_channels > (cfg["slices"] - 1) * cfg["slice_channels"]


def test_large_maps_are_left_to_the_tiled_kernel():
    assert map_launch_config(ConvShape(64, 224, 224, 64, 3, 3, 1, 1), 1) is None
    assert map_launch_config(ConvShape(256, 56, 56, 256, 3, 3, 1, 1), 1) is None


def test_asked_for_by_name_the_map_kernel_takes_larger_maps_up_to_its_bound():
    """A model runtime times kernel="map" beside the tiled kernel up to MAP_NAMED_RUNS pixel runs (ResNet's
    56x56 layers: 13 runs of 256), never past it (VGG's 224x224 layers: 196 runs)."""
    assert map_launch_config(ConvShape(256, 56, 56, 64, 1, 1), 1, MAP_NAMED_RUNS)["runs"] == 13
    assert map_launch_config(ConvShape(64, 56, 56, 64, 3, 3, 1, 1), 1, MAP_NAMED_RUNS) is not None
    assert map_launch_config(ConvShape(64, 224, 224, 64, 3, 3, 1, 1), 1, MAP_NAMED_RUNS) is None


def test_emulated_map_kernel_on_a_map_of_many_runs_with_the_named_bound():
    cfg, stats = _run((8, 6, 3, 3, 1, 1, 40, 40, 0.6, 3, 1, True, True, None), explicit=False,
                      max_runs=MAP_NAMED_RUNS)  # 1600 px: 7 runs of 256
    assert cfg["runs"] == 7 > MAP_MAX_RUNS and stats["tap_steps"] > 0


def test_every_map_instantiation_is_compiled():
    names = kernel_variants()
    for d in ("float32", "float16", "bfloat16"):
        for n in PIXELS_PER_LANE:
            assert map_kernel_name(d, n) in names


def test_the_emulation_mirrors_the_map_kernel_source():
    assert_source_has("balanced_conv.cu", [
        "const int run = blockIdx.x % runs;",
        "const int o = (blockIdx.x / runs) * blockDim.y + threadIdx.y;",
        "const int c0 = slice * CS;",
        "const int p1 = min(P, p0 + PIX);",
        "const int PW = (OW - 1) * stride + kw;",
        "const int row0 = (p0 / OW) * stride;",
        "const int TR = ((p1 - 1) / OW - p0 / OW) * stride + kh;",
        "stage_input(xs, cs, TR, PW, tid, nthreads, xb, c0, H, W, row0 - pad, -pad);",
        *STAGE_INPUT_LINES,
        "const int p = min(p0 + lane + 32 * j, p1 - 1);",
        "base[j] = (oy * stride - row0) * PW + ox * stride;",
        "off = (((pos >> kConvPosShift) - c0) * rows + ((pos >> 4) & 15)) * cols + (pos & 15);",
        "load_tap(tap_w, tap_pos, tb + lane, t_end, c0, TR, PW, wl, offl);",
        "const int off = __shfl_sync(0xffffffffu, offl, u);",
        "acc[j] = fmaf(w, xs[off + base[j]], acc[j]);",
        "atomicAdd(part + plane + p, acc[j]);",
        "float v = part[i] + (bias != nullptr ? bias[(i / P) % Cout] : 0.0f);",
    ])
