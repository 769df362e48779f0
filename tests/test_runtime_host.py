"""The GPU runtime's host side, on the CPU: validation, the interleaved layout, kernel loading, no-GPU errors."""

from __future__ import annotations

import importlib
import re

import numpy as np
import pytest
import torch
from helpers import gpu_skip_reason

from balprune.errors import FormatError, NoGpuError
from balprune.formats.balanced import BalancedTensor
from balprune.formats.bsr import BsrTensor
from balprune.patterns.block import block_mask, padded_tiles
from balprune.patterns.kinds import BalancedPattern
from balprune.prune.masks import one_shot_mask
from balprune.runtime import interleave_rows, kernel_name, kernel_variants, validate_balanced, validate_bsr
from balprune.runtime.balanced import vector_width
from balprune.runtime.bsr import bsr_geometry, choose_team_lanes, load_bytes, min_team_lanes, unroll
from balprune.runtime.bsr import kernel_name as bsr_kernel_name
from balprune.runtime.bsr import kernel_variants as bsr_kernel_variants
from balprune.runtime.kernels import kernel_source, kernels_dir


def _packed(rows=6, cols=100, blocks=8, sparsity=0.75, dtype=torch.float32, seed=0, block_size=None):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g).to(dtype)
    pattern = BalancedPattern(sparsity, blocks=None if block_size else blocks, block_size=block_size)
    mask = one_shot_mask(w, pattern)
    return BalancedTensor.from_dense(torch.where(mask, w, torch.zeros((), dtype=dtype)), pattern)


def _args(bt):
    g = bt.geometry
    return g.rows, g.cols, g.blocks, g.block_length, g.keep


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_validator_accepts_packed_tensors(dtype):
    bt = _packed(dtype=dtype)  # cols 100, L 13: the last block is ragged (9 real columns)
    validate_balanced(bt.values, bt.indices, *_args(bt))
    validate_balanced(bt.values.numpy() if dtype != torch.bfloat16 else bt.values, bt.indices.numpy(), *_args(bt))


def test_validator_accepts_uint16_indices():
    bt = _packed(rows=3, cols=600, blocks=2, sparsity=0.9)  # L = 300
    assert bt.indices.dtype == torch.uint16
    validate_balanced(bt.values, bt.indices, *_args(bt))


def _expect(bt, values, indices, match, **override):
    args = dict(zip(("rows", "cols", "blocks", "block_length", "keep"), _args(bt)))
    args.update(override)
    with pytest.raises(FormatError, match=match):
        validate_balanced(values, indices, **args)


def test_validator_rejects_index_out_of_range():
    bt = _packed()
    idx = bt.indices.clone()
    idx[2, -1, 3] = bt.geometry.block_length  # last slot, so the order still holds
    _expect(bt, bt.values, idx, r"index 13 >= block_length 13 at row 2, block 3")


def test_validator_rejects_unsorted_and_duplicated():
    bt = _packed()
    idx = bt.indices.clone()
    idx[1, 0, 2], idx[1, 1, 2] = idx[1, 1, 2].clone(), idx[1, 0, 2].clone()
    _expect(bt, bt.values, idx, r"row 1, block 2 are unsorted or duplicated")
    idx = bt.indices.clone()
    idx[4, 1, 0] = idx[4, 0, 0]
    _expect(bt, bt.values, idx, r"row 4, block 0 are unsorted or duplicated")


def test_validator_rejects_nonzero_padding():
    bt = _packed(rows=4, cols=100, blocks=8, sparsity=0.25)  # keep 10 of 13; last block has 9 real columns
    g = bt.geometry
    on_pad = (bt.indices[:, :, -1].to(torch.int64) + (g.blocks - 1) * g.block_length) >= g.cols
    assert bool(on_pad.any()), "the fixture must keep padding columns"
    r, t = torch.nonzero(on_pad)[0].tolist()
    vals = bt.values.clone()
    vals[r, t, -1] = 1.5
    _expect(bt, vals, bt.indices, r"non-zero value on padding column")


def test_validator_rejects_shapes_dtypes_layout():
    bt = _packed()
    _expect(bt, bt.values[:-1].contiguous(), bt.indices, r"values shape")
    _expect(bt, bt.values, bt.indices.permute(0, 2, 1).contiguous(), r"indices shape")
    _expect(bt, bt.values.to(torch.float64), bt.indices, r"values dtype")
    _expect(bt, bt.values, bt.indices.to(torch.int16), r"indices dtype")
    _expect(bt, bt.values, bt.indices.to(torch.uint16), r"must be torch.uint8")
    nc = bt.values.permute(0, 2, 1).contiguous().permute(0, 2, 1)
    _expect(bt, nc, bt.indices, r"not C-contiguous")
    _expect(bt, bt.values, bt.indices, r"blocks 9 is not ceil\(cols / block_length\) = 8", blocks=9)
    _expect(bt, bt.values, bt.indices, r"keep 14 exceeds block_length", keep=14)
    _expect(bt, bt.values, bt.indices, r"rows must be a positive int", rows=0)
    _expect(bt, [[1.0]], bt.indices, r"numpy array or a torch tensor")


def _read_like_kernel(vals2d, idx2d, k, B, vec):
    """Gather [R, k, B] back from the interleaved layout with the kernel's own offset formulas."""
    R = vals2d.shape[0]
    G, rem = k // vec, k % vec
    out_v = np.zeros((R, k, B), dtype=vals2d.dtype)
    out_i = np.zeros((R, k, B), dtype=idx2d.dtype)
    tail = G * B * vec
    for j in range(B):
        for g in range(G):
            off = (g * B + j) * vec
            out_v[:, g * vec:(g + 1) * vec, j] = vals2d[:, off:off + vec]
            out_i[:, g * vec:(g + 1) * vec, j] = idx2d[:, off:off + vec]
        for w in (4, 2, 1):
            if w < vec and rem & w:
                off = tail + B * (rem & ~(2 * w - 1)) + j * w
                slot = G * vec + (rem & ~(2 * w - 1))
                out_v[:, slot:slot + w, j] = vals2d[:, off:off + w]
                out_i[:, slot:slot + w, j] = idx2d[:, off:off + w]
    return out_v, out_i


@pytest.mark.parametrize("vec", [4, 8])
@pytest.mark.parametrize("k,B", [(26, 32), (5, 32), (7, 16), (1, 7), (15, 5), (32, 3), (8, 1), (3, 40)])
def test_interleaved_layout_matches_kernel_offsets(k, B, vec):
    rng = np.random.default_rng(k * 100 + B)
    R = 3
    vals = rng.standard_normal((R, k, B)).astype(np.float32)
    idx = rng.integers(0, 255, (R, k, B)).astype(np.uint8)
    v2, i2, stride = interleave_rows(vals, idx, vec)
    assert stride % 16 == 0 and stride >= k * B and v2.shape == (R, stride) and i2.shape == (R, stride)
    back_v, back_i = _read_like_kernel(v2, i2, k, B, vec)
    np.testing.assert_array_equal(back_v, vals)
    np.testing.assert_array_equal(back_i, idx)
    assert not v2[:, k * B:].any()  # row padding is zero


def test_kernel_source_inlines_headers():
    src = kernel_source("balanced_spmv.cu")
    assert not re.search(r'^\s*#\s*include\s*"', src, re.MULTILINE)
    assert "struct alignas(4 * NW) Words" in src and "balanced_spmm" in src
    assert (kernels_dir() / "README.md").is_file()


def test_kernel_names():
    assert kernel_name("bfloat16", "uint16", 4, 0, "direct") == \
        "bp::balanced_spmm<bp::bf16, unsigned short, 4, 0, false>"
    assert kernel_name("float32", "uint8", 1, 1, "interleaved") == \
        "bp::balanced_spmm<float, unsigned char, 1, 1, true>"
    names = kernel_variants()
    # staging 0 and 1 for every combination; 2 only for 16-bit values, NB >= 2, interleaved;
    # 3 (x raw) only for NB = 1, every dtype, index width and layout; the pipelined kernel with x
    # transposed or raw for every dtype and index width
    assert len(names) == len(set(names)) == 3 * 2 * 4 * 2 * 2 + 2 * 2 * 3 + 3 * 2 * 2 + 3 * 2 * 2
    assert "bp::balanced_spmm<float, unsigned short, 1, 3, false>" in names
    assert not any(n.split(", ")[3] == "3" and n.split(", ")[2] != "1" for n in names if "spmm" in n)
    assert "bp::balanced_spmm<bp::f16, unsigned char, 8, 2, true>" in names
    assert not any(n.startswith("bp::balanced_spmm<float,") and n.split(", ")[3] == "2" for n in names)
    assert "bp::balanced_spmv_tma<bp::f16, unsigned char, false>" in names
    assert "bp::balanced_spmv_tma<float, unsigned short, true>" in names
    assert vector_width("float32") == 4 and vector_width("bfloat16") == 8


@pytest.mark.skipif(gpu_skip_reason() is None, reason="a usable GPU is present: the no-GPU path cannot be observed here")
def test_import_without_gpu_and_load_raises_no_gpu(tmp_path):
    runtime = importlib.import_module("balprune.runtime")
    with pytest.raises(NoGpuError) as e:
        runtime.load(tmp_path / "missing.safetensors")
    assert e.value.exit_code == 6
    assert "CuPy" in e.value.message or "CUDA" in e.value.message
    bt = _packed()
    with pytest.raises(NoGpuError):
        runtime.BalancedLinear.from_tensor(bt)
    with pytest.raises(NoGpuError):
        runtime.BsrLinear.from_tensor(_bsr())


# ---------------------------------------------------------------------------------------------
# BSR (block pattern): host validation, launch geometry, and a model of the kernel's index math
# ---------------------------------------------------------------------------------------------

def _bsr(rows=37, cols=70, block_shape=(8, 8), sparsity=0.6, dtype=torch.float32, seed=0, empty_tile_rows=()):
    """A BsrTensor holding exactly the non-zero tiles of a block-pruned random matrix."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g).to(dtype)
    w = torch.where(block_mask(w, block_shape, sparsity), w, torch.zeros((), dtype=dtype))
    bh = block_shape[0]
    for tr in empty_tile_rows:
        w[tr * bh:(tr + 1) * bh] = 0
    nnzb = int((padded_tiles(w, block_shape) != 0).flatten(2).any(-1).sum())
    return BsrTensor.from_dense(w, block_shape, nnzb, sparsity)


def _bsr_args(bt):
    return bt.crow_indices, bt.col_indices, bt.values, bt.rows, bt.cols, bt.block_shape


def _expect_bsr(bt, match, crow=None, col=None, values=None, **override):
    args = dict(zip(("crow_indices", "col_indices", "values", "rows", "cols", "block_shape"), _bsr_args(bt)))
    args.update({k: v for k, v in (("crow_indices", crow), ("col_indices", col), ("values", values)) if v is not None})
    args.update(override)
    with pytest.raises(FormatError, match=match):
        validate_bsr(**args)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("rows,cols,block_shape", [(37, 70, (8, 8)), (32, 64, (8, 8)), (30, 70, (3, 5)),
                                                   (17, 9, (8, 1)), (5, 33, (1, 8)), (40, 40, (16, 16))])
def test_bsr_validator_accepts_packed_tensors(dtype, rows, cols, block_shape):
    bt = _bsr(rows, cols, block_shape, dtype=dtype, empty_tile_rows=(1,))
    assert bt.check("t") is None and int(bt.crow_indices[2] - bt.crow_indices[1]) == 0  # tile row 1 is empty
    validate_bsr(*_bsr_args(bt))
    if dtype != torch.bfloat16:  # numpy has no bfloat16
        validate_bsr(bt.crow_indices.numpy(), bt.col_indices.numpy(), bt.values.numpy(), bt.rows, bt.cols,
                     list(bt.block_shape))


def test_bsr_validator_accepts_no_tiles():
    z = torch.zeros(0, 4, 4)
    validate_bsr(torch.zeros(4, dtype=torch.int32), torch.zeros(0, dtype=torch.int32), z, 10, 10, (4, 4))


def test_bsr_validator_rejects_row_pointers():
    bt = _bsr()
    crow = bt.crow_indices.clone()
    crow[0] = 1
    _expect_bsr(bt, r"crow_indices\[0\] is 1, must be 0", crow=crow)
    crow = bt.crow_indices.clone()
    crow[-1] += 1
    _expect_bsr(bt, r"crow_indices\[-1\] is \d+, must be nnz_blocks = \d+", crow=crow)
    crow = bt.crow_indices.clone()
    crow[2] = crow[3] + 1  # tile row 2 ends before it starts
    _expect_bsr(bt, r"crow_indices decrease at tile row 2 ", crow=crow)


def test_bsr_validator_rejects_tile_columns():
    bt = _bsr()
    crow = bt.crow_indices
    r = 2
    a, b = int(crow[r]), int(crow[r + 1])
    assert b - a >= 2, "the fixture needs two tiles in tile row 2"
    col = bt.col_indices.clone()
    col[b - 1] = -(-bt.cols // 8)  # one past the last tile column
    _expect_bsr(bt, rf"tile column 9 out of range \[0, 9\) at tile row {r} \(position {b - 1}", col=col)
    col = bt.col_indices.clone()
    col[a] = -1
    _expect_bsr(bt, rf"tile column -1 out of range \[0, 9\) at tile row {r}", col=col)
    col = bt.col_indices.clone()
    col[a], col[a + 1] = col[a + 1].clone(), col[a].clone()
    _expect_bsr(bt, rf"tile columns of tile row {r} are unsorted or duplicated \(position {a + 1}", col=col)
    col = bt.col_indices.clone()
    col[a + 1] = col[a]
    _expect_bsr(bt, rf"tile columns of tile row {r} are unsorted or duplicated", col=col)


def test_bsr_validator_rejects_nonzero_padding():
    bt = _bsr(rows=37, cols=70)  # 37 = 4*8 + 5 rows, 70 = 8*8 + 6 cols: both edges are ragged
    crow, col = bt.crow_indices, bt.col_indices
    last_row_tiles = range(int(crow[-2]), int(crow[-1]))
    assert len(last_row_tiles) > 0
    vals = bt.values.clone()
    vals[last_row_tiles[0], 6, 0] = 1.0  # row 4*8 + 6 = 38 >= 37
    _expect_bsr(bt, rf"non-zero value below the last row \(rows = 37\) in the tile at tile row 4, tile column "
                    rf"{int(col[last_row_tiles[0]])}", values=vals)
    edge = torch.nonzero(col == 8).flatten()
    assert edge.numel() > 0
    vals = bt.values.clone()
    vals[int(edge[0]), 0, 7] = -2.0  # column 8*8 + 7 = 71 >= 70
    _expect_bsr(bt, r"non-zero value right of the last column \(cols = 70\) in the tile at tile row \d+, "
                    r"tile column 8", values=vals)


def test_bsr_validator_rejects_shapes_dtypes_layout():
    bt = _bsr()
    _expect_bsr(bt, r"values dtype", values=bt.values.to(torch.float64))
    _expect_bsr(bt, r"crow_indices dtype torch.int64 must be torch.int32", crow=bt.crow_indices.to(torch.int64))
    _expect_bsr(bt, r"col_indices dtype torch.int64 must be torch.int32", col=bt.col_indices.to(torch.int64))
    _expect_bsr(bt, r"crow_indices shape \[5\] is not \[ceil\(rows / bh\) \+ 1\] = \[6\]", crow=bt.crow_indices[:-1])
    _expect_bsr(bt, r"col_indices must be 1-D", col=bt.col_indices.view(1, -1))
    _expect_bsr(bt, r"values shape .* is not \[nnz_blocks, bh, bw\]", values=bt.values[:-1].contiguous())
    _expect_bsr(bt, r"values shape", block_shape=(8, 4))
    nc = bt.values.transpose(1, 2).contiguous().transpose(1, 2)
    _expect_bsr(bt, r"values is not C-contiguous", values=nc)
    col2 = torch.stack([bt.col_indices, bt.col_indices], 1)[:, 0]
    _expect_bsr(bt, r"col_indices is not C-contiguous", col=col2)
    _expect_bsr(bt, r"block_shape must be \[bh, bw\]", block_shape=(8,))
    _expect_bsr(bt, r"block_shape must be two positive ints", block_shape=(8, 0))
    _expect_bsr(bt, r"rows must be a positive int", rows=0)
    _expect_bsr(bt, r"numpy array or a torch tensor", values=[[1.0]])
    _expect_bsr(bt, r"exceeds the kernel's 32-bit indexing", rows=2**31)


def test_bsr_kernel_names_and_load_bytes():
    assert bsr_kernel_name("bfloat16", 2, 8) == "bp::bsr_spmm<bp::bf16, 2, 8>"
    assert bsr_kernel_name("float32", 16, 1) == "bp::bsr_spmm<float, 16, 1>"
    names = bsr_kernel_variants()
    assert len(names) == len(set(names)) == (3 + 4 + 4) * 4
    assert "bp::bsr_spmm<float, 2, 1>" not in names
    # the largest power of two <= 16 bytes dividing a tile row
    assert [load_bytes("float16", bw) for bw in (8, 16, 4, 1, 2, 3, 5, 12, 24)] == [16, 16, 8, 2, 4, 2, 2, 8, 16]
    assert [load_bytes("float32", bw) for bw in (8, 4, 1, 2, 3, 6)] == [16, 16, 4, 8, 4, 8]
    assert unroll(16, 1) == 4 and unroll(8, 1) == 8 and unroll(2, 1) == 8 and unroll(16, 8) == 2


BSR_SHAPES = {  # block shape: (rows, cols) of the modelled matrix (ragged on both edges)
    (8, 8): (37, 70), (4, 4): (30, 45), (16, 16): (40, 70), (1, 8): (9, 150), (8, 1): (37, 20), (3, 5): (31, 47),
    (12, 24): (40, 75), (2, 16): (21, 70), (40, 2): (90, 13), (1, 640): (5, 1500), (64, 64): (70, 70),
}


def _model_bsr_kernel(bt, dtype: str, team_lanes: int, threads: int, x: np.ndarray, nb: int):
    """bp::bsr_spmm's index math, lane by lane, in float64 (kernels/bsr_spmv.cu): y, loads per
    value element and pass, writes per y element. Asserts the kernel's trap conditions never hold
    and that each warp's reduction path is uniform (its shuffles need every lane)."""
    g = bsr_geometry(bt.rows, bt.cols, bt.block_shape, dtype)
    crow, tcol = bt.crow_indices.tolist(), bt.col_indices.tolist()
    vals = bt.values.to(torch.float64).numpy()
    batch = x.shape[1]
    bh, bw, SEG, nseg = g.bh, g.bw, g.seg, g.nseg
    nsegE, G = min(nseg, 32), -(-nseg // 32)
    TL = team_lanes
    W, S, teams = min(TL, 32), (TL // 32 if TL > 32 else 1), threads // TL
    assert TL & (TL - 1) == 0 and TL <= threads and bw % SEG == 0 and g.band_rows * nsegE <= min(32, TL)
    assert not (g.bands > 1 and TL < 32)
    UNR = unroll(g.load_bytes, nb)
    units = g.tile_rows * g.bands
    passes = -(-batch // nb)
    y = np.full((bt.rows, batch), np.nan)
    loads = np.zeros(vals.shape + (passes,), dtype=np.int64)
    writes = np.zeros((bt.rows, batch), dtype=np.int64)
    lane_ids = np.arange(32)
    for by in range(passes):
        n0 = by * nb
        nrem = min(nb, batch - n0)
        for bx in range(max(1, -(-units // teams))):
            acc = np.zeros((threads, nb))
            meta = []
            for t in range(threads):
                lane, team = t & 31, t // TL
                tl = t - team * TL
                m = {"wl": lane & (W - 1), "wt": tl >> 5, "team": team}
                unit = bx * teams + team
                m["valid"] = unit < units
                m["tr"], b = divmod(unit, g.bands)
                m["h0"] = h0 = b * g.band_rows
                m["hcur"] = hcur = min(g.band_rows, bh - h0)
                m["LPT"] = LPT = hcur * nsegE
                TPS = TL // LPT
                toff, i0 = divmod(tl, LPT)
                m["rl"], s_in = divmod(i0, nsegE)
                meta.append(m)
                if not (m["valid"] and toff < TPS):
                    continue
                t0, nt = crow[m["tr"]], crow[m["tr"] + 1] - crow[m["tr"]]
                r = h0 + m["rl"]
                chunks = []  # (tile, segment) of each chunk this lane loads, in the kernel's loop order
                if G == 1:
                    for v0 in range(toff, nt, TPS * UNR):
                        for u in range(UNR):
                            if v0 + u * TPS < nt:
                                chunks.append((t0 + v0 + u * TPS, s_in))
                else:
                    dq, dr = divmod(TPS, G)
                    for v0 in range(toff, nt * G, TPS * UNR):
                        trel, gg = divmod(v0, G)
                        for _ in range(UNR):
                            if trel < nt and gg * 32 + s_in < nseg:
                                chunks.append((t0 + trel, gg * 32 + s_in))
                            gg, trel = gg + dr, trel + dq
                            if gg >= G:
                                gg, trel = gg - G, trel + 1
                for n, s in chunks:
                    loads[n, r, s * SEG:(s + 1) * SEG, by] += 1
                    xc = tcol[n] * bw + s * SEG
                    e = np.arange(SEG)
                    ok = xc + e < bt.cols  # padding columns are skipped
                    acc[t, :nrem] += vals[n, r, s * SEG + e[ok]] @ x[xc + e[ok], n0:n0 + nrem]
            out = np.zeros((threads, nb))
            for wb in range(0, threads, 32):
                wm = meta[wb:wb + 32]
                assert len({m["LPT"] for m in wm}) == 1 and len({m["hcur"] for m in wm}) == 1, "non-uniform warp"
                LPT, hcur = wm[0]["LPT"], wm[0]["hcur"]
                a = acc[wb:wb + 32].copy()
                wl = lane_ids & (W - 1)
                if LPT & (LPT - 1) == 0:
                    o = 1
                    while o < nsegE:
                        a, o = a + a[lane_ids ^ o], o * 2
                    o = LPT
                    while o < W:
                        a, o = a + a[lane_ids ^ o], o * 2
                    out[wb:wb + 32] = a[(lane_ids & ~(W - 1)) + np.minimum(wl, hcur - 1) * nsegE]
                else:
                    rl = np.array([m["rl"] for m in wm])
                    for q in range(hcur):
                        v = np.where((rl == q)[:, None], a, 0.0)
                        o = 1
                        while o < W:
                            v, o = v + v[lane_ids ^ o], o * 2
                        out[wb:wb + 32][wl == q] = v[wl == q]
            if S > 1:
                red = {(m["team"], m["wt"], m["wl"]): out[t].copy() for t, m in enumerate(meta) if m["wl"] < m["hcur"]}
                for t, m in enumerate(meta):
                    if m["wt"] == 0 and m["wl"] < m["hcur"]:
                        out[t] = sum(red[(m["team"], k, m["wl"])] for k in range(S))
            for t, m in enumerate(meta):
                row = m["tr"] * bh + m["h0"] + m["wl"]
                if m["valid"] and m["wt"] == 0 and m["wl"] < m["hcur"] and row < bt.rows:
                    y[row, n0:n0 + nrem] = out[t, :nrem]
                    writes[row, n0:n0 + nrem] += 1
    return y, loads, writes


def _team_lane_choices(g, nnzb, threads):
    lo = min_team_lanes(g)
    auto = choose_team_lanes(g, nnzb, threads, multiprocessors=132)
    return sorted({lo, auto, *(t for t in (32, 64, threads) if lo <= t <= threads)})


@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("block_shape", list(BSR_SHAPES), ids=lambda s: f"{s[0]}x{s[1]}")
def test_bsr_kernel_model_matches_dense(block_shape, dtype):
    """Every value element is loaded exactly once per pass, every y element written once, and the
    lane-level sum equals the dense product, for each team size the runtime may pick."""
    rows, cols = BSR_SHAPES[block_shape]
    bt = _bsr(rows, cols, block_shape, sparsity=0.5, empty_tile_rows=(1,) if rows > 2 * block_shape[0] else ())
    g = bsr_geometry(rows, cols, block_shape, dtype)
    dense = bt.to_dense().to(torch.float64).numpy()
    threads = 256
    for tl in _team_lane_choices(g, bt.values.shape[0], threads):
        for batch in (1, 3, 17):
            nb = min(8, 1 << (batch - 1).bit_length())
            x = np.random.default_rng(batch).standard_normal((cols, batch))
            y, loads, writes = _model_bsr_kernel(bt, dtype, tl, threads, x, nb)
            assert (loads == 1).all(), f"team {tl}, batch {batch}: a value element loaded {loads.min()}..{loads.max()}x"
            assert (writes == 1).all(), f"team {tl}, batch {batch}: a y element written {writes.min()}..{writes.max()}x"
            np.testing.assert_allclose(y, dense @ x, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("block_shape,rows,cols", [((8, 8), 20, 1000), ((3, 5), 7, 700), ((1, 640), 2, 6000),
                                                   ((16, 16), 33, 900), ((8, 1), 17, 300), ((1, 8), 3, 900)])
def test_bsr_kernel_model_long_tile_rows(block_shape, rows, cols):
    """Tile rows of many tiles: several unrolled rounds per lane (and carries over virtual tiles)."""
    bt = _bsr(rows, cols, block_shape, sparsity=0.3)
    dense = bt.to_dense().to(torch.float64).numpy()
    for dtype in ("float32", "bfloat16"):
        g = bsr_geometry(rows, cols, block_shape, dtype)
        for tl in _team_lane_choices(g, bt.values.shape[0], 256):
            x = np.random.default_rng(tl).standard_normal((cols, 5))
            y, loads, writes = _model_bsr_kernel(bt, dtype, tl, 256, x, 8)
            assert (loads == 1).all() and (writes == 1).all()
            np.testing.assert_allclose(y, dense @ x, rtol=1e-12, atol=1e-12)


def test_bsr_kernel_model_small_ctas_and_no_tiles():
    bt = _bsr(37, 70, (8, 8), sparsity=0.5)
    x = np.random.default_rng(0).standard_normal((70, 2))
    for threads, tl in ((32, 8), (32, 32), (1024, 1024), (64, 64)):
        y, loads, writes = _model_bsr_kernel(bt, "float16", tl, threads, x, 2)
        assert (loads == 1).all() and (writes == 1).all()
        np.testing.assert_allclose(y, bt.to_dense().to(torch.float64).numpy() @ x, rtol=1e-12, atol=1e-12)
    empty = BsrTensor((20, 30), torch.float32, (4, 4), torch.zeros(6, dtype=torch.int32),
                      torch.zeros(0, dtype=torch.int32), torch.zeros(0, 4, 4), 1.0)
    y, _, writes = _model_bsr_kernel(empty, "float32", 4, 256, x[:30], 2)
    assert (writes == 1).all() and (y == 0).all()


@pytest.mark.parametrize("block_shape", list(BSR_SHAPES), ids=lambda s: f"{s[0]}x{s[1]}")
def test_bsr_team_lanes_choice(block_shape):
    for dtype in ("float32", "float16", "bfloat16"):
        for rows, cols, nnzb in ((4096, 4096, 26000), (20000, 512, 40000), (64, 64, 3), (16384, 8192, 200000)):
            g = bsr_geometry(rows, cols, block_shape, dtype)
            nnzb = min(nnzb, g.tile_rows * g.tile_cols)
            for threads in (32, 256, 1024):
                lo = min_team_lanes(g)
                if lo > threads:
                    continue
                for nb in (1, 8):
                    tl = choose_team_lanes(g, nnzb, threads, 132, nb)
                    assert tl & (tl - 1) == 0 and lo <= tl <= threads
                    assert g.lanes_per_tile <= min(32, tl) and not (g.bands > 1 and tl < 32)
