"""prune.criteria: magnitude, wanda and sparsegpt inside every pattern (CPU, small matrices).

The properties: every pattern's exact count holds for each criterion; pruned entries are exactly zero;
wanda with equal input norms is magnitude and follows the norms otherwise; per-row wanda is the
published rule; sparsegpt's update is the paper's sequential OBS (checked against a direct, inverse-by-
inverse implementation) and reconstructs the layer's output better than wanda and magnitude.
"""

from __future__ import annotations

import pytest
import torch

from balprune.errors import InvalidInputError
from balprune.patterns.balanced import geometry_for
from balprune.patterns.block import padded_tiles, tile_grid
from balprune.patterns.kinds import BalancedPattern, BlockPattern, UnstructuredPattern, VectorPattern, keep_count
from balprune.prune.criteria import (
    Criterion,
    InputStats,
    inverse_hessian_factor,
    prune_matrix,
    sparsegpt_prune,
    wanda_scores,
)

PATTERNS = {
    "balanced-4-blocks": BalancedPattern(0.5, blocks=4),          # K=50: L=13, the last block 11 columns
    "balanced-L16-70%": BalancedPattern(0.7, blocks=None, block_size=16),
    "nm-2:4": BalancedPattern(0.5, blocks=None, block_size=4),
    "per-row": BalancedPattern(0.5, blocks=1),                     # Wanda's own "unstructured": one block a row
    "unstructured": UnstructuredPattern(0.6),
    "block-4x8": BlockPattern(0.5, (4, 8)),
    "vector-8": VectorPattern(0.5, 8),
}


def _layer(rows=24, cols=50, tokens=400, seed=0):
    """A weight [rows, cols] and correlated inputs X [tokens, cols] with uneven column scales."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(cols, cols, generator=g) / cols**0.5
    scales = torch.linspace(0.2, 3.0, cols)[torch.randperm(cols, generator=g)]
    x = (torch.randn(tokens, cols, generator=g) @ mix + 0.3 * torch.randn(tokens, cols, generator=g)) * scales
    w = torch.randn(rows, cols, generator=g)
    return w, x


def _stats(x: torch.Tensor, gram: bool = True) -> InputStats:
    s = InputStats(x.shape[1], gram=gram)
    for chunk in x.split(97):  # several batches, as calibration adds them
        s.add(chunk)
    return s


def _check_pattern(mask: torch.Tensor, pattern) -> None:
    """The pattern's exact count: balanced k (or every real column) per block of every row; unstructured
    its keep count; block / vector whole tiles, exactly the keep count of them."""
    rows, cols = mask.shape
    if isinstance(pattern, BalancedPattern):
        g = geometry_for(rows, cols, pattern)
        for j in range(g.blocks):
            real = g.real_length(j)
            counts = mask[:, j * g.block_length: j * g.block_length + real].sum(1)
            assert bool((counts == min(g.keep, real)).all()), (j, counts)
    elif isinstance(pattern, UnstructuredPattern):
        assert int(mask.sum()) == keep_count(pattern.sparsity, rows * cols)
    else:
        tiles = padded_tiles(mask.to(torch.uint8), pattern.block_shape).flatten(2)
        real = padded_tiles(torch.ones(rows, cols, dtype=torch.uint8), pattern.block_shape).flatten(2)
        kept = tiles.sum(-1)
        assert bool(((kept == 0) | (kept == real.sum(-1))).all()), "a tile is partly kept"
        rb, cb = tile_grid(rows, cols, pattern.block_shape)
        assert int((kept > 0).sum()) == keep_count(pattern.sparsity, rb * cb)


def _output_error(w, pruned, x) -> float:
    return float(((w - pruned) @ x.T).norm() / (w @ x.T).norm())


@pytest.mark.parametrize("name", list(PATTERNS))
@pytest.mark.parametrize("criterion", list(Criterion))
def test_exact_counts_zeros_and_determinism(name, criterion):
    pattern = PATTERNS[name]
    w, x = _layer()
    stats = _stats(x)
    a = prune_matrix(criterion, w, pattern, stats)
    _check_pattern(a.mask, pattern)
    assert bool((a.weight[~a.mask] == 0).all()) and a.weight.dtype == w.dtype
    if criterion is not Criterion.SPARSEGPT:  # the kept values are the original weights
        assert torch.equal(a.weight[a.mask], w[a.mask])
    b = prune_matrix(criterion, w.clone(), pattern, _stats(x))
    assert torch.equal(a.weight, b.weight) and torch.equal(a.mask, b.mask)


@pytest.mark.parametrize("name", list(PATTERNS))
def test_wanda_with_equal_input_norms_is_magnitude(name):
    pattern = PATTERNS[name]
    w, _ = _layer(seed=1)
    stats = InputStats(w.shape[1], gram=False)
    stats.sum_sq.fill_(16.0)  # every column norm 4: a power of two scales |W| exactly (no new ties)
    wanda = prune_matrix(Criterion.WANDA, w, pattern, stats)
    magnitude = prune_matrix(Criterion.MAGNITUDE, w, pattern)
    assert torch.equal(wanda.mask, magnitude.mask) and torch.equal(wanda.weight, magnitude.weight)


@pytest.mark.parametrize("name", ["balanced-4-blocks", "nm-2:4", "per-row"])
def test_wanda_keeps_a_column_with_a_huge_input_norm(name):
    w, _ = _layer(seed=2)
    w[:, 5] *= 0.05  # small weights, which magnitude drops in most rows
    stats = InputStats(w.shape[1], gram=False)
    stats.sum_sq.fill_(1.0)
    stats.sum_sq[5] = 1e8
    wanda = prune_matrix(Criterion.WANDA, w, PATTERNS[name], stats).mask
    magnitude = prune_matrix(Criterion.MAGNITUDE, w, PATTERNS[name]).mask
    assert bool(wanda[:, 5].all())
    assert not bool(magnitude[:, 5].all())


def test_per_row_wanda_is_the_published_rule():
    """Wanda (Sun et al.): per output row, drop the half with the smallest |W_ij| * ||X_j||_2."""
    w, x = _layer(rows=16, cols=64, seed=3)
    pruned = prune_matrix(Criterion.WANDA, w, BalancedPattern(0.5, blocks=1), _stats(x, gram=False)).weight
    scores = w.abs() * x.to(torch.float64).norm(dim=0).to(torch.float32)
    drop = torch.sort(scores, dim=1).indices[:, :32]
    expected = w.clone().scatter_(1, drop, 0.0)
    assert torch.equal(pruned, expected)


def test_wanda_scores_and_nonfinite_inputs():
    w = torch.tensor([[1.0, -2.0], [0.5, 0.0]])
    assert torch.equal(wanda_scores(w, torch.tensor([4.0, 9.0], dtype=torch.float64)),
                       torch.tensor([[2.0, 6.0], [1.0, 0.0]]))
    stats = InputStats(2, gram=False)
    stats.sum_sq[:] = float("inf")
    with pytest.raises(InvalidInputError, match="not finite"):
        prune_matrix(Criterion.WANDA, w, BalancedPattern(0.5, blocks=1), stats)


@pytest.mark.parametrize("name", list(PATTERNS))
def test_sparsegpt_reconstructs_better_than_wanda_and_magnitude(name):
    pattern = PATTERNS[name]
    w, x = _layer(seed=4)
    stats = _stats(x)
    err = {c: _output_error(w, prune_matrix(c, w, pattern, stats).weight, x) for c in Criterion}
    assert err[Criterion.SPARSEGPT] < err[Criterion.WANDA], err
    assert err[Criterion.SPARSEGPT] < err[Criterion.MAGNITUDE], err


def _direct_sparsegpt_balanced(w, gram, length, keep, damp=0.01):
    """The paper's algorithm written the slow way, float64: for every column i, the inverse of the Hessian
    of the columns not yet swept (H[i:, i:])^-1 is computed afresh; a block's mask is chosen at its first
    column by w^2 / [(H[j:, j:])^-1]_00 over its columns; the pruned weight's error is spread over the
    columns to its right by the first row of that inverse."""
    w = w.to(torch.float64).clone()
    h = 2 * gram.to(torch.float64)
    h += damp * h.diagonal().mean() * torch.eye(h.shape[0], dtype=torch.float64)
    rows, cols = w.shape
    mask = torch.zeros(rows, cols, dtype=torch.bool)
    for i in range(cols):
        hinv = torch.linalg.inv(h[i:, i:])
        if i % length == 0:
            end = min(i + length, cols)
            d2 = torch.stack([torch.linalg.inv(h[j:, j:])[0, 0] for j in range(i, end)])
            saliency = w[:, i:end] ** 2 / d2
            kept = torch.topk(saliency, min(keep, end - i), dim=1).indices
            mask[:, i:end].scatter_(1, kept, True)
        q = torch.where(mask[:, i], w[:, i], 0.0)
        err = (w[:, i] - q) / hinv[0, 0]
        w[:, i:] -= err[:, None] * hinv[0][None, :]
        w[:, i] = q
    return w, mask


@pytest.mark.parametrize("length,keep", [(4, 2), (8, 3), (13, 6)])
def test_sparsegpt_is_the_papers_sequential_obs(length, keep):
    w, x = _layer(rows=12, cols=40, seed=5)
    gram = _stats(x).gram
    pattern = BalancedPattern(1 - keep / length, blocks=None, block_size=length)
    assert geometry_for(12, 40, pattern).keep == keep
    ours = sparsegpt_prune(w, pattern, gram, group_size=16)  # several lazy-update groups, some cut at a block
    direct, mask = _direct_sparsegpt_balanced(w, gram, length, keep)
    assert torch.equal(ours.mask, mask)
    assert torch.allclose(ours.weight.to(torch.float64), direct, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", list(PATTERNS))
def test_sparsegpt_lazy_groups_change_nothing_but_rounding(name):
    """Lazy batch updates are an ordering of the same arithmetic: any group size gives the same mask."""
    w, x = _layer(cols=50, seed=6)
    gram = _stats(x).gram
    one = sparsegpt_prune(w, PATTERNS[name], gram, group_size=50)
    for size in (8, 16, 24):
        other = sparsegpt_prune(w, PATTERNS[name], gram, group_size=size)
        if isinstance(PATTERNS[name], BalancedPattern):  # units (blocks) are the same whatever the group
            assert torch.equal(one.mask, other.mask)
            assert torch.allclose(one.weight, other.weight, rtol=1e-4, atol=1e-5)
        _check_pattern(other.mask, PATTERNS[name])


def test_sparsegpt_keeps_the_dtype_and_handles_dead_inputs():
    w, x = _layer(seed=7)
    x[:, :10] = 0  # inputs that never fire: a singular X^T X, made definite by the dampening
    stats = _stats(x)
    out = prune_matrix(Criterion.SPARSEGPT, w.to(torch.bfloat16), PATTERNS["nm-2:4"], stats)
    assert out.weight.dtype == torch.bfloat16 and bool(torch.isfinite(out.weight.float()).all())
    _check_pattern(out.mask, PATTERNS["nm-2:4"])
    zero = InputStats(w.shape[1], gram=True)  # no inputs at all: H = I
    assert torch.equal(inverse_hessian_factor(zero.gram), torch.eye(w.shape[1], dtype=torch.float64) / 1.01**0.5)


def test_input_stats_accumulate_sums_and_gram():
    x = torch.randn(30, 6, dtype=torch.float64)
    s = InputStats(6, gram=True)
    s.add(x[:10].reshape(2, 5, 6))  # [batch, tokens, features]
    s.add(x[10:])
    assert s.tokens == 30
    assert torch.allclose(s.sum_sq, (x**2).sum(0)) and torch.allclose(s.gram, x.T @ x)
    with pytest.raises(ValueError, match="features"):
        s.add(torch.zeros(3, 5))
