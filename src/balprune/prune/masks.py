"""Masks for one matrix under any pattern, one-shot or nested across a schedule.

``next_mask`` is the per-tensor step of Algorithm 1 (balance-aware iterative pruning): it keeps,
inside the previous step's mask, the best entries for sparsity s_t. For the balanced pattern
every block holds exactly k_t entries at every step (k_t = keep_count(s_t, L)), never a mixture
of pruned and unpruned blocks. ``nested_masks`` chains it over a schedule. The previous mask is
an ordinary bool [R, K] tensor, so a caller can store it (a training checkpoint) and continue
the chain later with exactly the result of an uninterrupted run.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from ..patterns.balanced import balanced_offsets, geometry_for, offsets_to_mask
from ..patterns.block import kept_tiles, padded_tiles, tiles_to_mask
from ..patterns.kinds import BalancedPattern, Pattern, UnstructuredPattern, keep_count
from ..patterns.ranking import top_positions
from ..patterns.unstructured import mask_keep_n


def next_mask(matrix: torch.Tensor, pattern: Pattern, sparsity: float, prev: torch.Tensor | None = None,
              keep_override: int | None = None) -> torch.Tensor:
    """bool [R, K]: the mask of ``pattern`` at ``sparsity``, chosen inside ``prev`` (bool [R, K]).

    ``matrix`` is the CPU [R, K] view of the weights as they are now (after fine-tuning);
    ``prev`` must come from the same pattern at a sparsity <= ``sparsity`` (or be None: one
    shot). ``keep_override`` fixes the unstructured keep count (global unstructured pruning).
    """
    rows, cols = matrix.shape
    if isinstance(pattern, BalancedPattern):
        g = geometry_for(rows, cols, _with(pattern, sparsity))
        eligible = None
        if prev is not None:
            # Padding columns stay eligible: they rank below every real column anyway, and a
            # previous step chose padding only after all real columns of its block.
            padded = torch.ones(rows, g.padded_width, dtype=torch.bool)
            padded[:, :cols] = prev
            eligible = padded.reshape(rows, g.blocks, g.block_length)
        offsets = balanced_offsets(matrix, g, eligible=eligible)
        return offsets_to_mask(offsets, g).reshape(rows, g.padded_width)[:, :cols]
    if isinstance(pattern, UnstructuredPattern):
        keep = keep_override if keep_override is not None else keep_count(sparsity, rows * cols)
        return _unstructured_within(matrix, keep, prev)
    shape = pattern.block_shape  # block, or vector (1 x V tiles)
    eligible = None
    if prev is not None:
        # A tile was kept iff its real entries are set (every tile holds at least one real entry).
        eligible = padded_tiles(prev.to(torch.uint8), shape).flatten(2).any(-1).reshape(-1).bool()
    tiles = kept_tiles(matrix, shape, sparsity, eligible=eligible)
    return tiles_to_mask(tiles, rows, cols, shape)


def nested_masks(matrix: torch.Tensor, pattern: Pattern, sparsities: list[float],
                 keep_override: int | None = None) -> Iterator[torch.Tensor]:
    """Yield one bool [R, K] mask per sparsity; each mask lies inside the previous one.

    ``matrix`` may change between steps (fine-tuning): the generator reads it afresh at each
    step, so a caller can train between ``next()`` calls. ``keep_override`` fixes the final
    step's keep count (used by global unstructured pruning).
    """
    prev: torch.Tensor | None = None
    for i, s in enumerate(sparsities):
        last = i == len(sparsities) - 1
        prev = next_mask(matrix, pattern, s, prev, keep_override if last else None)
        yield prev


def one_shot_mask(matrix: torch.Tensor, pattern: Pattern, keep_override: int | None = None) -> torch.Tensor:
    return next_mask(matrix, pattern, pattern.sparsity, None, keep_override)


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

