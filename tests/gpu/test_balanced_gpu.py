"""BalancedLinear on a GPU against float64 references: dtypes, index widths, ragged K, B, batch, layouts.

Two oracles for every case: a float64 sum computed from the packed arrays themselves, and the
float64 product of BalancedTensor.to_dense() with x (they agree to ~1e-15; both are checked).

Tolerance (per output element): the kernel converts values and x exactly to fp32, multiplies and
accumulates n = keep * blocks terms in fp32 (CuPy compiles with -ftz=true; random N(0,1) data has
no fp32 subnormal terms), then rounds once to the output dtype. So
    |y - ref| <= u_out * |ref| + n * 2^-24 * sum|w * x| + tiny,
u_out = 2^-24 (float32), 2^-11 (float16), 2^-8 (bfloat16); tiny = 2^-24 absolute for float16
(half of its smallest subnormal), else 1e-30. The summary ||y - ref|| / ||ref|| is also checked
against runtime.measure.product_tolerance (u_out + sqrt(n) 2^-24: the gate bench uses).
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
from balprune.formats.balanced import BalancedTensor  # noqa: E402
from balprune.patterns.kinds import BalancedPattern  # noqa: E402
from balprune.prune.masks import one_shot_mask  # noqa: E402

# name: (rows, cols, pattern). keep k per block and (for 16-bit / fp32) groups + tail pieces vary.
SHAPES = {
    "b32_L256_u8": (300, 8192, BalancedPattern(0.9, blocks=32)),           # k=26: the paper's shape class
    "b32_ragged_K1500": (130, 1500, BalancedPattern(0.9, blocks=32)),      # L=47, Kp=1504, k=5
    "b32_L300_u16": (77, 9600, BalancedPattern(0.9, blocks=32)),           # uint16 indices, k=30
    "b16": (100, 1000, BalancedPattern(0.9, blocks=16)),                   # 2 rows per warp
    "b7": (101, 1000, BalancedPattern(0.9, blocks=7)),                     # 4 rows per warp, lane 7 idle
    "b64": (50, 4096, BalancedPattern(0.9, blocks=64)),                    # 2 blocks per lane
    "L16_k7": (45, 700, BalancedPattern(0.5625, blocks=None, block_size=16)),           # 7:16, tail pieces 4+2+1
    "L64_k1": (40, 640, BalancedPattern(0.99, blocks=None, block_size=64)),             # k=1
    "pad_kept": (60, 970, BalancedPattern(0.5, blocks=None, block_size=64)),  # k=32; last block keeps 22 padding
    "tall_k4": (20000, 512, BalancedPattern(0.75, blocks=32)),             # many row groups per CTA: the ring wraps
    "tall_k16": (9000, 2048, BalancedPattern(0.75, blocks=32)),            # L=64, k=16: groups + rounds
}
SMALL = [name for name in SHAPES if not name.startswith("tall")]


@functools.cache
def _packed(shape: str, dtype: torch.dtype, seed: int) -> BalancedTensor:
    rows, cols, pattern = SHAPES[shape]
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g).to(dtype)
    mask = one_shot_mask(w, pattern)
    return BalancedTensor.from_dense(torch.where(mask, w, torch.zeros((), dtype=dtype)), pattern)


def _ref_from_packed(bt: BalancedTensor, x64: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(y, sum |w x|) in float64 from the packed arrays; x64 [K, N]."""
    g = bt.geometry
    cols = (torch.arange(g.blocks).view(1, 1, -1) * g.block_length + bt.indices.to(torch.int64))  # [R, k, B]
    xpad = torch.zeros(g.padded_width, x64.shape[1], dtype=torch.float64)
    xpad[: g.cols] = x64
    terms = bt.values.to(torch.float64).unsqueeze(-1) * xpad[cols]  # [R, k, B, N]
    return terms.sum((1, 2)), terms.abs().sum((1, 2))


def _check(y: torch.Tensor, bt: BalancedTensor, x: torch.Tensor) -> None:
    x64 = x.to(torch.float64).reshape(x.shape[0], -1)
    ref, absdot = _ref_from_packed(bt, x64)
    dense_ref = bt.to_dense().reshape(bt.geometry.rows, -1).to(torch.float64) @ x64
    torch.testing.assert_close(dense_ref, ref, rtol=1e-12, atol=1e-12)  # the two oracles agree
    assert_within_rounding(y, ref, absdot, bt.geometry.keep * bt.geometry.blocks, bt.dtype)


def _run(op, x_host: torch.Tensor, as_torch: bool = False) -> torch.Tensor:
    """Call op on a device copy of x_host; output poisoned with NaN first (every element must be written)."""
    import cupy as cp

    from balprune.runtime.balanced import _host_numpy

    if as_torch:
        y = op(x_host.to(f"cuda:{op.device}"))
        return y.cpu()
    xd = cp.asarray(_host_numpy(x_host))
    shape = (op.rows,) if x_host.dim() == 1 else (op.rows, x_host.shape[1])
    poison = 0x7FC0 if xd.dtype == cp.uint16 else np.nan  # bfloat16 travels as uint16 bits
    out = cp.full(shape, poison, dtype=xd.dtype)
    y = op(xd, out=out)
    assert y is out
    host = cp.asnumpy(y)
    if op.dtype == "bfloat16":
        return torch.from_numpy(host.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(host)


def _x(bt: BalancedTensor, batch: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed + 7)
    shape = (bt.geometry.cols,) if batch == 1 else (bt.geometry.cols, batch)
    return torch.randn(*shape, generator=g).to(bt.dtype)


@pytest.mark.parametrize("batch", [1, 3, 8])
@pytest.mark.parametrize("shape", SMALL)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
def test_interleaved_shared_x(dtype, shape, batch):
    from balprune.runtime import BalancedLinear

    bt = _packed(shape, dtype, seed=1)
    op = BalancedLinear.from_tensor(bt)
    x = _x(bt, batch, seed=batch)
    assert op.plan(batch)[1] != 0, "x should fit in shared memory for these shapes"
    assert op.launch_config(batch)["pipelined"] == (batch == 1 and dtype != torch.float32)
    _check(_run(op, x), bt, x)


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("shape", ["b32_L256_u8", "b32_ragged_K1500", "b32_L300_u16", "b7", "L16_k7"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["float32", "float16"])
@pytest.mark.parametrize("layout,staging,pipeline", [("direct", "auto", "auto"), ("interleaved", "global", "auto"),
                                                     ("direct", "global", "auto"), ("interleaved", "auto", False),
                                                     ("interleaved", "raw", False), ("direct", "raw", "auto")])
def test_other_layouts_and_global_x(dtype, shape, batch, layout, staging, pipeline):
    from balprune.runtime import BalancedLinear

    bt = _packed(shape, dtype, seed=2)
    op = BalancedLinear.from_tensor(bt, layout=layout, staging=staging, pipeline=pipeline)
    x = _x(bt, batch, seed=10 + batch)
    assert not op.launch_config(batch)["pipelined"]
    if staging == "raw":  # x copied as it is at batch 1; other batches stage as "auto"
        assert op.launch_config(batch)["staging"] == (3 if batch == 1 else op.plan(batch)[1])
    _check(_run(op, x), bt, x)


@pytest.mark.parametrize("shape", ["b32_L256_u8", "b32_ragged_K1500", "b32_L300_u16", "b7", "b64", "L16_k7",
                                   "L64_k1", "tall_k4", "tall_k16"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("threads,stages,team_warps", [(512, 0, 0), (32, 2, 0), (128, 3, 0), (1024, 0, 0),
                                                       (1024, 0, 4), (1024, 0, 2), (1024, 5, 8)])
@pytest.mark.parametrize("staging", ["auto", "raw"])
def test_pipelined_batch1(dtype, shape, threads, stages, team_warps, staging):
    """The bulk-copy pipeline: ring depths, teams of 1..16 warps, partial last group, several rounds
    per CTA; x transposed to fp32 or kept as it is ("raw")."""
    from balprune.runtime import BalancedLinear

    bt = _packed(shape, dtype, seed=8)
    op = BalancedLinear.from_tensor(bt, pipeline=True, threads=threads, stages=stages, team_warps=team_warps,
                                    staging=staging)
    plan = op.pipeline_plan()
    if plan is None:
        pytest.skip(f"{threads} threads, {stages} stages, teams of {team_warps} do not fit shared memory here")
    ncw, group, nstages, _ = plan
    assert nstages % (ncw // (group // (32 // op.lanes_per_row))) == 0  # each stage belongs to one team
    cfg = op.launch_config(1)
    assert cfg["pipelined"] and (stages == 0 or cfg["stages"] == stages)
    assert cfg["staging"] == (3 if staging == "raw" else 1)
    for seed in (1, 2):
        x = _x(bt, 1, seed=20 + seed)
        _check(_run(op, x), bt, x)


@pytest.mark.parametrize("shape", ["tall_k4", "tall_k16"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["float32", "float16"])
def test_default_operator_repeated_launches(dtype, shape):
    """Many back-to-back launches of the default batch-1 path on a tall matrix (the ring wraps
    many times per CTA): every result stays right (races between launches or phases show here)."""
    import cupy as cp

    from balprune.runtime import BalancedLinear
    from balprune.runtime.balanced import _host_numpy

    bt = _packed(shape, dtype, seed=11)
    op = BalancedLinear.from_tensor(bt, pipeline=True)
    assert op.launch_config(1)["pipelined"]
    x = _x(bt, 1, seed=40)
    xd = cp.asarray(_host_numpy(x))
    ys = [cp.full((op.rows,), np.nan, dtype=xd.dtype) for _ in range(40)]
    for y in ys:
        op(xd, out=y)
    cp.cuda.Device().synchronize()
    first = cp.asnumpy(ys[0])
    _check(torch.from_numpy(first), bt, x)
    for y in ys[1:]:
        np.testing.assert_array_equal(cp.asnumpy(y), first)  # same input, same bits, every launch


@pytest.mark.parametrize("staging", ["auto", "raw"])
@pytest.mark.parametrize("shape", ["b32_L256_u8", "b32_ragged_K1500", "b7"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
def test_pipelined_unaligned_x(dtype, shape, staging):
    """x not 16-byte aligned: the pipeline stages x with loads instead of one bulk copy."""
    import cupy as cp

    from balprune.runtime import BalancedLinear
    from balprune.runtime.balanced import _host_numpy

    bt = _packed(shape, dtype, seed=9)
    op = BalancedLinear.from_tensor(bt, pipeline=True, staging=staging)
    x = _x(bt, 1, seed=30)
    host = _host_numpy(x)
    big = cp.zeros(host.shape[0] + 1, dtype=host.dtype)
    big[1:] = cp.asarray(host)
    xd = big[1:]
    assert xd.data.ptr % 16 != 0 and xd.flags.c_contiguous
    y = cp.asnumpy(op(xd))
    got = torch.from_numpy(y.view(np.int16)).view(torch.bfloat16) if op.dtype == "bfloat16" else torch.from_numpy(y)
    _check(got, bt, x)


@pytest.mark.parametrize("threads", [32, 256, 1024])
def test_threads_per_cta(threads):
    from balprune.runtime import BalancedLinear

    bt = _packed("b32_L256_u8", torch.float16, seed=3)
    op = BalancedLinear.from_tensor(bt, threads=threads)
    x = _x(bt, 1, seed=3)
    _check(_run(op, x), bt, x)


def test_batch_larger_than_one_tile():
    from balprune.runtime import BalancedLinear

    bt = _packed("b16", torch.float32, seed=4)
    op = BalancedLinear.from_tensor(bt)
    x = _x(bt, 21, seed=4)  # 8 + 8 + 5 columns: three passes, the last one partial
    _check(_run(op, x), bt, x)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
def test_torch_tensors_through_dlpack(dtype):
    if not torch.cuda.is_available():
        pytest.skip("torch has no CUDA here")
    from balprune.runtime import BalancedLinear

    bt = _packed("b32_ragged_K1500", dtype, seed=5)
    op = BalancedLinear.from_tensor(bt)
    for batch in (1, 4):
        x = _x(bt, batch, seed=5 + batch)
        y = _run(op, x, as_torch=True)
        assert y.dtype == dtype
        _check(y, bt, x)


def test_fresh_inputs_same_operator():
    """Same operator, new random x each call: no state carried between launches."""
    from balprune.runtime import BalancedLinear

    bt = _packed("b32_L256_u8", torch.float32, seed=6)
    op = BalancedLinear.from_tensor(bt)
    for seed in range(3):
        x = _x(bt, 1, seed=100 + seed)
        _check(_run(op, x), bt, x)


def test_input_checks():
    import cupy as cp

    from balprune.runtime import BalancedLinear

    bt = _packed("b16", torch.float16, seed=7)
    op = BalancedLinear.from_tensor(bt)
    K = bt.geometry.cols
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
        op(cp.zeros(K, dtype=cp.float16), out=cp.zeros(bt.geometry.rows + 1, dtype=cp.float16))


def test_load_packed_file(cli, small_pt, tmp_path):
    """runtime.load on a file written by the CLI: every pruned layer's operator matches its dense matrix."""
    import cupy as cp

    from balprune import runtime
    from balprune.formats.packed_file import read_packed

    out = tmp_path / "m.balanced.safetensors"
    r = cli("prune", small_pt, "--blocks", "4", "--sparsity", "0.75", "-o", out)
    assert r.code == 0, r
    ops = runtime.load(out)
    pf = read_packed(out)
    assert ops, "no operators"
    for name, op in ops.items():
        dense = pf.dense(name)
        m = dense.reshape(dense.shape[0], -1).to(torch.float64)
        x = torch.randn(m.shape[1]).to(dense.dtype)
        y = cp.asnumpy(op(cp.asarray(x.numpy())))
        ref = (m @ x.to(torch.float64)).numpy()
        np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())
