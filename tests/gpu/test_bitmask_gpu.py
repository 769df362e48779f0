"""BitmaskLinear (kernels/balanced_bitmask.cu) on a GPU against float64: encodings x dtypes x L x batch.

Every case packs a random matrix balanced, builds the bitmask operator from it, launches on an
output poisoned with NaN (every element must be written) and holds the result to the product's
rounding bound (helpers.assert_within_rounding, as test_balanced_gpu.py): fp32 accumulation of n
terms, one rounding to the output dtype. The block lengths sweep what the layout's segment rule
treats differently: L = 4 / 8 / 16 (N:M, several blocks per mask word), 32 (one word per block),
128 (B = 32 of K = 4096: the LLM q/o shape class), 448 (K = 14336), 1024, and ragged K (padding
kept by the fill-up rule, phantom blocks in the last segment).
"""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch
from helpers import DTYPES, assert_within_rounding, gpu_skip_reason  # noqa: E402

SKIP = gpu_skip_reason()
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(SKIP is not None, reason=SKIP or "")]

from balprune.formats.balanced import BalancedTensor  # noqa: E402
from balprune.patterns.balanced import balanced_offsets, geometry_for  # noqa: E402
from balprune.patterns.kinds import BalancedPattern  # noqa: E402

# L -> (rows, cols, sparsities): cols a multiple of L except the ragged cases
LENGTHS = {4: (70, 1024, (0.5,)), 8: (65, 1024, (0.5, 0.75)), 16: (40, 2048, (0.5, 0.875)),
           32: (33, 2048, (0.5, 0.7)), 128: (96, 4096, (0.5, 0.7, 0.8)), 448: (40, 14336, (0.5, 0.8)),
           1024: (20, 4096, (0.5, 0.9))}
RAGGED = {"K1500_b32": (50, 1500, BalancedPattern(0.5, blocks=32)),   # L=47: g*L not whole words
          "K970_L64": (30, 970, BalancedPattern(0.5, blocks=None, block_size=64)),  # padding kept
          "K33_b32": (9, 33, BalancedPattern(0.5, blocks=32)),         # L=2
          "K1000_b7": (11, 1000, BalancedPattern(0.7, blocks=7))}      # L=143, fewer lanes than 32
# empty mask words at 50%, kernels/NOTES.md v28: between kept columns (walk 6 takes its loop for that warp's
# round, the loop-free walk elsewhere) and a segment's first word (row 12: the loop-free walk's first take
# moves the next word in). GAPS[case] = [(row, first column, columns)] made tiny, so pruned
GAPS = {"L128_gaps": ((70, 4096, BalancedPattern(0.5, blocks=None, block_size=128)),
                      [(5, 3 * 128 + 32, 32), (40, 32, 64), (69, 31 * 128 + 32, 32), (12, 7 * 128, 32)])}


def _cases():
    for L, (rows, cols, sparsities) in LENGTHS.items():
        for s in sparsities:
            yield f"L{L}_s{s}", (rows, cols, BalancedPattern(s, blocks=None, block_size=L))
    yield from RAGGED.items()
    yield from ((case, shape) for case, (shape, _) in GAPS.items())


CASES = dict(_cases())


@functools.cache
def _packed(case: str, dtype: torch.dtype) -> BalancedTensor:
    rows, cols, pattern = CASES[case]
    gen = torch.Generator().manual_seed(hash(case) % 1000)
    w = torch.randn(rows, cols, generator=gen)
    for row, c0, n in GAPS[case][1] if case in GAPS else ():
        w[row, c0:c0 + n] *= 1e-3  # pruned: a whole mask word (or two) with no kept column
    w = w.to(dtype)
    g = geometry_for(rows, cols, pattern)
    return BalancedTensor.from_offsets(w, pattern, balanced_offsets(w, g, dtype=g.index_dtype)).with_encoding("bitmask")


def _launch(op, bt: BalancedTensor, batch: int, *, bias: bool = False, relu: bool = False):
    import cupy as cp

    from balprune.runtime.balanced import _host_numpy

    g = bt.geometry
    gen = torch.Generator().manual_seed(batch)
    x = torch.randn(*((g.cols,) if batch == 1 else (g.cols, batch)), generator=gen).to(bt.dtype)
    b = (torch.randn(g.rows, generator=gen) * 30.0).float() if bias else None
    xd = cp.asarray(_host_numpy(x))
    poison = 0x7FC0 if xd.dtype == cp.uint16 else np.nan
    y = cp.full((g.rows,) if batch == 1 else (g.rows, batch), poison, dtype=xd.dtype)
    launch = op.prepared_launch(xd, y, batch, bias=None if b is None else cp.asarray(b.numpy()), relu=relu)
    launch()
    launch()  # a second launch gives the same product (nothing accumulates into y)
    host = cp.asnumpy(y)
    got = torch.from_numpy(host.view(np.int16)).view(torch.bfloat16) if op.dtype == "bfloat16" else torch.from_numpy(host)
    dense = bt.to_dense().reshape(g.rows, -1).to(torch.float64)
    x64 = x.to(torch.float64).reshape(g.cols, -1)
    ref, absdot = dense @ x64, dense.abs() @ x64.abs()
    if b is not None:
        ref, absdot = ref + b.double()[:, None], absdot + b.double().abs()[:, None]
    if relu:
        ref = ref.relu()
    assert_within_rounding(got.reshape(ref.shape), ref, absdot, g.keep * g.blocks + 1, bt.dtype)


@pytest.mark.parametrize("walk", [5, 6, 7], ids=lambda w: f"walk{w}")
@pytest.mark.parametrize("batch", [1, 3, 4, 16])
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
def test_bitmask_against_float64(dtype, case, batch, walk):
    from balprune.runtime.bitmask import BitmaskLinear

    bt = _packed(case, dtype)
    op = BitmaskLinear.from_tensor(bt, validate=False, walk=walk)
    _launch(op, bt, batch)


@pytest.mark.parametrize("walk", [5, 6, 7], ids=lambda w: f"walk{w}")
@pytest.mark.parametrize("relu,bias", [(True, True), (False, True), (True, False)])
@pytest.mark.parametrize("batch", [1, 5])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
def test_bitmask_epilogue(dtype, batch, relu, bias, walk):
    from balprune.runtime.bitmask import BitmaskLinear

    bt = _packed("L128_s0.5", dtype)
    _launch(BitmaskLinear.from_tensor(bt, walk=walk), bt, batch, bias=bias, relu=relu)


@pytest.mark.parametrize("walk", [5, 6, 7], ids=lambda w: f"walk{w}")
def test_bitmask_tall_matrix_many_row_groups(walk):
    """Thousands of rows: every CTA of the persistent grid walks many row groups."""
    from balprune.runtime.bitmask import BitmaskLinear

    rows, cols = 9000, 1024
    pattern = BalancedPattern(0.5, blocks=None, block_size=4)  # 2:4
    w = torch.randn(rows, cols, generator=torch.Generator().manual_seed(3)).half()
    g = geometry_for(rows, cols, pattern)
    bt = BalancedTensor.from_offsets(w, pattern, balanced_offsets(w, g, dtype=g.index_dtype))
    op = BitmaskLinear.from_tensor(bt, walk=walk)
    assert op.launch_config(1)["grid"][0] * 8 * (32 // op.segments.lanes) < rows
    _launch(op, bt, 1)
    _launch(op, bt, 16)


#: tall matrices for the delta walk's runs of row groups: (rows, cols, pattern)
RUNS = {"L1024": (1100, 4096, BalancedPattern(0.5, blocks=None, block_size=1024)),  # 8 rows a group (4 lanes each)
        "L128": (900, 4096, BalancedPattern(0.7, blocks=32)),
        "L143": (4200, 1000, BalancedPattern(0.7, blocks=7)),  # 32 rows a group, one lane each
        "L16": (1000, 4096, BalancedPattern(0.875, blocks=None, block_size=16)),  # two rounds a group
        "L4": (1500, 4096, BalancedPattern(0.5, blocks=None, block_size=4))}  # 2:4, eight rounds a group


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("batch", [1, 2, 4, 16])
@pytest.mark.parametrize("case", list(RUNS))
def test_delta_walk_long_runs_of_row_groups(case, batch, dtype):
    """The delta walk gives each warp one contiguous run of row groups and keeps its look-ahead running across
    round and group ends (kernels/NOTES.md v39). On a grid of one SM's CTAs every warp walks many groups; a
    pruned-away run of 64 columns in a random third of the rows gives their groups phantom entries, so
    consecutive groups of a run have different step counts and rounds end inside a look-ahead window."""
    import dataclasses

    from balprune.runtime.bitmask import BitmaskLinear

    rows, cols, pattern = RUNS[case]
    gen = torch.Generator().manual_seed(rows + cols)
    w = torch.randn(rows, cols, generator=gen)
    for r in torch.randperm(rows, generator=gen)[: rows // 3].tolist():
        c0 = int(torch.randint(0, cols - 64, (1,), generator=gen))
        w[r, c0:c0 + 64] *= 1e-3
    w = w.to(dtype)
    g = geometry_for(rows, cols, pattern)
    bt = BalancedTensor.from_offsets(w, pattern, balanced_offsets(w, g, dtype=g.index_dtype))
    op = BitmaskLinear.from_tensor(bt, validate=False, walk=7)
    op.info = dataclasses.replace(op.info, multiprocessors=1)
    groups = -(-rows // op.segments.rows_per_group)
    assert op.launch_config(batch)["grid"][0] * 8 * 4 <= groups  # four or more row groups per warp
    _launch(op, bt, batch)


def test_operator_for_picks_the_stored_encoding():
    from balprune.runtime import BalancedLinear, operator_for
    from balprune.runtime.bitmask import BitmaskLinear

    bt = _packed("L128_s0.5", torch.float16)
    assert isinstance(operator_for(bt, validate=False), BitmaskLinear)
    assert isinstance(operator_for(bt.with_encoding("offsets"), validate=False), BalancedLinear)
