"""Pattern invariants as properties: exact counts, ranking, ties, padding, nesting, determinism."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from balprune.patterns.balanced import balanced_mask, balanced_offsets, geometry_for
from balprune.patterns.block import block_mask
from balprune.patterns.kinds import BalancedPattern, BlockPattern, UnstructuredPattern, keep_count
from balprune.patterns.unstructured import global_keep_counts, mask_keep_n, unstructured_mask
from balprune.prune.masks import nested_masks, one_shot_mask
from balprune.prune.schedule import Schedule, ScheduleKind

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]

# keep_count golden table: (sparsity, L) -> k under "nearest, halves up, at least 1".
KEEP_TABLE = [
    (0.9, 256, 26), (0.9, 47, 5), (0.9, 10, 1), (0.9, 5, 1), (0.5, 3, 2), (0.5, 4, 2), (0.75, 4, 1),
    (0.8, 47, 9), (0.875, 32, 4), (0.97, 256, 8), (0.99, 16, 1), (0.1, 8, 7), (0.05, 8, 8), (0.0, 8, 8),
    (0.625, 8, 3), (0.92, 25, 2), (0.3, 1, 1),
]


@pytest.mark.parametrize("s,length,k", KEEP_TABLE)
def test_keep_count_golden_table(s, length, k):
    assert keep_count(s, length) == k


def matrices(max_rows=6, max_cols=80):
    return st.tuples(
        st.integers(1, max_rows), st.integers(1, max_cols), st.integers(0, 2**31 - 1),
        st.sampled_from(DTYPES), st.booleans(),
    ).map(_make_matrix)


def _make_matrix(args):
    rows, cols, seed, dtype, coarse = args
    g = torch.Generator().manual_seed(seed)
    m = torch.randn(rows, cols, generator=g)
    if coarse:  # few distinct magnitudes: many ties
        m = torch.round(m * 2) / 2
    return m.to(dtype)


def _check_balanced(matrix, mask, g):
    rows, cols = matrix.shape
    padded_mask = torch.zeros(rows, g.padded_width, dtype=torch.bool)
    padded_mask[:, :cols] = mask
    mags = torch.zeros(rows, g.padded_width, dtype=torch.float64)
    mags[:, :cols] = matrix.abs().to(torch.float64)
    for r in range(rows):
        for j in range(g.blocks):
            lo = j * g.block_length
            real = g.real_length(j)
            kept_real = [i for i in range(real) if padded_mask[r, lo + i]]
            assert len(kept_real) == min(g.keep, real), "exactly k per block (real columns first)"
            dropped = [i for i in range(real) if not padded_mask[r, lo + i]]
            for i in kept_real:
                for d in dropped:
                    a, b = mags[r, lo + i], mags[r, lo + d]
                    assert a > b or (a == b and i < d), "kept beats dropped: larger magnitude, then lower column"


@settings(max_examples=60, deadline=None)
@given(matrices(), st.sampled_from([1, 2, 3, 4, 7, 32]), st.sampled_from([0.1, 0.5, 0.75, 0.9, 0.95]))
def test_balanced_exact_k_per_block_and_ranking(matrix, blocks, s):
    g = geometry_for(*matrix.shape, BalancedPattern(s, blocks=blocks))
    mask = balanced_mask(matrix, g)
    assert mask.shape == matrix.shape
    _check_balanced(matrix, mask, g)
    assert int(mask.sum()) == matrix.shape[0] * g.kept_real_per_row


@settings(max_examples=40, deadline=None)
@given(matrices(), st.sampled_from([2, 4, 8, 16]))
def test_nm_is_balanced_with_block_length_m(matrix, m):
    n = max(1, m // 4)
    g = geometry_for(*matrix.shape, BalancedPattern(1 - n / m, blocks=None, block_size=m))
    assert g.block_length == m and g.keep == n
    _check_balanced(matrix, balanced_mask(matrix, g), g)


def test_ragged_lstm_rows_use_32_blocks():
    g = geometry_for(6000, 1500, BalancedPattern(0.8, blocks=32))
    assert (g.blocks, g.block_length, g.padded_width, g.keep) == (32, 47, 1504, 9)
    assert g.real_length(31) == 1500 - 31 * 47 == 43


def test_row_too_short_gets_fewer_blocks():
    g = geometry_for(4, 33, BalancedPattern(0.5, blocks=32))
    assert (g.block_length, g.blocks) == (2, 17)
    g27 = geometry_for(16, 27, BalancedPattern(0.9, blocks=32))
    assert g27.block_length == 1 and not g27.prunes_anything


def test_padding_chosen_only_after_real_columns():
    # K=10, block_size 8: block 1 has 2 real columns; keep 4 -> both real + 2 padding.
    m = torch.arange(1, 11, dtype=torch.float32).reshape(1, 10)
    g = geometry_for(1, 10, BalancedPattern(0.5, blocks=None, block_size=8))
    off = balanced_offsets(m, g)
    assert off[0, 1].tolist() == [0, 1, 2, 3]
    assert off[0, 0].tolist() == [4, 5, 6, 7]


def test_ties_lower_index_wins_and_all_zero_block_keeps_k():
    m = torch.zeros(2, 16, dtype=torch.bfloat16)
    m[0, 5] = 1.0
    g = geometry_for(2, 16, BalancedPattern(0.75, blocks=2))
    off = balanced_offsets(m, g)
    assert off[0, 0].tolist() == [0, 5] and off[0, 1].tolist() == [0, 1]
    assert off[1].tolist() == [[0, 1], [0, 1]]


def test_bf16_ties_are_deterministic_across_runs_and_dtypes():
    g = torch.Generator().manual_seed(1)
    m = (torch.randn(64, 512, generator=g) * 3).round().to(torch.bfloat16)
    geo = geometry_for(64, 512, BalancedPattern(0.9, blocks=32))
    a = balanced_offsets(m, geo)
    b = balanced_offsets(m.clone(), geo)
    c = balanced_offsets(m.to(torch.float64), geo)  # the stable-sort path applies the same rule
    assert torch.equal(a, b) and torch.equal(a, c)


@settings(max_examples=40, deadline=None)
@given(matrices(), st.sampled_from([0.3, 0.5, 0.9, 0.99]))
def test_unstructured_keeps_exact_count_by_rank(matrix, s):
    mask = unstructured_mask(matrix, s)
    n = keep_count(s, matrix.numel())
    assert int(mask.sum()) == n
    flat_m, flat_k = matrix.reshape(-1).abs().to(torch.float64), mask.reshape(-1)
    if 0 < n < matrix.numel():
        kept_min = flat_m[flat_k].min()
        dropped_max = flat_m[~flat_k].max()
        assert kept_min >= dropped_max
        if kept_min == dropped_max:  # ties: every kept one with that magnitude precedes the dropped ones
            kept_pos = torch.nonzero(flat_k & (flat_m == kept_min)).max()
            drop_pos = torch.nonzero(~flat_k & (flat_m == kept_min)).min()
            assert kept_pos < drop_pos


def test_unstructured_fp64_path_agrees_with_key_path():
    m = (torch.randn(30, 30) * 2).round()
    assert torch.equal(mask_keep_n(m, 100), mask_keep_n(m.to(torch.float64), 100))


def test_global_keep_counts_rank_across_tensors():
    a = torch.tensor([[5.0, 1.0], [0.5, 0.1]])
    b = torch.tensor([[4.0, 3.0, 2.0]])
    assert global_keep_counts([a, b], 1 - 3 / 7) == [1, 2]


@settings(max_examples=30, deadline=None)
@given(matrices(max_rows=20, max_cols=40), st.sampled_from([(2, 2), (4, 4), (3, 5), (8, 8)]), st.sampled_from([0.5, 0.8]))
def test_block_keeps_whole_tiles(matrix, shape, s):
    mask = block_mask(matrix, shape, s)
    rows, cols = matrix.shape
    bh, bw = shape
    rb, cb = math.ceil(rows / bh), math.ceil(cols / bw)
    tiles = torch.zeros(rb * bh, cb * bw, dtype=torch.bool)
    tiles[:rows, :cols] = mask
    per_tile = tiles.reshape(rb, bh, cb, bw).permute(0, 2, 1, 3).reshape(rb * cb, -1)
    kept = per_tile[:, 0]
    # a tile is all-kept or all-dropped (within the real matrix)
    real = torch.zeros_like(tiles)
    real[:rows, :cols] = True
    real_t = real.reshape(rb, bh, cb, bw).permute(0, 2, 1, 3).reshape(rb * cb, -1)
    assert torch.equal(per_tile & real_t, kept[:, None] & real_t)
    assert int(kept.sum()) == keep_count(s, rb * cb)


SCHEDULES = [Schedule(ScheduleKind.CUBIC, 4), Schedule(ScheduleKind.LINEAR, 3),
             Schedule(ScheduleKind.LIST, 3, (0.5, 0.7, 0.9))]


@settings(max_examples=30, deadline=None)
@given(matrices(max_rows=8, max_cols=96), st.sampled_from(["balanced", "unstructured", "block"]),
       st.sampled_from(SCHEDULES))
def test_iterative_masks_nested_balanced_and_equal_to_one_shot(matrix, kind, schedule):
    target = 0.9
    pattern = {"balanced": BalancedPattern(target, blocks=4), "unstructured": UnstructuredPattern(target),
               "block": BlockPattern(target, (2, 4))}[kind]
    sparsities = schedule.sparsities(target)
    masks = list(nested_masks(matrix, pattern, sparsities))
    for prev, cur in zip(masks, masks[1:]):
        assert not bool((cur & ~prev).any()), "masks are nested"
    if kind == "balanced":
        for s, mask in zip(sparsities, masks):
            g = geometry_for(*matrix.shape, BalancedPattern(s, blocks=4))
            _check_balanced(matrix, mask, g)  # exactly k_t per block at EVERY step
    # Without fine-tuning in between, iterating reaches the one-shot mask.
    assert torch.equal(masks[-1], one_shot_mask(matrix, pattern))


def test_iterative_with_changing_weights_stays_nested_and_balanced():
    g = torch.Generator().manual_seed(3)
    w = torch.randn(8, 64, generator=g)
    pattern = BalancedPattern(0.875, blocks=4)
    gen = nested_masks(w, pattern, [0.5, 0.75, 0.875])
    prev = None
    for s in [0.5, 0.75, 0.875]:
        mask = next(gen)
        if prev is not None:
            assert not bool((mask & ~prev).any())
        geo = geometry_for(8, 64, BalancedPattern(s, blocks=4))
        assert mask.reshape(8, 4, 16).sum(-1).eq(geo.keep).all()
        # "fine-tune": perturb the kept weights, zero the pruned ones
        w.mul_(mask).add_(torch.randn(8, 64, generator=g) * mask * 0.5)
        prev = mask
