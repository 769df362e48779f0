"""Unstructured (fine-grained) magnitude sparsity: the n largest magnitudes of a tensor are kept.

Ties: lower flat (row-major) position first. A global variant ranks every targeted tensor's
magnitudes together; see ``global_threshold``.
"""

from __future__ import annotations

import torch

from .kinds import keep_count
from .ranking import magnitude_bits


def unstructured_mask(matrix: torch.Tensor, sparsity: float) -> torch.Tensor:
    """bool mask, same shape: keeps keep_count(sparsity, numel) entries (at least one)."""
    n = matrix.numel()
    keep = keep_count(sparsity, n)
    return mask_keep_n(matrix, keep)


def mask_keep_n(matrix: torch.Tensor, keep: int) -> torch.Tensor:
    """bool mask keeping exactly ``keep`` entries of ``matrix`` by the ranking rule."""
    n = matrix.numel()
    flat = matrix.reshape(-1).abs()
    if keep >= n:
        return torch.ones_like(matrix, dtype=torch.bool)
    if keep <= 0:
        return torch.zeros_like(matrix, dtype=torch.bool)
    if flat.dtype == torch.float64:
        order = torch.sort(flat, descending=True, stable=True).indices[:keep]
        mask = torch.zeros(n, dtype=torch.bool)
        mask[order] = True
        return mask.reshape(matrix.shape)
    bits = max(1, (n - 1).bit_length())
    keys = (magnitude_bits(flat) << bits) | torch.arange(n - 1, -1, -1, dtype=torch.int64)
    # The (n - keep)-th smallest key is the largest one dropped; keys are unique, so exactly
    # ``keep`` keys lie above it. kthvalue is O(n), unlike a full sort.
    threshold = torch.kthvalue(keys, n - keep).values
    return (keys > threshold).reshape(matrix.shape)


def global_keep_counts(magnitudes: list[torch.Tensor], sparsity: float) -> list[int]:
    """Per-tensor keep counts for one global magnitude ranking over all ``magnitudes``.

    Ranking: larger magnitude first (compared in float64), then earlier tensor, then lower flat
    position. Returns how many entries of each tensor are kept; ``mask_keep_n`` with that count
    on each tensor reproduces the global choice exactly, because within a tensor the global and
    the per-tensor ranking agree.
    """
    total = sum(m.numel() for m in magnitudes)
    keep = keep_count(sparsity, total)
    flat = torch.cat([m.reshape(-1).abs().to(torch.float64) for m in magnitudes])
    order = torch.sort(flat, descending=True, stable=True).indices[:keep]
    bounds = torch.tensor([0] + [m.numel() for m in magnitudes]).cumsum(0)
    which = torch.bucketize(order, bounds[1:], right=True)
    return torch.bincount(which, minlength=len(magnitudes)).tolist()
