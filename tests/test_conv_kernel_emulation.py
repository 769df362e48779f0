"""kernels/balanced_conv.cu emulated thread by thread on the CPU, against float64 conv2d.

tests/test_conv_layout.py holds the layout (conv_taps) to its vectorised CPU model, which does not
model threads. Here ``emulate_balanced_conv2d`` mirrors the kernel's code line by line: every CTA
(blockIdx x, y, z), every thread (lane, threadIdx.y, threadIdx.z; vectorised as numpy arrays over the
CTA's threads), the dynamic shared-memory array ``xs`` sized exactly as the launch's shared_mem
bytes, the strided staging loop, the ``__syncthreads_or`` skip of chunks nobody in the CTA has taps
in, the tap loop and the epilogue with its bounds checks. Integer arithmetic follows C (truncating
division; every operand here is non-negative, which is asserted). Accumulation is float64 (the kernel
uses fp32 ``fmaf``), so the result is held to float64 conv2d of the dense masked weight at atol 1e-9.

Checked on the way, any of which is a kernel bug: every shared-memory index in [0, size); every
shared-memory read hits a word staged for the current chunk (not stale or uninitialised); every global
read of x, tap_w, tap_pos, chunk_start and bias in bounds (x within the CTA's batch image); every
output element written exactly once (y starts as NaN), each store inside its (batch, channel) plane;
barriers reached by every thread of the CTA.

The launch (grid, block, shared memory) is launch_config's, or, to exercise several CTAs, chunks and
ragged channel groups with tiny shapes, derived from explicit (rows per lane, row warps, channels per
CTA, chunk channels) by launch_config's own formulas (``derive_launch``, checked equal to
launch_config on its own choice).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from helpers import STAGE_INPUT_LINES, assert_source_has, balanced_conv_weight, emulate_stage_input
from torch.nn import functional as F

from balprune.formats.layouts import CONV_POS_SHIFT, CONV_TILE_COLS, conv_taps
from balprune.runtime.conv import MAX_THREADS, ROWS_PER_LANE, TILE_BYTES, ConvShape, launch_config

INT32_MAX = 2**31 - 1


# ------------------------------------------------------------------------------------- C integer helpers

def _cdiv(a, b):
    """C's ``a / b`` on int: truncation toward zero (the kernel only divides non-negative values)."""
    a, b = np.asarray(a, np.int64), np.asarray(b, np.int64)
    assert (a >= 0).all() and (b > 0).all(), "a negative operand in the kernel's integer division"
    q = np.abs(a) // np.abs(b)
    q = np.where((a < 0) ^ (b < 0), -q, q)
    return q if q.ndim else int(q)


def _cmod(a, b):
    """C's ``a % b`` on int (sign of the dividend)."""
    return np.asarray(a, np.int64) - np.asarray(b, np.int64) * _cdiv(a, b) if np.ndim(a) else int(a - b * _cdiv(a, b))


def _int32(v, what):
    """The kernel's ``int`` locals: assert the value fits (a wrap would be a kernel bug)."""
    arr = np.asarray(v)
    assert ((arr >= -INT32_MAX - 1) & (arr <= INT32_MAX)).all(), f"{what} overflows int32"
    return v


def _in(idx, size, what):
    idx = np.asarray(idx)
    assert idx.size == 0 or (idx.min() >= 0 and idx.max() < size), \
        f"{what}: index range [{idx.min()}, {idx.max()}] outside [0, {size})"


# ------------------------------------------------------------------------------------- the emulator

def emulate_balanced_conv2d(grid, block, shared_mem, PY,
                            x, C, H, W, x_batch_stride,
                            tap_w, tap_pos, chunk_start,
                            Cout, kh, kw, stride, pad, OH, OW, CC, nchunks,
                            bias, relu, y, y_batch_stride):
    """bp::balanced_conv2d<T, PY><<<grid, block, shared_mem>>>(x, C, H, W, x_batch_stride, tap_w, tap_pos,
    chunk_start, Cout, kh, kw, stride, pad, OH, OW, CC, nchunks, bias, relu, y, y_batch_stride).

    Pointers are flat numpy arrays (x, y float64; tap_w float32; tap_pos, chunk_start int32; bias
    float32 or None for nullptr). Writes y in place; returns (write counts per element of y, stats)."""
    kConvTileCols, kConvPosShift = 32, 8
    assert kConvTileCols == CONV_TILE_COLS and kConvPosShift == CONV_POS_SHIFT
    gdx, gdy, gdz = grid
    bdx, bdy, bdz = block
    assert bdx == kConvTileCols and bdx * bdy * bdz <= 1024  # __launch_bounds__(1024)
    assert shared_mem % 4 == 0
    written = np.zeros(y.size, np.int64)
    stats = {"ctas": 0, "chunks_staged": 0, "chunks_skipped": 0, "tap_steps": 0, "max_xs_read": -1,
             "max_xs_write": -1}

    # the CTA's threads, in the kernel's linear order
    nthreads = bdx * bdy * bdz
    lin = np.arange(nthreads, dtype=np.int64)
    lane = lin % bdx                       # threadIdx.x
    tyv = (lin // bdx) % bdy               # threadIdx.y
    tzv = lin // (bdx * bdy)               # threadIdx.z

    for bz in range(gdz):
        for by in range(gdy):
            for bx in range(gdx):
                stats["ctas"] += 1
                # extern __shared__ float xs[]: uninitialised; NaN so that a stray read shows
                xs = np.full(shared_mem // 4, np.nan)
                XS = xs.size
                staged = np.zeros(XS, bool)  # words written by the current chunk's staging
                alive = np.ones(nthreads, bool)

                WR = bdy
                tile_rows = PY * WR
                tiles_x = _cdiv(OW + kConvTileCols - 1, kConvTileCols)
                oy0 = _cdiv(bx, tiles_x) * tile_rows
                ox0 = _cmod(bx, tiles_x) * kConvTileCols
                o = by * bdz + tzv
                TIH = (tile_rows - 1) * stride + kh
                TIW = (kConvTileCols - 1) * stride + kw
                iy0, ix0 = oy0 * stride - pad, ox0 * stride - pad
                xb = bz * x_batch_stride  # offset of x + blockIdx.z * x_batch_stride
                nthreads_k = bdx * bdy * bdz
                tid = (tzv * bdy + tyv) * bdx + lane
                assert nthreads_k == nthreads and np.array_equal(tid, lin)
                _int32([oy0, ox0, TIH, TIW, iy0, ix0], "tile geometry")

                acc = np.zeros((nthreads, PY))

                lane_base = _int32(tyv * PY * stride * TIW + lane * stride, "lane_base")
                row_step = stride * TIW
                my_chunks = np.where(o < Cout, o, 0) * (nchunks + 1)  # offset into chunk_start

                for j in range(nchunks):
                    c0 = j * CC
                    cc = min(CC, C - c0)
                    # mine = o < Cout && my_chunks[j + 1] > my_chunks[j]  (short-circuit: no read when o >= Cout)
                    own = o < Cout
                    mine = np.zeros(nthreads, bool)
                    if own.any():
                        r0, r1 = my_chunks[own] + j, my_chunks[own] + j + 1
                        _in(r0, chunk_start.size, "chunk_start read (mine)")
                        _in(r1, chunk_start.size, "chunk_start read (mine)")
                        mine[own] = chunk_start[r1] > chunk_start[r0]
                    assert alive.all(), "__syncthreads_or reached by part of the CTA"
                    if not mine.any():  # if (!__syncthreads_or(mine)) continue;
                        stats["chunks_skipped"] += 1
                        continue
                    stats["chunks_staged"] += 1
                    tile_words = _int32(cc * TIH * TIW, "tile_words")
                    assert cc >= 1
                    staged[:] = False

                    def load(off, c0=c0, xb=xb):
                        assert (off >= 0).all() and (off // (H * W) < C).all(), "staging reads a channel >= C"
                        _in(off, x_batch_stride, "x read outside the CTA's batch image")
                        _in(xb + off, x.size, "x read")
                        return x[xb + off]

                    def store(words, vals, tile_words=tile_words, xs=xs, staged=staged, XS=XS):
                        _in(words, XS, "xs store (staging)")
                        assert (words < tile_words).all(), "a word past the chunk's tile staged"
                        assert not staged[words].any(), "a shared word staged twice in one chunk"
                        assert len(set(words.tolist())) == words.size, "two threads store one word"
                        xs[words] = vals
                        staged[words] = True
                        stats["max_xs_write"] = max(stats["max_xs_write"], int(words.max()))

                    # stage_input(xs, cc, TIH, TIW, tid, nthreads, xb, c0, H, W, iy0, ix0)
                    emulate_stage_input(tid, nthreads, cc, TIH, TIW, c0, H, W, iy0, ix0, load, store)
                    assert alive.all(), "__syncthreads reached by part of the CTA"
                    if own.any():  # if (o < Cout)
                        t_beg = np.zeros(nthreads, np.int64)
                        t_end = np.zeros(nthreads, np.int64)
                        t_beg[own] = chunk_start[my_chunks[own] + j]
                        t_end[own] = chunk_start[my_chunks[own] + j + 1]
                        n = np.where(own, t_end - t_beg, 0)
                        warp0 = lin - lane  # thread index of lane 0 of each thread's warp
                        wl = np.zeros(nthreads)
                        offl = np.zeros(nthreads, np.int64)
                        for u in range(int(max(0, n.max()))):  # the taps [my_chunks[j], t_end) in order
                            if u % 32 == 0:  # lanes load taps tb + lane (tb = t_beg + u) as shared offsets
                                tt = t_beg + u + lane
                                ld = own & (tt < t_end)
                                _in(tt[ld], tap_w.size, "tap_w read")
                                _in(tt[ld], tap_pos.size, "tap_pos read")
                                pos = tap_pos[tt[ld]].astype(np.int64)
                                c = (pos >> kConvPosShift) - c0
                                dy, dx = (pos >> 4) & 15, pos & 15
                                wl[:], offl[:] = 0.0, 0
                                wl[ld] = tap_w[tt[ld]].astype(np.float64)
                                offl[ld] = (c * TIH + dy) * TIW + dx
                            a = own & (u < n)
                            src = warp0[a] + u % 32  # __shfl_sync(.., u): lane u of the warp's batch
                            w = wl[src]
                            base = offl[src] + lane_base[a]  # s = xs + ...
                            sidx = base[:, None] + np.arange(PY, dtype=np.int64)[None, :] * row_step
                            _in(sidx, XS, "xs read (tap loop)")
                            assert staged[sidx].all(), \
                                "the tap loop reads a shared word the current chunk did not stage"
                            stats["max_xs_read"] = max(stats["max_xs_read"], int(sidx.max()))
                            acc[a] = w[:, None] * xs[sidx] + acc[a]  # fmaf(w, s[p * row_step], acc[p])
                            stats["tap_steps"] += 1
                # epilogue
                alive &= ~(o >= Cout)          # if (o >= Cout) return;
                ox = ox0 + lane
                alive &= ~(ox >= OW)           # if (ox >= OW) return;
                if not alive.any():
                    continue
                if bias is not None:
                    _in(o[alive], bias.size, "bias read")
                    b = np.where(alive, bias[np.where(alive, o, 0)].astype(np.float64), 0.0)
                else:
                    b = np.zeros(nthreads)
                yo = bz * y_batch_stride + o * OH * OW
                for p in range(PY):
                    oy = oy0 + tyv * PY + p
                    m = alive & (oy < OH)
                    v = acc[m, p] + b[m]
                    if relu:
                        v = np.fmax(v, 0.0)
                    dst = yo[m] + oy[m] * OW + ox[m]
                    _in(dst, y.size, "y store")
                    plane = bz * y_batch_stride + o[m] * OH * OW
                    assert ((dst >= plane) & (dst < plane + OH * OW)).all(), "a store outside its (n, o) plane"
                    y[dst] = v
                    np.add.at(written, dst, 1)
    return written, stats


# ------------------------------------------------------------------------------------- launches and cases

def conv_reference(bt, kh: int, kw: int, x, bias, stride: int, pad: int, relu: bool) -> torch.Tensor:
    """float64 act(conv2d(x, the masked weight) + bias) for ``bt`` over the [C_out, C_in*kh*kw] view: what
    every emulated conv kernel is held to."""
    dense = bt.to_dense().double().reshape(-1, int(x.shape[1]), kh, kw)
    ref = F.conv2d(x, dense, None if bias is None else bias.double(), stride=stride, padding=pad)
    return ref.clamp_min(0) if relu else ref


def derive_launch(s: ConvShape, batch: int, py: int, wr: int, co: int, cc: int) -> dict:
    """launch_config's dictionary for given rows per lane, row warps, channels per CTA and chunk channels,
    with grid / block / shared memory by launch_config's formulas (the kernel's header)."""
    oh, ow = s.out_height, s.out_width
    tih = (py * wr - 1) * s.stride + s.kh
    tiw = (CONV_TILE_COLS - 1) * s.stride + s.kw
    tiles = math.ceil(ow / CONV_TILE_COLS) * math.ceil(oh / (py * wr))
    return {"rows_per_lane": py, "row_warps": wr, "channels": co, "chunk_channels": cc,
            "chunks": math.ceil(s.in_channels / cc),
            "grid": (tiles, math.ceil(s.out_channels / co), batch), "block": (CONV_TILE_COLS, wr, co),
            "shared_mem": 4 * cc * tih * tiw}


# name -> (C_out, C_in, kh, kw, stride, pad, H, W, sparsity, blocks, batch, bias, relu,
#          explicit (rows per lane, row warps, channels per CTA, chunk channels))
CASES = {
    # OW 40 (> 32, not a multiple), OH 11 (not a multiple of 16 or 8), C_out 12 over groups of 5, chunks 4+2
    "3x3-s1-p1-wide": (12, 6, 3, 3, 1, 1, 11, 40, 0.75, 4, 1, True, True, (4, 2, 5, 4)),
    # OW 35, OH 6 (tile 8 / 4), C_out 5 over 2, chunks 3+3+1, batch 2
    "3x3-s2-p1-batch2": (5, 7, 3, 3, 2, 1, 12, 70, 0.5, 3, 2, False, False, (4, 1, 2, 3)),
    "1x1-s1-p0": (9, 10, 1, 1, 1, 0, 7, 33, 0.5, 5, 1, True, False, (4, 2, 4, 3)),
    "1x1-s2-downsample-batch2": (6, 8, 1, 1, 2, 0, 9, 9, 0.75, 2, 2, False, True, (4, 1, 4, 5)),
    "5x5-s1-p2": (4, 3, 5, 5, 1, 2, 10, 37, 0.8, 5, 1, True, True, (8, 1, 3, 2)),
    "5x5-s2-p0": (3, 4, 5, 5, 2, 0, 21, 19, 0.6, 4, 1, True, True, (8, 2, 2, 3)),
    "7x7-s2-p3-stem-batch2": (4, 3, 7, 7, 2, 3, 17, 15, 0.9, 7, 2, True, False, (4, 2, 3, 1)),
    "7x7-s1-p0-wide": (2, 3, 7, 7, 1, 0, 14, 40, 0.7, 3, 1, False, False, (4, 3, 2, 2)),
    "3x3-s1-p3": (4, 5, 3, 3, 1, 3, 5, 5, 0.5, 5, 1, False, True, (4, 1, 3, 2)),
    "3x3-s2-p2": (7, 4, 3, 3, 2, 2, 13, 61, 0.5, 6, 1, True, True, (8, 1, 4, 3)),
    # 45 columns in blocks of 7: blocks cross input-channel (and chunk) boundaries
    "blocks-straddle-channels-batch2": (3, 5, 3, 3, 1, 0, 6, 6, 0.6, 7, 2, True, True, (4, 1, 2, 2)),
    "blocks-straddle-wide": (6, 5, 3, 3, 1, 1, 9, 40, 0.6, 7, 1, True, False, (8, 2, 4, 3)),
    "3x5-nonsquare": (5, 4, 3, 5, 1, 1, 8, 36, 0.5, 6, 1, False, True, (4, 2, 2, 3)),
    # one kept input channel per output channel, one channel per chunk and per CTA: most chunks skipped
    "1x1-chunk-skips": (8, 8, 1, 1, 1, 0, 6, 6, 0.9, 1, 2, True, True, (4, 2, 1, 1)),
}


def _run(case_args, params=None, seed=0):
    cout, cin, kh, kw, stride, pad, h, w, sparsity, blocks, batch, with_bias, relu, _ = case_args
    bt, g = balanced_conv_weight(cout, cin, kh, kw, sparsity, blocks, seed)
    s = ConvShape(cin, h, w, cout, kh, kw, stride, pad)
    OH, OW = s.out_height, s.out_width
    if params is None:
        cfg = launch_config(s, batch)
        assert derive_launch(s, batch, cfg["rows_per_lane"], cfg["row_warps"], cfg["channels"],
                             cfg["chunk_channels"]) == cfg
    else:
        cfg = derive_launch(s, batch, *params)
    tx, wr, co = cfg["block"]
    assert cfg["rows_per_lane"] in ROWS_PER_LANE  # only these instantiations exist (kernel_variants)
    assert tx * wr * co <= MAX_THREADS and cfg["shared_mem"] <= TILE_BYTES
    cc, nchunks = cfg["chunk_channels"], cfg["chunks"]
    tap_w, tap_pos, starts = conv_taps(bt.values.numpy(), bt.indices.numpy(), g.block_length, cin, kh, kw, cc)
    assert starts.shape == (cout, nchunks + 1)
    x = torch.randn(batch, cin, h, w, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64)
    bias = torch.randn(cout, generator=torch.Generator().manual_seed(seed + 2)).float() if with_bias else None
    y = np.full(batch * cout * OH * OW, np.nan)
    # BalancedConv2d.__call__'s argument list
    written, stats = emulate_balanced_conv2d(
        cfg["grid"], cfg["block"], cfg["shared_mem"], cfg["rows_per_lane"],
        x.numpy().ravel(), cin, h, w, cin * h * w,
        tap_w, tap_pos, np.ascontiguousarray(starts).ravel(),
        cout, kh, kw, stride, pad, OH, OW, cc, nchunks,
        None if bias is None else bias.numpy(), 1 if relu else 0, y, cout * OH * OW)
    assert (written == 1).all(), f"{int((written == 0).sum())} outputs unwritten, {int((written > 1).sum())} " \
                                 f"written more than once"
    assert not np.isnan(y).any()
    assert stats["max_xs_read"] < cfg["shared_mem"] // 4 and stats["max_xs_write"] < cfg["shared_mem"] // 4
    ref = conv_reference(bt, kh, kw, x, bias, stride, pad, relu)
    np.testing.assert_allclose(y.reshape(batch, cout, OH, OW), ref.numpy(), rtol=0, atol=1e-9)
    return cfg, stats


@pytest.mark.parametrize("case", list(CASES))
def test_emulated_kernel_with_launch_config(case):
    cfg, stats = _run(CASES[case])
    assert stats["tap_steps"] > 0


@pytest.mark.parametrize("case", list(CASES))
def test_emulated_kernel_with_explicit_launch(case):
    cfg, stats = _run(CASES[case], CASES[case][-1])
    assert stats["tap_steps"] > 0


def test_explicit_launches_cover_the_ragged_classes():
    """The explicit launches do hit what tiny shapes under launch_config cannot: several channels per CTA
    with a ragged last group, several chunks with a short last one, row tiles that end inside the output."""
    ragged_co = ragged_cc = ragged_rows = ragged_cols = 0
    for args in CASES.values():
        cout, cin, kh, kw, stride, pad, h, w = args[:8]
        s = ConvShape(cin, h, w, cout, kh, kw, stride, pad)
        py, wr, co, cc = args[-1]
        ragged_co += co > 1 and cout % co != 0
        ragged_cc += cin > cc and cin % cc != 0
        ragged_rows += s.out_height % (py * wr) != 0
        ragged_cols += s.out_width > 32 and s.out_width % 32 != 0
    assert min(ragged_co, ragged_cc, ragged_rows, ragged_cols) >= 2


def test_chunks_nobody_in_the_cta_needs_are_skipped():
    _, stats = _run(CASES["1x1-chunk-skips"], CASES["1x1-chunk-skips"][-1])
    assert stats["chunks_skipped"] > 0 and stats["chunks_staged"] > 0


def test_the_tap_loop_reaches_the_last_word_of_shared_memory():
    """With a dense weight the bottom-right tap of the last lane, row warp and row of the last staged channel
    reads the tile's last word: the shared-memory size is exact, not padded."""
    args = (3, 4, 3, 3, 2, 1, 15, 70, 0.0, 1, 1, False, False, (4, 2, 3, 2))
    cfg, stats = _run(args, args[-1])
    assert stats["max_xs_read"] == cfg["shared_mem"] // 4 - 1


# A balanced weight whose last block keeps padding columns (FORMAT.md's fill-up rule: that block has
# fewer real columns than k; the validator accepts it, values 0): e.g. a ResNet stem [4, 3, 7, 7] at the
# default 32 blocks, 50% -> L = 5, B = 30, last block 2 real columns, k = 3. conv_taps drops those taps.
FILL_UP_CASES = {
    "stem-7x7-32-blocks-fill-up": (4, 3, 7, 7, 2, 3, 17, 15, 0.5, 32, 1, True, False, (4, 2, 2, 2)),
    "3x3-c5-32-blocks-fill-up": (4, 5, 3, 3, 1, 1, 9, 9, 0.25, 32, 1, False, False, (4, 1, 2, 3)),
    "1x1-c10-4-blocks-fill-up": (9, 10, 1, 1, 1, 0, 7, 33, 0.5, 4, 1, True, False, (4, 2, 4, 3)),
}


@pytest.mark.parametrize("case", list(FILL_UP_CASES))
def test_fill_up_padding_columns(case):
    args = FILL_UP_CASES[case]
    cout, cin, kh, kw, *_ = args
    _, g = balanced_conv_weight(cout, cin, kh, kw, args[8], args[9])
    assert g.blocks * g.block_length > cin * kh * kw and g.keep > cin * kh * kw - (g.blocks - 1) * g.block_length
    _run(args, args[-1])


def test_the_emulation_mirrors_the_kernel_source():
    """The lines the emulator mirrors are still the kernel's (an edit to the kernel must revisit this file)."""
    assert_source_has("balanced_conv.cu", [
        "const int tile_rows = PY * WR;",
        "const int tiles_x = (OW + kConvTileCols - 1) / kConvTileCols;",
        "const int oy0 = (blockIdx.x / tiles_x) * tile_rows;",
        "const int ox0 = (blockIdx.x % tiles_x) * kConvTileCols;",
        "const int o = blockIdx.y * blockDim.z + threadIdx.z;",
        "const int TIH = (tile_rows - 1) * stride + kh;",
        "const int TIW = (kConvTileCols - 1) * stride + kw;",
        "const int iy0 = oy0 * stride - pad, ix0 = ox0 * stride - pad;",
        "const T* xb = x + (long long)blockIdx.z * x_batch_stride;",
        "const int tid = (threadIdx.z * blockDim.y + threadIdx.y) * blockDim.x + lane;",
        "const int lane_base = threadIdx.y * PY * stride * TIW + lane * stride;",
        "const int row_step = stride * TIW;",
        "const int* my_chunks = chunk_start + (long long)(o < Cout ? o : 0) * (nchunks + 1);",
        "const int cc = min(CC, C - c0);",
        "const bool mine = o < Cout && my_chunks[j + 1] > my_chunks[j];",
        "if (!__syncthreads_or(mine)) continue;",
        "stage_input(xs, cc, TIH, TIW, tid, nthreads, xb, c0, H, W, iy0, ix0);",
        *STAGE_INPUT_LINES,
        "off = (((pos >> kConvPosShift) - c0) * rows + ((pos >> 4) & 15)) * cols + (pos & 15);",
        "load_tap(tap_w, tap_pos, tb + lane, t_end, c0, TIH, TIW, wl, offl);",
        "const float* s = xs + __shfl_sync(0xffffffffu, offl, u) + lane_base;",
        "acc[p] = fmaf(w, s[p * row_step], acc[p]);",
        "if (o >= Cout) return;",
        "if (ox >= OW) return;",
        "const float b = bias != nullptr ? bias[o] : 0.0f;",
        "T* yo = y + (long long)blockIdx.z * y_batch_stride + (long long)o * OH * OW;",
        "const int oy = oy0 + threadIdx.y * PY + p;",
        "if (relu) v = fmaxf(v, 0.0f);",
        "Val<T>::store(yo + (long long)oy * OW + ox, v);",
    ])
