"""BsrLinear on a GPU against float64 references: dtypes, tile shapes, ragged edges, empty tile rows, batch.

Oracle: the float64 product of BsrTensor.to_dense() (edge tiles cropped) with x.

Tolerance (per output element), the argument of tests/gpu/test_balanced_gpu.py: the kernel
converts values and x exactly to fp32, multiplies and accumulates the n terms of a row in fp32
(n = bw * the tiles of the row's tile row, summed in any order: lane partials, then a shuffle
tree, then across warps), then rounds once to the output dtype. So
    |y - ref| <= u_out * |ref| + n * 2^-24 * sum|w * x| + tiny,
u_out = 2^-24 (float32), 2^-11 (float16), 2^-8 (bfloat16); tiny = 2^-24 absolute for float16
(half of its smallest subnormal), else 1e-30. The summary ||y - ref|| / ||ref|| is also checked
against 1e-5 / 2e-3 / 1.6e-2.
"""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch
from helpers import DTYPES, assert_within_rounding, gpu_skip_reason  # noqa: E402

SKIP = gpu_skip_reason()
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(SKIP is not None, reason=SKIP or "")]

from balprune.errors import UsageError  # noqa: E402
from balprune.formats.bsr import BsrTensor  # noqa: E402
from balprune.patterns.block import block_mask, padded_tiles  # noqa: E402
from balprune.runtime.balanced import _host_numpy  # noqa: E402

# name: (rows, cols, block shape, sparsity, empty tile rows). Rows and cols are not multiples of
# the tile (ragged edge tiles) except where noted; chunk bytes and bands per tile row in comments
# are for float16 / float32.
SHAPES = {
    "8x8": (300, 1003, (8, 8), 0.8, (0, 5, 37)),       # 16 B chunks; 8 / 16 lanes per tile
    "4x4": (130, 517, (4, 4), 0.7, (3,)),              # 8 / 16 B chunks, 4 lanes per tile
    "16x16": (200, 1000, (16, 16), 0.8, (2,)),         # fp32: 2 bands of 8 rows per tile row; cols exact
    "1x8": (77, 1500, (1, 8), 0.9, (10, 11)),          # one lane (fp16) per tile: sub-warp teams
    "8x1": (150, 333, (8, 1), 0.8, (4,)),              # 2 / 4 B chunks
    "3x5": (100, 203, (3, 5), 0.6, (7,)),              # 15 lanes per tile: the generic reduction
    "12x24": (100, 500, (12, 24), 0.7, (1,)),          # bands of 10+2 / 5+5+2 rows: generic reduction
    "2x16": (61, 700, (2, 16), 0.8, (0,)),             # non-square, powers of two
    "40x2": (130, 90, (40, 2), 0.5, (1,)),             # 2 bands of 32+8 rows
    "1x640": (9, 3000, (1, 640), 0.3, (4,)),           # rows of 80 / 160 chunks: virtual tiles
    "64x64": (200, 300, (64, 64), 0.5, ()),            # 16 / 32 bands of 4 / 2 rows
}
BATCHES = [1, 2, 3, 8, 17, 64]


@functools.cache
def _packed(shape: str, dtype: torch.dtype, seed: int, extra_zero_tiles: int = 0) -> BsrTensor:
    """Exactly the non-zero tiles of a block-pruned random matrix (plus ``extra_zero_tiles``
    stored zero tiles, which from_dense picks at the lowest free tile indices)."""
    rows, cols, block_shape, sparsity, empty = SHAPES[shape]
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g).to(dtype)
    w = torch.where(block_mask(w, block_shape, sparsity), w, torch.zeros((), dtype=dtype))
    bh = block_shape[0]
    for tr in empty:
        w[tr * bh:(tr + 1) * bh] = 0
    nnzb = int((padded_tiles(w, block_shape) != 0).flatten(2).any(-1).sum()) + extra_zero_tiles
    bt = BsrTensor.from_dense(w, block_shape, nnzb, sparsity)
    crow = bt.crow_indices
    for tr in empty:  # the fixture really has empty tile rows
        assert extra_zero_tiles or int(crow[tr + 1] - crow[tr]) == 0
    return bt


def _check(y: torch.Tensor, bt: BsrTensor, x: torch.Tensor) -> None:
    x64 = x.to(torch.float64).reshape(x.shape[0], -1)
    dense = bt.to_dense().reshape(bt.rows, -1).to(torch.float64)
    ref, absdot = dense @ x64, dense.abs() @ x64.abs()
    bh, bw = bt.block_shape
    tiles = (bt.crow_indices[1:] - bt.crow_indices[:-1]).to(torch.float64)  # per tile row
    n = (tiles.repeat_interleave(bh)[: bt.rows] * bw).clamp(min=1).unsqueeze(1)
    assert_within_rounding(y, ref, absdot, n, bt.dtype)


def _from_device(op, y) -> torch.Tensor:
    import cupy as cp

    host = cp.asnumpy(y)
    if op.dtype == "bfloat16":
        return torch.from_numpy(host.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(host)


def _run(op, x_host: torch.Tensor, as_torch: bool = False, offset: int = 0) -> torch.Tensor:
    """Call op on a device copy of x_host (``offset`` elements into a larger buffer: an x that is
    not 16-byte aligned); output poisoned with NaN first (every element must be written)."""
    import cupy as cp

    if as_torch:
        y = op(x_host.to(f"cuda:{op.device}"))
        assert y.dtype == x_host.dtype and y.is_cuda
        return y.cpu()
    host = _host_numpy(x_host)
    if offset:
        big = cp.zeros(host.size + offset, dtype=host.dtype)
        big[offset:] = cp.asarray(host.reshape(-1))
        xd = big[offset:].reshape(host.shape)
        assert xd.data.ptr % 16 != 0 and xd.flags.c_contiguous
    else:
        xd = cp.asarray(host)
    shape = (op.rows,) if x_host.dim() == 1 else (op.rows, x_host.shape[1])
    poison = 0x7FC0 if xd.dtype == cp.uint16 else np.nan  # bfloat16 travels as uint16 bits
    out = cp.full(shape, poison, dtype=xd.dtype)
    y = op(xd, out=out)
    assert y is out
    return _from_device(op, y)


def _x(bt: BsrTensor, batch: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed + 7)
    shape = (bt.cols,) if batch == 1 else (bt.cols, batch)
    return torch.randn(*shape, generator=g).to(bt.dtype)


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
def test_bsr_matches_dense(dtype, shape, batch):
    from balprune.runtime import BsrLinear

    bt = _packed(shape, dtype, seed=1)
    op = BsrLinear.from_tensor(bt)
    x = _x(bt, batch, seed=batch)
    _check(_run(op, x), bt, x)


@pytest.mark.parametrize("batch", [1, 17])
@pytest.mark.parametrize("shape", ["8x8", "1x8", "3x5", "12x24", "1x640", "40x2"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("threads,team_lanes", [(256, "min"), (256, 64), (256, 256), (1024, 1024), (32, 32)])
def test_bsr_team_sizes(dtype, shape, batch, threads, team_lanes):
    """Sub-warp teams, one warp, and teams of 2..32 warps (shared-memory reduction)."""
    from balprune.runtime import BsrLinear
    from balprune.runtime.bsr import min_team_lanes

    bt = _packed(shape, dtype, seed=2)
    probe = BsrLinear.from_tensor(bt)
    tl = min_team_lanes(probe.geometry) if team_lanes == "min" else team_lanes
    if not min_team_lanes(probe.geometry) <= tl <= threads:
        pytest.skip(f"team of {tl} lanes is not valid for {shape}")
    op = BsrLinear.from_tensor(bt, threads=threads, team_lanes=tl)
    assert op.launch_config(batch)["team_lanes"] == tl
    x = _x(bt, batch, seed=20 + batch)
    _check(_run(op, x), bt, x)


@pytest.mark.parametrize("batch", [1, 2, 8])
@pytest.mark.parametrize("shape", ["8x8", "4x4", "8x1", "3x5", "1x640"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
def test_bsr_unaligned_x(dtype, shape, batch):
    """x not 16-byte aligned: the kernel falls back from vector to scalar x loads by itself."""
    from balprune.runtime import BsrLinear

    bt = _packed(shape, dtype, seed=3)
    op = BsrLinear.from_tensor(bt)
    x = _x(bt, batch, seed=30 + batch)
    _check(_run(op, x, offset=1), bt, x)


@pytest.mark.parametrize("shape", ["8x8", "3x5", "1x8"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
def test_torch_tensors_through_dlpack(dtype, shape):
    if not torch.cuda.is_available():
        pytest.skip("torch has no CUDA here")
    from balprune.runtime import BsrLinear

    bt = _packed(shape, dtype, seed=5)
    op = BsrLinear.from_tensor(bt)
    for batch in (1, 4, 17):
        x = _x(bt, batch, seed=5 + batch)
        y = _run(op, x, as_torch=True)
        assert tuple(y.shape) == ((bt.rows,) if batch == 1 else (bt.rows, batch))
        _check(y, bt, x)


TALL = {"tall_8x8": (20000, 512, (8, 8), 0.75), "tall_1x8": (20000, 300, (1, 8), 0.8),
        "tall_16x16": (20000, 1000, (16, 16), 0.9)}


@functools.cache
def _tall(name: str, dtype: torch.dtype) -> BsrTensor:
    rows, cols, block_shape, sparsity = TALL[name]
    g = torch.Generator().manual_seed(11)
    w = torch.randn(rows, cols, generator=g).to(dtype)
    w = torch.where(block_mask(w, block_shape, sparsity), w, torch.zeros((), dtype=dtype))
    nnzb = int((padded_tiles(w, block_shape) != 0).flatten(2).any(-1).sum())
    return BsrTensor.from_dense(w, block_shape, nnzb, sparsity)


@pytest.mark.parametrize("batch", [1, 8, 17])
@pytest.mark.parametrize("name", list(TALL))
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
def test_bsr_tall(dtype, name, batch):
    from balprune.runtime import BsrLinear

    bt = _tall(name, dtype)
    op = BsrLinear.from_tensor(bt)
    x = _x(bt, batch, seed=40 + batch)
    _check(_run(op, x), bt, x)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["float32", "float16"])
def test_bsr_repeated_launches(dtype):
    """Many back-to-back launches (multi-warp teams: shared memory and barriers): same bits every time."""
    import cupy as cp

    from balprune.runtime import BsrLinear

    bt = _tall("tall_8x8", dtype)
    op = BsrLinear.from_tensor(bt, team_lanes=128)
    x = _x(bt, 1, seed=50)
    xd = cp.asarray(_host_numpy(x))
    ys = [cp.full((op.rows,), np.nan, dtype=xd.dtype) for _ in range(40)]
    for y in ys:
        op(xd, out=y)
    cp.cuda.Device().synchronize()
    first = cp.asnumpy(ys[0])
    _check(torch.from_numpy(first), bt, x)
    for y in ys[1:]:
        np.testing.assert_array_equal(cp.asnumpy(y), first)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
def test_bsr_stored_zero_tiles(dtype):
    """Explicitly stored all-zero tiles (from_dense fills up to nnz_blocks with them) change nothing."""
    from balprune.runtime import BsrLinear

    bt = _packed("8x8", dtype, seed=6, extra_zero_tiles=25)
    op = BsrLinear.from_tensor(bt)
    for batch in (1, 8):
        x = _x(bt, batch, seed=60 + batch)
        _check(_run(op, x), bt, x)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
def test_bsr_no_tiles(dtype):
    """A layer with no stored tile: every output element is written, and is 0."""
    from balprune.runtime import BsrLinear

    bt = BsrTensor((50, 70), dtype, (8, 8), torch.zeros(8, dtype=torch.int32), torch.zeros(0, dtype=torch.int32),
                   torch.zeros(0, 8, 8, dtype=dtype), 1.0)
    op = BsrLinear.from_tensor(bt)
    for batch in (1, 3):
        y = _run(op, _x(bt, batch, seed=70))
        assert bool((y == 0).all())


def test_fresh_inputs_same_operator():
    from balprune.runtime import BsrLinear

    bt = _packed("8x8", torch.float32, seed=8)
    op = BsrLinear.from_tensor(bt)
    for seed in range(3):
        x = _x(bt, 1, seed=100 + seed)
        _check(_run(op, x), bt, x)


def test_input_checks():
    import cupy as cp

    from balprune.runtime import BsrLinear

    bt = _packed("4x4", torch.float16, seed=7)
    op = BsrLinear.from_tensor(bt)
    K = bt.cols
    with pytest.raises(UsageError, match="dtype"):
        op(cp.zeros(K, dtype=cp.float32))
    with pytest.raises(UsageError, match="shape"):
        op(cp.zeros(K + 1, dtype=cp.float16))
    with pytest.raises(UsageError, match="shape"):
        op(cp.zeros((K, 2, 2), dtype=cp.float16))
    with pytest.raises(UsageError, match="contiguous"):
        op(cp.zeros((2, K), dtype=cp.float16).T)
    with pytest.raises(UsageError, match="CuPy array or a torch"):
        op(np.zeros(K, dtype=np.float16))
    with pytest.raises(UsageError, match="out must be"):
        op(cp.zeros(K, dtype=cp.float16), out=cp.zeros(bt.rows + 1, dtype=cp.float16))
    with pytest.raises(UsageError, match="threads must be a power of two"):
        BsrLinear.from_tensor(bt, threads=96)
    with pytest.raises(UsageError, match="team_lanes 2 must lie in"):
        BsrLinear.from_tensor(bt, team_lanes=2)  # a 4x4 tile needs 4 lanes
    bt32 = _packed("4x4", torch.float32, seed=7)
    with pytest.raises(UsageError, match="bfloat16"):
        BsrLinear.from_tensor(_packed("4x4", torch.bfloat16, seed=7))(cp.zeros(K, dtype=cp.float32))
    assert BsrLinear.from_tensor(bt32).weight_bytes == bt32.values.numel() * 4 + (bt32.col_indices.numel()
                                                                                     + bt32.crow_indices.numel()) * 4


def test_prepared_launch_matches_call():
    import cupy as cp

    from balprune.runtime import BsrLinear

    bt = _packed("8x8", torch.float16, seed=9)
    op = BsrLinear.from_tensor(bt)
    x = _x(bt, 8, seed=9)
    xd = cp.asarray(_host_numpy(x))
    y = cp.full((op.rows, 8), np.nan, dtype=cp.float16)
    launch = op.prepared_launch(xd, y, 8)
    launch()
    launch()
    _check(_from_device(op, y), bt, x)


def test_load_packed_file(cli, small_pt, tmp_path):
    """runtime.load on a block-pattern file written by the CLI: BsrLinear operators matching their dense matrix."""
    import cupy as cp

    from balprune import runtime
    from balprune.formats.packed_file import read_packed

    out = tmp_path / "m.block.safetensors"
    r = cli("prune", small_pt, "--pattern", "block", "--block-shape", "4x4", "--sparsity", "0.5", "-o", out)
    assert r.code == 0, r
    ops = runtime.load(out, threads=128, team_lanes=32)
    pf = read_packed(out)
    assert ops, "no operators"
    for name, op in ops.items():
        assert isinstance(op, runtime.BsrLinear), (name, op)
        dense = pf.dense(name)
        m = dense.reshape(dense.shape[0], -1).to(torch.float64)
        x = torch.randn(m.shape[1]).to(dense.dtype)
        y = cp.asnumpy(op(cp.asarray(x.numpy())))
        ref = (m @ x.to(torch.float64)).numpy()
        np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())
