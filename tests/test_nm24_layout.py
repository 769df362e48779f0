"""The 2:4 sparse-tensor-core layout (formats.layouts.nm24_records), on the CPU.

nm24_reference reads the records the way kernels/nm24_sparse_mma.cu hands them to mma.sp (A
fragments per lane, metadata words per lane and selector); these tests hold the builder to it
against the dense matrix over random 2:4 matrices (rows not a multiple of the tile, columns ending
inside a k-tile or pair, slots stored in either order), check the padding is a valid hardware
pattern, the kernel-side constants against the .cu source, and that the operator refuses what the
sparse MMA cannot run before touching a GPU. Whether the hardware reads the bytes this way is
tests/gpu/test_nm24_gpu.py's job.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from balprune.errors import UsageError
from balprune.formats import BalancedTensor, layouts
from balprune.formats.layouts import NM24_RECORD_BYTES, is_nm24, nm24_records, nm24_reference
from balprune.patterns.balanced import balanced_offsets, geometry_for
from balprune.patterns.kinds import BalancedPattern
from balprune.runtime.kernels import kernel_source


def _random_24(rows: int, cols: int, seed: int, dtype=torch.float16) -> BalancedTensor:
    w = torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed)).to(dtype)
    pattern = BalancedPattern(0.5, blocks=None, block_size=4)
    g = geometry_for(rows, cols, pattern)
    return BalancedTensor.from_offsets(w, pattern, balanced_offsets(w, g, dtype=g.index_dtype))


def _np_values(bt: BalancedTensor) -> tuple[np.ndarray, np.dtype]:
    if bt.values.dtype == torch.bfloat16:
        return bt.values.view(torch.int16).numpy().view(np.uint16), np.dtype(np.uint16)
    return bt.values.numpy(), bt.values.numpy().dtype


@pytest.mark.parametrize("rows,cols", [(16, 64), (37, 100), (5, 36), (48, 96), (3, 4), (33, 260)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
def test_records_compute_the_dense_product(rows, cols, dtype):
    bt = _random_24(rows, cols, rows * 31 + cols, dtype)
    vals, vd = _np_values(bt)
    rec = nm24_records(vals, bt.indices.numpy())
    kt = -(-bt.geometry.blocks // 8)
    assert rec.shape == (-(-rows // 16), -(-kt // 2), NM24_RECORD_BYTES)
    x = np.random.default_rng(0).standard_normal((cols, 3))
    dense = bt.to_dense().reshape(rows, -1).double().numpy()
    np.testing.assert_allclose(nm24_reference(rec, rows, cols, x, vd), dense @ x, rtol=0, atol=1e-9)


def test_slot_order_does_not_matter():
    """The two kept entries of a block may be stored in either slot order: the layout sorts them."""
    bt = _random_24(20, 64, 5)
    vals, vd = _np_values(bt)
    idx = bt.indices.numpy()
    rec = nm24_records(vals, idx)
    swapped = nm24_records(vals[:, ::-1].copy(), idx[:, ::-1].copy())
    assert np.array_equal(rec, swapped)


def test_padding_is_a_valid_hardware_pattern():
    """Every metadata nibble is one of the six valid 2:4 codes (never 0b0000/0b0101/0b1010/0b1111),
    including rows past R and blocks past the row (zero values at indices 0, 1)."""
    bt = _random_24(5, 36, 1)
    vals, _ = _np_values(bt)
    rec = nm24_records(vals, bt.indices.numpy())
    words = rec[:, :, 1024:].copy().view("<u4").ravel()
    nibbles = (words[:, None] >> (4 * np.arange(8, dtype=np.uint32))) & 15
    assert set(np.unique(nibbles)) <= {0b0100, 0b1000, 0b1100, 0b1001, 0b1101, 0b1110}


def test_records_are_deterministic_and_refuse_other_keeps():
    bt = _random_24(40, 128, 9)
    vals, _ = _np_values(bt)
    assert np.array_equal(nm24_records(vals, bt.indices.numpy()), nm24_records(vals.copy(), bt.indices.numpy().copy()))
    with pytest.raises(Exception, match="keep = 2"):
        nm24_records(np.zeros((4, 3, 2), np.float16), np.zeros((4, 3, 2), np.uint8))
    assert is_nm24(4, 2) and not is_nm24(8, 4) and not is_nm24(4, 1)


def test_kernel_constants_match_the_layout():
    src = kernel_source("nm24_sparse_mma.cu")
    consts = dict(re.findall(r"#define (BP_NM_\w+) (\d+)", src))
    assert int(consts["BP_NM_RECORD_BYTES"]) == layouts.NM24_RECORD_BYTES
    assert int(consts["BP_NM_TILE_ROWS"]) == layouts.NM24_TILE_ROWS
    assert int(consts["BP_NM_TILE_COLS"]) == layouts.NM24_TILE_COLS
    from balprune.runtime.nm24 import MAX_WARPS

    assert f"__launch_bounds__({32 * MAX_WARPS})" in src


@pytest.mark.parametrize("block_size,sparsity,dtype", [(8, 0.5, torch.float16), (4, 0.75, torch.float16),
                                                       (4, 0.5, torch.float32)])
def test_operator_refuses_what_the_sparse_mma_cannot_run(block_size, sparsity, dtype):
    """4:8, 1:4 and fp32 2:4 have no mma.sp form: UsageError on the host, before any GPU call."""
    from balprune.runtime.nm24 import Nm24Linear, nm24_alternative, supports

    w = torch.randn(32, 64).to(dtype)
    pattern = BalancedPattern(sparsity, blocks=None, block_size=block_size)
    g = geometry_for(32, 64, pattern)
    bt = BalancedTensor.from_offsets(w, pattern, balanced_offsets(w, g, dtype=g.index_dtype))
    assert not supports(str(dtype).split(".")[-1], g.block_length, g.keep)
    assert nm24_alternative(bt) is None
    with pytest.raises(UsageError, match="2:4"):
        Nm24Linear.from_tensor(bt)


def test_the_tensor_core_path_is_offered_only_for_16_bit_24_layers():
    """nm24_alternative picks exactly the layers mma.sp can run; bench lists the path as one of a
    balanced layer's own (registered once tests/gpu/test_nm24_gpu.py had passed on the device)."""
    from balprune.bench.report import ALTERNATIVES
    from balprune.runtime.nm24 import nm24_alternative

    assert "balanced_nm24" in ALTERNATIVES["balanced"]
    bt = _random_24(16, 64, 2)
    assert nm24_alternative(bt) is bt and nm24_alternative(bt.with_encoding("bitmask")) is not None


def test_device_relayouts_are_sized_against_memory_first(monkeypatch):
    """Both kernel layouts (2:4 records, bitmask segments) check their peak against the machine's
    memory before allocating (exit 4 with the figures), like every allocation a file decides."""
    from balprune import safeio
    from balprune.errors import InvalidInputError
    from balprune.formats.layouts import bitmask_segments

    bt = _random_24(64, 256, 4)
    vals, _ = _np_values(bt)
    monkeypatch.setattr(safeio, "memory_available", lambda: 4096)
    with pytest.raises(InvalidInputError, match="2:4 tensor-core layout of a \\[64, 256\\] tensor needs"):
        nm24_records(vals, bt.indices.numpy())
    with pytest.raises(InvalidInputError, match="bitmask kernel's layout of a \\[64, 256\\] tensor needs"):
        bitmask_segments(vals, bt.indices.numpy(), 4)
