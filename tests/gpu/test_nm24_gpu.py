"""Nm24Linear (kernels/nm24_sparse_mma.cu, the sparse tensor cores) on a GPU against float64.

2:4 matrices (balanced, block length 4, keep 2) in fp16 and bf16: shapes whose rows are not a
multiple of the 16-row tile and whose columns end inside a k-tile or inside a k-tile pair, batch
1 to 16 (one and two MMAs per tile, the batch-1 32-bit x path and the general one), split K over
1 to 16 warps, the epilogues, and both stored encodings. Each launch writes into an output poisoned
with NaN (every element must be written) and is held to the product's rounding bound, as
test_bitmask_gpu.py does.
"""

from __future__ import annotations

import functools

import pytest
import torch
from helpers import gpu_skip_reason
from test_bitmask_gpu import _launch  # noqa: E402

SKIP = gpu_skip_reason()
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(SKIP is not None, reason=SKIP or "")]

from balprune.formats.balanced import BalancedTensor  # noqa: E402
from balprune.patterns.balanced import balanced_offsets, geometry_for  # noqa: E402
from balprune.patterns.kinds import BalancedPattern  # noqa: E402

DTYPES16 = (torch.float16, torch.bfloat16)
# name -> (rows, cols): tile-exact, ragged rows, cols ending inside a k-tile (x past cols must not
# be read as a product term), an odd number of k-tiles (half-empty last pair), tall, and LLM-like
SHAPES = {"16x64": (16, 64), "37x100": (37, 100), "5x36": (5, 36), "48x96": (48, 96), "70x1024": (70, 1024),
          "9000x256": (9000, 256), "256x4096": (256, 4096), "64x14336": (64, 14336)}


@functools.cache
def _packed(shape: str, dtype: torch.dtype, encoding: str) -> BalancedTensor:
    rows, cols = SHAPES[shape]
    w = torch.randn(rows, cols, generator=torch.Generator().manual_seed(rows * 7 + cols)).to(dtype)
    pattern = BalancedPattern(0.5, blocks=None, block_size=4)
    g = geometry_for(rows, cols, pattern)
    bt = BalancedTensor.from_offsets(w, pattern, balanced_offsets(w, g, dtype=g.index_dtype))
    return bt.with_encoding(encoding)


@pytest.mark.parametrize("batch", [1, 3, 8, 9, 16])
@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("dtype", DTYPES16, ids=lambda d: str(d).split(".")[-1])
def test_nm24_against_float64(dtype, shape, batch):
    from balprune.runtime.nm24 import Nm24Linear

    bt = _packed(shape, dtype, "bitmask")
    _launch(Nm24Linear.from_tensor(bt, validate=False), bt, batch)


@pytest.mark.parametrize("relu,bias", [(True, True), (False, True), (True, False)])
@pytest.mark.parametrize("batch", [1, 5])
@pytest.mark.parametrize("dtype", DTYPES16, ids=lambda d: str(d).split(".")[-1])
def test_nm24_epilogue(dtype, batch, relu, bias):
    from balprune.runtime.nm24 import Nm24Linear

    bt = _packed("70x1024", dtype, "offsets")
    _launch(Nm24Linear.from_tensor(bt), bt, batch, bias=bias, relu=relu)


def test_nm24_split_k_covers_every_pair():
    """Few row tiles -> many warps per CTA; a 2-pair row -> no more warps than pairs."""
    from balprune.runtime.nm24 import MAX_WARPS, Nm24Linear

    wide = Nm24Linear.from_tensor(_packed("64x14336", torch.float16, "bitmask"))
    narrow = Nm24Linear.from_tensor(_packed("48x96", torch.float16, "bitmask"))
    assert wide.warps() == MAX_WARPS and narrow.warps() == narrow.pairs == 2

