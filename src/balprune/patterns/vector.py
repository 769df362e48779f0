"""Vector sparsity: 1-D vectors of V consecutive weights in a row, kept or dropped whole.

The coarse-grained baseline of the paper's accuracy comparison (vector-level sparsity, Mao et al.
2017): each row of the [R, K] matrix view is cut into ceil(K / V) vectors of V columns (the last
one zero-padded), the vectors of the whole matrix are ranked by their L2 norm, and the best
keep_count(sparsity, R * ceil(K / V)) are kept. Ties: lower vector index (row-major). This is
block sparsity with 1 x V tiles, so it shares block's ranking and is packed as BSR with 1 x V
tiles (FORMAT.md); no second implementation.
"""

from __future__ import annotations

import torch

from .block import block_mask


def vector_shape(length: int) -> tuple[int, int]:
    """The tile shape of a vector of ``length`` weights along a row."""
    return (1, int(length))


def vector_mask(matrix: torch.Tensor, length: int, sparsity: float) -> torch.Tensor:
    """bool [R, K]: True inside the kept vectors of ``length`` consecutive columns."""
    return block_mask(matrix, vector_shape(length), sparsity)
