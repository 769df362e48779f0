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
def test_offsets_from_mask_is_the_same_in_chunks_of_rows(rows, cols, pattern, monkeypatch):
    """The mask is decoded a chunk of rows at a time (memory bound); chunks of one and two rows give the
    offsets of one pass, also where L is not a power of two (the in-block column is a remainder then)."""
    bt = _tensor(rows, cols, pattern, seed=5)
    g = bt.geometry
    mask = bt.with_encoding(BITMASK).parts()["mask"]
    for chunk_rows in (1, 2):
        monkeypatch.setattr(layouts, "CHECK_CHUNK_ENTRIES", chunk_rows * g.blocks * g.block_length)
        assert torch.equal(offsets_from_mask(mask, g.blocks, g.block_length, g.keep), bt.indices), chunk_rows


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
    assert int(consts["BP_BM_DELTA_ENTRIES"]) == layouts.DELTA_STEP_ENTRIES
    assert int(consts["BP_BM_DELTA_MAX"]) == layouts.DELTA_MAX_STEP
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


# -- the delta walk's layout (kernels/balanced_bitmask.cu balanced_delta_spmm, walk 7) --------------------------

def _delta(bt: BalancedTensor):
    from balprune.runtime.balanced import _host_numpy

    return layouts.delta_segments(_host_numpy(bt.values), bt.indices.numpy(), bt.geometry.block_length)


def _delta_entries(deltas, starts, dg, rows):
    """{(row, segment): [(step, position in the segment's entries)]} decoded from the step words."""
    out = {}
    for G in range(len(starts) - 1):
        D = (int(starts[G + 1]) - int(starts[G])) // dg.rounds
        for q in range(dg.rounds):
            w = deltas[int(starts[G]) + q * D: int(starts[G]) + (q + 1) * D]  # [D, 32]
            for lane in range(32):
                r, s = G * dg.rows_per_group + lane // dg.lanes, q * dg.lanes + lane % dg.lanes
                out[r, s] = [int(w[d, lane]) >> (4 * j) & 15 for d in range(D) for j in range(8)]
    return out


@pytest.mark.parametrize("rows,cols,pattern", GEOMETRIES + [(37, 4096, BalancedPattern(0.7, blocks=32))])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_delta_device_layout_computes_the_product(rows, cols, pattern, dtype):
    bt = _tensor(rows, cols, pattern, dtype)
    units, deltas, starts, dg = _delta(bt)
    assert deltas.dtype == np.uint32 and deltas.shape[1] == 32 and starts.dtype == np.uint32
    assert units.shape == (int(starts[-1]) * dg.units_per_step, 32, dg.per_unit) and units.dtype == _host(dtype)
    assert len(starts) == -(-rows // dg.rows_per_group) + 1 and starts[0] == 0
    assert ((np.diff(starts.astype(np.int64)) % dg.rounds) == 0).all()  # whole steps per round
    x = np.random.default_rng(1).standard_normal((cols, 3))
    dense = bt.to_dense().to(torch.float64).numpy()
    np.testing.assert_allclose(layouts.delta_reference(units, deltas, starts, dg, rows, x), dense @ x,
                               rtol=1e-12, atol=1e-12)


def _host(dtype):
    return {torch.float32: np.float32, torch.float16: np.float16}[dtype]


def test_delta_steps_walk_exactly_the_kept_columns_with_phantoms_for_long_gaps():
    """Kept columns 0, 15, 16, 31, 63 and 127 of one block of 128 (k = 6): steps 0, 15, 1, 15, then the gap of 32
    as 15 + 15 + 2 (two phantoms), then 64 as 15 * 4 + 4; a row group pads its segments to 8 * ceil(E / 8)."""
    rows, L = 3, 128
    pattern = BalancedPattern(1 - 6 / 128, blocks=None, block_size=L)
    w = torch.full((rows, L), 1e-3)
    keep = [0, 15, 16, 31, 63, 127]
    w[0, keep] = torch.arange(1.0, 7.0)
    w[1, :6] = 2.0  # columns 0 .. 5: steps 0, 1, 1, 1, 1, 1
    w[2, 122:] = 3.0  # the last six: 122 as 15 * 8 + 2, then 1s
    g = geometry_for(rows, L, pattern)
    bt = BalancedTensor.from_offsets(w, pattern, balanced_offsets(w, g, dtype=g.index_dtype))
    units, deltas, starts, dg = _delta(bt)
    assert (dg.g, dg.segments, dg.lanes, dg.rows_per_group) == (1, 1, 1, 32)
    ent = _delta_entries(deltas, starts, dg, rows)
    e0 = [0, 15, 1, 15, 15, 15, 2, 15, 15, 15, 15, 4]
    assert ent[0, 0][: len(e0)] == e0 and not any(ent[0, 0][len(e0):])
    assert ent[1, 0][:6] == [0, 1, 1, 1, 1, 1] and not any(ent[1, 0][6:])
    e2 = [15] * 8 + [2, 1, 1, 1, 1, 1]
    assert ent[2, 0][: len(e2)] == e2 and not any(ent[2, 0][len(e2):])
    assert len(ent[0, 0]) == 16  # the group's longest segment (row 2: 14 entries) padded to 16
    vals = units.reshape(-1, 32, dg.per_unit).transpose(1, 0, 2).reshape(32, -1)  # [lane, entries]
    assert vals[0, [0, 1, 2, 3, 6, 11]].tolist() == [1, 2, 3, 4, 5, 6]
    assert not vals[0, [4, 5, 7, 8, 9, 10]].any() and not vals[0, 12:].any()  # phantoms and padding are 0
    x = np.arange(L, dtype=np.float64)
    np.testing.assert_array_equal(layouts.delta_reference(units, deltas, starts, dg, rows, x),
                                  bt.to_dense().double().numpy() @ x)


def test_row_groups_pad_to_their_own_entry_count():
    # 1B-like rows (k = 19 of L = 64, two blocks a segment: 38 entries, 40 with padding) and one row whose long gaps
    # need phantoms: only its group's segments grow
    rows, cols = 64, 2048
    pattern = BalancedPattern(0.7, blocks=32)
    w = torch.randn(rows, cols, generator=torch.Generator().manual_seed(5))
    w[40, :] = 1e-3
    w[40, ::64] = 1.0  # column 0 of every block ...
    w[40, 45::64] = 1.0  # ... and 45: gaps of 45 in each block (two phantoms each)
    g = geometry_for(rows, cols, pattern)
    bt = BalancedTensor.from_offsets(w, pattern, balanced_offsets(w, g, dtype=g.index_dtype))
    units, deltas, starts, dg = _delta(bt)
    assert (dg.g, dg.seg_keep, dg.lanes, dg.rows_per_group) == (2, 38, 16, 2)
    per_group = np.diff(starts.astype(np.int64)) // dg.rounds * 8
    assert per_group[40 // 2] > 40 and (np.delete(per_group, 40 // 2) <= 48).all()
    x = np.random.default_rng(2).standard_normal(cols)
    np.testing.assert_allclose(layouts.delta_reference(units, deltas, starts, dg, rows, x),
                               bt.to_dense().double().numpy() @ x, rtol=1e-12, atol=1e-12)


def test_delta_layout_is_deterministic_and_copies_value_bits():
    bt = _tensor(9, 700, BalancedPattern(0.7, blocks=None, block_size=70), torch.float16)
    a, b = _delta(bt), _delta(bt)
    for x, y in zip(a[:3], b[:3]):
        assert x.tobytes() == y.tobytes()
    kept = np.sort(a[0].view(np.uint16)[a[0].view(np.uint16) != 0])
    want = bt.values.numpy().view(np.uint16)
    assert np.array_equal(kept, np.sort(want[want != 0]))  # the values' bits, none converted or lost


def test_delta_layout_of_no_rows_is_empty():
    """Zero rows (no row group): empty arrays and one start, not a broadcast error from the kept entries' block
    copy (whose width g*k may exceed the one-step minimum of the entry arrays)."""
    values, indices = np.zeros((0, 40, 4), np.float16), np.zeros((0, 40, 4), np.uint8)
    units, deltas, starts, dg = layouts.delta_segments(values, indices, 64)
    assert units.shape[0] == deltas.shape[0] == 0 and starts.tolist() == [0]
    assert layouts.delta_reference(units, deltas, starts, dg, 0, np.ones(256)).shape == (0,)


def test_delta_geometry_rounds_entries_to_whole_steps():
    # k = 19 of L = 64 (1B at 70%): g = 2 pads 38 to 40 where g = 1 pads 19 to 24; 2:4 fp16 takes 4 blocks (8 entries)
    assert layouts.DeltaGeometry(32, 64, 19, 2).g == 2
    assert layouts.DeltaGeometry(256, 4, 2, 2).g == 4
    dg = layouts.DeltaGeometry(32, 128, 64, 4)
    assert (dg.g, dg.units_per_step, dg.per_unit) == (1, 2, 4)
