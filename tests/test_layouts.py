"""Format v2's index encodings and the device layouts (formats.layouts), on the CPU.

Property tests over random matrices and geometries: the bitmask holds exactly k bits per block and
converts to the offsets form and back exactly; auto picks the encoding with fewer bytes; packing
is deterministic; the bitmask kernel's device layout computes W x exactly as the dense matrix does
(through bitmask_reference, the CPU model of the kernel's walk); the kernel-side constants match
the .cu source; and the CLI writes v1 for offsets, v2 for bitmask, both verifying and unpacking
to the same dense tensors.
"""

from __future__ import annotations

import json
import re
import struct

import numpy as np
import pytest
import torch
from helpers import small_state_dict

from balprune.errors import FormatError
from balprune.formats import BalancedTensor, layouts
from balprune.formats.layouts import (
    BITMASK,
    OFFSETS,
    SegmentGeometry,
    bitmask_reference,
    bitmask_segments,
    check_bitmask_arrays,
    choose_encoding,
    offsets_from_mask,
)
from balprune.patterns.balanced import balanced_offsets, geometry_for
from balprune.patterns.kinds import BalancedPattern
from balprune.runtime.kernels import kernel_source

GEOMETRIES = [  # (rows, cols, pattern): N:M, balanced with and without padding, long blocks
    (7, 64, BalancedPattern(0.5, blocks=None, block_size=4)),
    (5, 96, BalancedPattern(0.5, blocks=None, block_size=8)),
    (6, 20, BalancedPattern(0.6, blocks=4)),
    (4, 970, BalancedPattern(0.5, blocks=None, block_size=64)),   # the last block keeps padding
    (3, 33, BalancedPattern(0.5, blocks=32)),                     # L = 2
    (5, 300, BalancedPattern(0.7, blocks=None, block_size=48)),
    (3, 4096, BalancedPattern(0.8, blocks=32)),
    (2, 2000, BalancedPattern(0.5, blocks=None, block_size=1000)),
]


def _tensor(rows, cols, pattern, dtype=torch.float32, seed=0) -> BalancedTensor:
    w = torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed)).to(dtype)
    g = geometry_for(rows, cols, pattern)
    return BalancedTensor.from_offsets(w, pattern, balanced_offsets(w, g, dtype=g.index_dtype))


@pytest.mark.parametrize("rows,cols,pattern", GEOMETRIES)
def test_bitmask_round_trip_is_exact_with_k_bits_per_block(rows, cols, pattern):
    bt = _tensor(rows, cols, pattern)
    g = bt.geometry
    parts = bt.with_encoding(BITMASK).parts()
    assert list(parts) == ["values", "mask"]
    mask = parts["mask"]
    assert tuple(mask.shape) == (rows, -(-g.blocks * g.block_length // 8))
    bits = layouts.unpack_mask(mask, g.blocks * g.block_length).view(rows, g.blocks, g.block_length)
    assert bool((bits.sum(-1) == g.keep).all())  # popcount = k in every block
    check_bitmask_arrays(parts["values"], mask, rows, cols, g.blocks, g.block_length, g.keep, where="t")
    assert torch.equal(offsets_from_mask(mask, g.blocks, g.block_length, g.keep), bt.indices)
    # values in column order, the same numbers
    assert torch.equal(parts["values"], bt.values.permute(0, 2, 1))
    back = BalancedTensor.from_parts(bt.with_encoding(BITMASK).manifest(), parts, "t")
    assert torch.equal(back.to_dense(), bt.to_dense()) and back.encoding == BITMASK


@pytest.mark.parametrize("rows,cols,pattern", GEOMETRIES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("paired", [False, True])
def test_bitmask_device_layout_computes_the_product(rows, cols, pattern, dtype, paired):
    bt = _tensor(rows, cols, pattern, dtype)
    from balprune.runtime.balanced import _host_numpy

    units, words, sg = bitmask_segments(_host_numpy(bt.values), bt.indices.numpy(), bt.geometry.block_length,
                                        paired=paired)
    assert units.shape == (rows, sg.rounds, sg.units, sg.lanes, sg.per_unit)
    assert words.shape == (rows, sg.rounds, sg.words, sg.lanes) and words.dtype == np.uint32
    x = np.random.default_rng(1).standard_normal((cols, 3))
    dense = bt.to_dense().to(torch.float64).numpy()
    np.testing.assert_allclose(bitmask_reference(units, words, sg, x), dense @ x, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("rows,cols,pattern", GEOMETRIES)
def test_every_segment_the_kernel_walks_holds_exactly_seg_keep_bits(rows, cols, pattern):
    # kernels/balanced_bitmask.cu's walk 6 (paired layout) walks every round of every lane, phantom segments (s >= S)
    # included: a walk takes exactly seg_keep values, so each walked segment must hold that many bits
    bt = _tensor(rows, cols, pattern, torch.float16)
    from balprune.runtime.balanced import _host_numpy

    units, words, sg = bitmask_segments(_host_numpy(bt.values), bt.indices.numpy(), bt.geometry.block_length,
                                        paired=True)
    pop = np.unpackbits(words.astype(">u4").view(np.uint8), axis=-1).reshape(*words.shape, 32).sum(axis=(2, 4))
    assert (pop == sg.seg_keep).all()
    if sg.segments > 1:  # two rounds per lane: the kernel walks them at once
        assert sg.rounds >= 2 and sg.lanes * 2 >= sg.segments


def test_segment_rule_fills_words_and_units():
    # 2:4: eight blocks of 4 per 32-bit word; 80% of L = 128 in fp16 (k = 26): two blocks per segment
    assert SegmentGeometry(1024, 4, 2, 2).g == 8
    assert SegmentGeometry(32, 128, 64, 2).as_tuple()[:3] == (1, 32, 128)
    assert SegmentGeometry(32, 128, 26, 2).g == 2
    for blocks, L, k, item in [(32, 448, 224, 2), (7, 47, 5, 4), (3, 1000, 500, 2)]:
        sg = SegmentGeometry(blocks, L, k, item)
        assert sg.words * 32 >= sg.seg_cols and sg.units * sg.per_unit >= sg.seg_keep
        assert sg.segments * sg.g >= blocks and sg.lanes * sg.rounds >= sg.segments


@pytest.mark.parametrize("rows,cols,pattern", GEOMETRIES)
def test_auto_picks_the_encoding_with_fewer_bytes(rows, cols, pattern):
    g = geometry_for(rows, cols, pattern)
    off = layouts.index_bytes(OFFSETS, rows, g.blocks, g.block_length, g.keep)
    bit = layouts.index_bytes(BITMASK, rows, g.blocks, g.block_length, g.keep)
    chosen, why = choose_encoding("auto", rows, g.blocks, g.block_length, g.keep)
    assert chosen == (BITMASK if bit < off else OFFSETS)
    assert f"offsets {off // rows}, bitmask {bit // rows}" in why
    assert choose_encoding(OFFSETS, rows, g.blocks, g.block_length, g.keep)[0] == OFFSETS


def test_paper_shape_keeps_offsets_and_llm_shapes_take_bitmask():
    assert choose_encoding("auto", 1, 32, 256, 26)[0] == OFFSETS       # 90%, L = 256: 26 bytes < 32
    assert choose_encoding("auto", 1, 32, 128, 64)[0] == BITMASK       # 50%
    assert choose_encoding("auto", 1, 1024, 4, 2)[0] == BITMASK        # 2:4: a bit per weight
    assert choose_encoding("auto", 1, 32, 448, 90)[0] == BITMASK       # 80% of K = 14336: no u16 offsets


@pytest.mark.parametrize("bad,needle", [
    (lambda m, v: m.__setitem__((0, 0), m[0, 0] ^ 1), "mask bits set, keep is"),
    (lambda m, v: m.__setitem__((1, 2), m[1, 2] | 0x80), "past its last column"),
    (lambda m, v: v.__setitem__((0, 0, 0), float("inf")), "Inf"),
])
def test_bitmask_validator_refuses_broken_arrays(bad, needle):
    bt = _tensor(4, 20, BalancedPattern(0.6, blocks=4))  # L = 5, 20 bits = 3 bytes a row
    g = bt.geometry
    parts = bt.with_encoding(BITMASK).parts()
    m, v = parts["mask"].clone(), parts["values"].clone()
    bad(m, v)
    with pytest.raises(FormatError, match=needle):
        check_bitmask_arrays(v, m, 4, 20, g.blocks, g.block_length, g.keep, where="t")
    with pytest.raises(FormatError, match="values shape"):
        check_bitmask_arrays(parts["values"][:, :, :1].contiguous(), parts["mask"], 4, 20, g.blocks,
                             g.block_length, g.keep, where="t")


def test_kernel_constants_match_the_layout():
    src = kernel_source("balanced_bitmask.cu")
    consts = dict(re.findall(r"#define (BP_BM_\w+) (\d+)", src))
    assert int(consts["BP_BM_UNIT_BYTES"]) == layouts.UNIT_BYTES
    assert int(consts["BP_BM_WORD_BITS"]) == layouts.WORD_BITS
    from balprune.runtime.bitmask import THREADS

    assert f"__launch_bounds__({THREADS}," in src


def _header(path) -> dict:
    b = path.read_bytes()
    n = struct.unpack("<Q", b[:8])[0]
    return json.loads(b[8:8 + n])


def test_cli_writes_v1_for_offsets_and_v2_for_bitmask(cli, tmp_path):
    src = tmp_path / "m.pt"
    torch.save(small_state_dict(), src)
    outs = {}
    for index in ("offsets", "bitmask", "auto"):
        outs[index] = tmp_path / f"{index}.safetensors"
        r = cli("prune", src, "-s", "0.5", "--index", index, "-o", outs[index], "--json")
        assert r.code == 0, r.err
    assert _header(outs["offsets"])["__metadata__"]["format_version"] == "1"
    assert "index_encoding" not in _header(outs["offsets"])["__metadata__"]["manifest"]
    meta = _header(outs["bitmask"])["__metadata__"]
    assert meta["format_version"] == "2" and '"index_encoding":"bitmask"' in meta["manifest"]
    assert outs["bitmask"].stat().st_size < outs["offsets"].stat().st_size
    dense = {}
    for index, path in outs.items():
        assert cli("verify", path).code == 0
        dense[index] = tmp_path / f"{index}.dense.safetensors"
        assert cli("unpack", path, "-o", dense[index]).code == 0
    assert dense["offsets"].read_bytes() == dense["bitmask"].read_bytes() == dense["auto"].read_bytes()
    # identical input, identical bytes
    again = tmp_path / "again.safetensors"
    assert cli("prune", src, "-s", "0.5", "--index", "bitmask", "-o", again).code == 0
    assert again.read_bytes() == outs["bitmask"].read_bytes()


def test_bad_index_choice_is_a_usage_error(cli, tmp_path):
    src = tmp_path / "m.pt"
    torch.save(small_state_dict(), src)
    r = cli("prune", src, "-s", "0.5", "--index", "bits", "-o", tmp_path / "o.safetensors")
    assert r.code == 2 and "--index must be one of auto, offsets, bitmask" in r.err
    assert not (tmp_path / "o.safetensors").exists()


@pytest.mark.parametrize("pattern", [("-p", "unstructured"), ("-p", "block", "--block-shape", "4x4")])
def test_an_index_encoding_without_a_balanced_tensor_is_a_usage_error(cli, tmp_path, pattern):
    """--index offsets|bitmask only means something for balanced tensors: with another pattern (and no
    [[layers]] rule making any tensor balanced) it is refused, never silently ignored; auto is fine."""
    src = tmp_path / "m.pt"
    torch.save(small_state_dict(), src)
    out = tmp_path / "o.safetensors"
    r = cli("prune", src, *pattern, "-s", "0.5", "--index", "bitmask", "-o", out)
    assert r.code == 2 and "index encodings apply to the balanced pattern only" in r.err
    assert not out.exists()
    assert cli("prune", src, *pattern, "-s", "0.5", "--index", "auto", "-o", out).code == 0


def test_unknown_format_version_names_the_versions_read(tmp_path):
    from balprune.formats import spec

    with pytest.raises(FormatError, match="format version '3' is not supported.*versions 1, 2"):
        spec.parse_metadata({"format": spec.FORMAT_NAME, "format_version": "3", "manifest": "{}"}, "f")


def test_bitmask_decoding_is_checked_against_memory_first(cli, tmp_path, monkeypatch):
    """A bitmask tensor's decoding (bits unpacked per chunk of rows, int64 positions, the offsets
    form) is sized before it runs: exit 4 naming the tensor, not an out-of-memory kill."""
    import balprune.safeio as safeio

    src = tmp_path / "m.pt"
    torch.save(small_state_dict(), src)
    out = tmp_path / "bm.safetensors"
    assert cli("prune", src, "-s", "0.5", "--index", "bitmask", "-o", out).code == 0
    # room for every stored part (the parts' own check), not for decoding one of them
    parts = max(e["data_offsets"][1] - e["data_offsets"][0] for k, e in _header(out).items() if k != "__metadata__")
    monkeypatch.setattr(safeio, "memory_available", lambda: parts + 1)
    r = cli("verify", out)
    assert r.code == 4 and "decoding its bitmask" in r.err, r.err


def _uniform_walk_columns(seg_words: np.ndarray, seg_keep: int, gaps: bool = True) -> list[int] | None:
    """The columns walk 6 of kernels/balanced_bitmask.cu (UniformWalk<GAPS>) takes from one segment's mask
    words, step for step: current word m and next word n in registers; a take that finds m empty moves n in
    and loads the word after (the slot past the last word is a spare holding garbage: never used); with
    ``gaps`` an empty word loops. Returns the columns of the seg_keep takes; None where the loop-free walk
    (``gaps`` False) would take a column of an empty word (the kernel's FLO of 0: garbage)."""
    slots = list(int(w) for w in seg_words) + [0xFFFFFFFF]  # the spare slot: garbage the walk must not use
    m, nidx = slots[0], 1
    n, base, cols = slots[nidx], 0, []
    for _ in range(seg_keep):
        if m == 0:
            m, base, nidx = n, base + 32, nidx + 1
            n = slots[nidx] if nidx < len(slots) else None  # a load past the spare slot would be out of bounds
        while gaps and m == 0:
            m, base, nidx = n, base + 32, nidx + 1
            n = slots[nidx] if nidx < len(slots) else None
        if m == 0:
            return None
        p = m.bit_length() - 1  # the kernel's 31 - __clz(m): one FLO
        m ^= 1 << p
        cols.append(base + 31 - p)  # x at xhi - p * xcol, xhi the word's last column
    return cols


def _walk_has_gaps(seg_words: np.ndarray) -> bool:
    """The kernel's rule while it stages a walk's words: an empty word past the first with a non-empty one
    after it (only then can a take move in an empty word); the round takes the loop if any lane has one."""
    empty_before, gaps = False, False
    for w, word in enumerate(int(v) for v in seg_words):
        gaps |= empty_before and word != 0
        empty_before |= w > 0 and word == 0
    return gaps


@pytest.mark.parametrize("sparsity,L", [(0.5, 128), (0.8, 128), (0.9, 1024), (0.97, 448), (0.5, 4)])
def test_walk_6_takes_exactly_the_kept_columns(sparsity, L):
    # high sparsities leave empty 32-column words (the walk's loop); L = 4 is 2:4-like (8 blocks a word)
    rows, cols = 6, L * 8
    pattern = BalancedPattern(sparsity, blocks=None, block_size=L)
    bt = _tensor(rows, cols, pattern, torch.float16)
    from balprune.runtime.balanced import _host_numpy

    _, words, sg = bitmask_segments(_host_numpy(bt.values), bt.indices.numpy(), L, paired=True)
    kept = np.zeros((rows, cols), dtype=bool)
    idx = bt.indices.numpy().astype(np.int64)  # [R, k, B] in-block offsets
    for r in range(rows):
        for b in range(idx.shape[2]):
            kept[r, b * L + idx[r, :, b]] = True
    empty_words = gapped = 0
    for r in range(rows):
        for s in range(sg.segments):
            q, lane = divmod(s, sg.lanes)
            w = words[r, q, :, lane]
            empty_words += int((w == 0).sum())
            got = [s * sg.seg_cols + c for c in _uniform_walk_columns(w, sg.seg_keep)]
            want = [s * sg.seg_cols + c for c in np.nonzero(kept[r, s * sg.seg_cols:(s + 1) * sg.seg_cols])[0]]
            # phantom blocks of the last segment keep their first k columns (past the row)
            assert got[: len(want)] == want and len(got) == sg.seg_keep
            # the loop-free walk (v28), which the kernel takes where no lane's words have a gap, is exact there
            free = _uniform_walk_columns(w, sg.seg_keep, gaps=False)
            gapped += _walk_has_gaps(w)
            if not _walk_has_gaps(w):
                assert free is not None and [s * sg.seg_cols + c for c in free] == got
    if sparsity >= 0.9:
        assert empty_words > 0 and gapped > 0  # the case exercised the empty-word loop


def test_the_gap_rule_flags_exactly_the_words_the_loop_free_walk_cannot_pass():
    """kernels/balanced_bitmask.cu v28: a walk whose words have no gap (an empty word past the first with a
    kept column after it) gives the same columns without the empty-word loop; one with a gap would take a
    column of an empty word. Every 5-word walk of words empty or not, each with 1 .. 3 kept columns to take."""
    for pattern in range(1, 32):
        words = np.array([0x80000000 if pattern >> w & 1 else 0 for w in range(5)], dtype=np.uint32)
        keep = int(sum(pattern >> w & 1 for w in range(5)))
        looped = _uniform_walk_columns(words, keep)
        free = _uniform_walk_columns(words, keep, gaps=False)
        assert looped == [32 * w for w in range(5) if pattern >> w & 1]
        if _walk_has_gaps(words):
            assert free is None, words
        else:
            assert free == looped, words
