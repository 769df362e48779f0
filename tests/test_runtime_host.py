"""The GPU runtime's host side, on the CPU: validation, the interleaved layout, kernel loading, no-GPU errors."""

from __future__ import annotations

import importlib
import re

import numpy as np
import pytest
import torch

from balprune.config import BalancedPattern
from balprune.errors import FormatError, NoGpuError
from balprune.formats.balanced import BalancedTensor
from balprune.prune.masks import one_shot_mask
from balprune.runtime import interleave_rows, kernel_name, kernel_variants, validate_balanced
from balprune.runtime.balanced import vector_width
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
    # staging 0 and 1 for every combination; 2 only for 16-bit values, NB >= 2, interleaved
    assert len(names) == len(set(names)) == 3 * 2 * 4 * 2 * 2 + 2 * 2 * 3 + 3 * 2
    assert "bp::balanced_spmm<bp::f16, unsigned char, 8, 2, true>" in names
    assert not any(n.startswith("bp::balanced_spmm<float,") and n.split(", ")[3] == "2" for n in names)
    assert "bp::balanced_spmv_tma<bp::f16, unsigned char>" in names
    assert vector_width("float32") == 4 and vector_width("bfloat16") == 8


def _cupy_usable() -> bool:
    try:
        import cupy

        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:
        return False


@pytest.mark.skipif(_cupy_usable(), reason="a usable GPU is present: the no-GPU path cannot be observed here")
def test_import_without_gpu_and_load_raises_no_gpu(tmp_path):
    runtime = importlib.import_module("balprune.runtime")
    with pytest.raises(NoGpuError) as e:
        runtime.load(tmp_path / "missing.safetensors")
    assert e.value.exit_code == 6
    assert "CuPy" in e.value.message or "CUDA" in e.value.message
    bt = _packed()
    with pytest.raises(NoGpuError):
        runtime.BalancedLinear.from_tensor(bt)
