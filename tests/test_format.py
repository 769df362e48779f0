"""Packed format v1: exact round trips, golden files, the official reader, sizes."""

from __future__ import annotations

import json
import struct
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors import safe_open

from balprune.formats import BalancedTensor, BsrTensor, CsrTensor
from balprune.formats.packed_file import read_packed, verify_packed
from balprune.patterns.balanced import geometry_for
from balprune.patterns.kinds import BalancedPattern, BlockPattern, UnstructuredPattern
from balprune.prune.masks import one_shot_mask

GOLDEN_DIR = Path(__file__).parent / "golden"
sys.path.insert(0, str(GOLDEN_DIR))
import make_golden  # noqa: E402

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]


def _pruned(shape, dtype, pattern, seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(*shape, generator=g).to(dtype)
    m = w.reshape(shape[0], -1)
    mask = one_shot_mask(m, pattern)
    return torch.where(mask, m, torch.zeros((), dtype=dtype)).reshape(shape)


shapes = st.sampled_from([(1, 1), (3, 7), (5, 33), (8, 64), (4, 1500), (2, 3, 3, 3), (6, 4, 2, 5)])


@settings(max_examples=40, deadline=None)
@given(shapes, st.sampled_from(DTYPES), st.sampled_from([1, 4, 32]), st.sampled_from([0.3, 0.5, 0.9]), st.integers(0, 10**6))
def test_balanced_round_trip_exact(shape, dtype, blocks, s, seed):
    p = BalancedPattern(s, blocks=blocks)
    dense = _pruned(shape, dtype, p, seed)
    packed = BalancedTensor.from_dense(dense, p)
    g = packed.geometry
    assert packed.values.shape == (g.rows, g.keep, g.blocks) and packed.values.dtype == dtype
    assert packed.indices.dtype == (torch.uint8 if g.block_length <= 256 else torch.uint16)
    packed.check("t")
    back = packed.to_dense()
    assert back.dtype == dtype and back.shape == dense.shape
    assert torch.equal(back.view(torch.uint8) if dtype != torch.float64 else back, dense.view(torch.uint8) if dtype != torch.float64 else dense)


def test_balanced_uint16_indices_for_long_blocks():
    p = BalancedPattern(0.9, blocks=None, block_size=300)
    dense = _pruned((4, 900), torch.float16, p, 1)
    packed = BalancedTensor.from_dense(dense, p)
    assert packed.indices.dtype == torch.uint16 and int(packed.indices.to(torch.int64).max()) < 300
    assert torch.equal(packed.to_dense(), dense)


def test_from_dense_refuses_unbalanced():
    with pytest.raises(ValueError, match="not balanced"):
        BalancedTensor.from_dense(torch.ones(2, 8), BalancedPattern(0.5, blocks=2))


@settings(max_examples=30, deadline=None)
@given(shapes, st.sampled_from(DTYPES), st.sampled_from([0.3, 0.9]), st.integers(0, 10**6))
def test_csr_round_trip_exact(shape, dtype, s, seed):
    p = UnstructuredPattern(s)
    dense = _pruned(shape, dtype, p, seed)
    nnz = int((dense != 0).sum()) + 2  # room for explicit zeros
    nnz = min(nnz, dense.numel())
    packed = CsrTensor.from_dense(dense, nnz, s)
    assert packed.values.numel() == nnz
    packed.check("t")
    assert torch.equal(packed.to_dense(), dense)


@settings(max_examples=30, deadline=None)
@given(shapes, st.sampled_from(DTYPES), st.sampled_from([(2, 2), (8, 8), (3, 4)]), st.integers(0, 10**6))
def test_bsr_round_trip_exact(shape, dtype, block_shape, seed):
    p = BlockPattern(0.5, block_shape)
    dense = _pruned(shape, dtype, p, seed)
    rows = shape[0]
    cols = dense.numel() // rows
    tiles = -(-rows // block_shape[0]) * -(-cols // block_shape[1])
    nonzero_tiles = 0
    packed = None
    for nnzb in range(tiles + 1):
        try:
            packed = BsrTensor.from_dense(dense, block_shape, nnzb, 0.5)
            nonzero_tiles = nnzb
            break
        except ValueError:
            continue
    assert packed is not None and packed.values.shape == (nonzero_tiles, *block_shape)
    packed.check("t")
    assert torch.equal(packed.to_dense(), dense)


def test_packed_size_is_value_plus_index_bytes_times_density():
    p = BalancedPattern(0.9, blocks=32)
    dense = _pruned((256, 8192), torch.float16, p, 0)
    packed = BalancedTensor.from_dense(dense, p)
    g = geometry_for(256, 8192, p)
    packed_bytes = sum(t.numel() * t.element_size() for t in packed.parts().values())
    assert packed_bytes == 256 * 32 * g.keep * (2 + 1)
    # about (value + index bytes) x 0.1 of the dense weights: k = 26 of 256 per block
    assert packed_bytes / dense.numel() == pytest.approx(3 * 0.1, rel=0.02)


# --------------------------------------------------------------------------- golden files


def _header_and_data(path: Path) -> tuple[dict, bytes]:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    meta = header["__metadata__"]
    meta.pop("tool_version")  # the only field allowed to change without a format change
    return header, raw[8 + n :]


@pytest.mark.parametrize("name", sorted(make_golden.GOLDEN))
def test_golden_bytes_are_reproduced(tmp_path, name):
    make_golden.write_all(tmp_path)
    got_header, got_data = _header_and_data(tmp_path / f"{name}.safetensors")
    want_header, want_data = _header_and_data(GOLDEN_DIR / f"{name}.safetensors")
    assert got_header == want_header, "header changed: a format change needs a version bump and new golden files"
    assert got_data == want_data


@pytest.mark.parametrize("name", sorted(make_golden.GOLDEN))
def test_golden_files_read_back_to_the_masked_source(name):
    pf = verify_packed(GOLDEN_DIR / f"{name}.safetensors")
    src = make_golden.source_of(name)
    for tname, want in src.items():
        got = pf.source_dense(tname)
        assert got.dtype == want.dtype and got.shape == want.shape
        kept = got != 0
        assert torch.equal(got[kept], want[kept]), "kept values are bit-exact"


def test_golden_balanced_layout_by_hand():
    """Spell out the v1 layout on fc.weight row 0 so FORMAT.md's description is checked."""
    pf = read_packed(GOLDEN_DIR / "balanced.safetensors")
    obj = pf.load("fc.weight")
    g = obj.geometry
    assert (g.blocks, g.block_length, g.keep) == (4, 5, 2)  # k = floor(0.4 * 5 + 1/2) = 2
    row = make_golden.source_state_dict()["fc.weight"][0]
    for j in range(4):
        block = row[j * 5 : (j + 1) * 5].abs()
        order = sorted(range(5), key=lambda i: (-float(block[i]), i))[:2]
        assert obj.indices[0, :, j].tolist() == sorted(order)
        assert obj.values[0, :, j].tolist() == [float(row[j * 5 + i]) for i in sorted(order)]


def test_official_safetensors_reader_reads_packed_files():
    path = GOLDEN_DIR / "balanced.safetensors"
    pf = read_packed(path)
    with safe_open(str(path), framework="pt") as f:
        names = set(f.keys())
        assert names == {e.name for e in pf.parsed.entries}
        meta = f.metadata()
        assert meta["format"] == "balprune.packed" and meta["format_version"] == "1"
        for e in pf.parsed.entries:
            t = f.get_tensor(e.name)
            assert tuple(t.shape) == e.shape
    manifest = json.loads(meta["manifest"])
    # manifest order is the source's order (a safetensors source: its header order)
    source_order = [e.name for e in read_packed_source_entries()]
    assert [t["name"] for t in manifest["tensors"]] == source_order


def read_packed_source_entries():
    from balprune.container import parse_file

    return parse_file(GOLDEN_DIR / "source.safetensors").entries


def test_packed_tensors_are_aligned_to_their_element_size():
    pf = read_packed(GOLDEN_DIR / "block.safetensors")
    from balprune.container import DTYPE_BITS

    for e in pf.parsed.entries:
        assert e.begin % max(1, DTYPE_BITS[e.dtype] // 8) == 0


@settings(max_examples=40, deadline=None)
@given(shapes, st.sampled_from(DTYPES), st.sampled_from([1, 4, 32]), st.sampled_from([0.3, 0.5, 0.9]),
       st.integers(0, 10**6), st.booleans())
def test_one_ranking_fast_path_equals_from_dense_of_masked(shape, dtype, blocks, s, seed, sparse_input):
    """The CLI's from_offsets path and the dense-with-zeros contract give identical packed arrays."""
    from balprune.patterns.balanced import balanced_offsets

    g_ = torch.Generator().manual_seed(seed)
    w = torch.randn(*shape, generator=g_)
    if sparse_input:  # zeros and ties, including kept zeros
        w = torch.where(torch.rand(*shape, generator=g_) < 0.7, torch.zeros(()), w.round())
    w = w.to(dtype)
    p = BalancedPattern(s, blocks=blocks)
    m = w.reshape(shape[0], -1)
    geo = geometry_for(*m.shape, p)
    fast = BalancedTensor.from_offsets(w, p, balanced_offsets(m, geo, dtype=geo.index_dtype))
    slow = BalancedTensor.from_dense(torch.where(one_shot_mask(m, p), m, torch.zeros((), dtype=dtype)).reshape(shape), p)
    assert torch.equal(fast.indices, slow.indices)
    assert torch.equal(fast.values.reshape(-1).view(torch.uint8), slow.values.reshape(-1).view(torch.uint8))


def test_golden_optional_keys_are_what_format_md_states():
    """gpt2_hf: a v1 file whose metadata records the source folder's config.json (hf:config.json, its text
    as it was) and whose manifest lists the Conv1D weights stored as their [out, in] transpose."""
    pf = verify_packed(GOLDEN_DIR / "gpt2_hf.safetensors")
    meta = _header_and_data(GOLDEN_DIR / "gpt2_hf.safetensors")[0]["__metadata__"]
    assert meta["format_version"] == "1" and meta["hf:config.json"] == make_golden.GPT2_CONFIG
    assert sorted(pf.manifest["transposed"]) == ["transformer.h.0.attn.c_attn.weight",
                                                 "transformer.h.0.mlp.c_fc.weight"]
    assert pf.manifest["tensors"]["transformer.h.0.attn.c_attn.weight"]["shape"] == [12, 4]  # stored [out, in]
