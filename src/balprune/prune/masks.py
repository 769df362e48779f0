"""Masks for one matrix under any pattern, one-shot or nested across a schedule.

``nested_masks`` is the per-tensor core of Algorithm 1 (balance-aware iterative pruning): at
step t it keeps, inside the mask of step t-1, the best entries for sparsity s_t. For the
balanced pattern every block holds exactly k_t entries at every step (k_t = keep_count(s_t, L)),
never a mixture of pruned and unpruned blocks.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from ..config import BalancedPattern, Pattern, UnstructuredPattern, keep_count
from ..patterns.balanced import balanced_offsets, geometry_for, offsets_to_mask
from ..patterns.block import kept_tiles, tiles_to_mask
from ..patterns.ranking import top_positions
from ..patterns.unstructured import mask_keep_n


def nested_masks(matrix: torch.Tensor, pattern: Pattern, sparsities: list[float],
                 keep_override: int | None = None) -> Iterator[torch.Tensor]:
    """Yield one bool [R, K] mask per sparsity; each mask lies inside the previous one.

    ``matrix`` may change between steps (fine-tuning): the generator reads it afresh at each
    step, so a caller can train between ``next()`` calls. ``keep_override`` fixes the final
    step's keep count (used by global unstructured pruning).
    """
    rows, cols = matrix.shape
    prev: torch.Tensor | None = None
    for i, s in enumerate(sparsities):
        last = i == len(sparsities) - 1
        if isinstance(pattern, BalancedPattern):
            g = geometry_for(rows, cols, _with(pattern, s))
            offsets = balanced_offsets(matrix, g, eligible=prev)
            prev = offsets_to_mask(offsets, g)
            yield prev.reshape(rows, g.padded_width)[:, :cols]
        elif isinstance(pattern, UnstructuredPattern):
            keep = keep_override if (last and keep_override is not None) else keep_count(s, rows * cols)
            prev = _unstructured_within(matrix, keep, prev)
            yield prev
        else:
            prev = kept_tiles(matrix, pattern.block_shape, s, eligible=prev)
            yield tiles_to_mask(prev, rows, cols, pattern.block_shape)


def one_shot_mask(matrix: torch.Tensor, pattern: Pattern, keep_override: int | None = None) -> torch.Tensor:
    return next(nested_masks(matrix, pattern, [pattern.sparsity], keep_override))


def _with(pattern: BalancedPattern, s: float) -> BalancedPattern:
    return BalancedPattern(s, blocks=pattern.blocks, block_size=pattern.block_size)


def _unstructured_within(matrix: torch.Tensor, keep: int, prev: torch.Tensor | None) -> torch.Tensor:
    if prev is None:
        return mask_keep_n(matrix, keep)
    # Entries outside the previous mask rank below every entry inside it.
    scores = torch.where(prev, matrix.abs().to(torch.float64), torch.tensor(-1.0, dtype=torch.float64))
    flat = top_positions(scores.reshape(-1), keep)
    out = torch.zeros(matrix.numel(), dtype=torch.bool)
    out[flat] = True
    return out.reshape(matrix.shape)
