"""Block sparsity: bh x bw tiles kept or dropped whole, ranked by the tile's L2 norm.

The matrix is viewed as zero-padded to multiples of the tile shape; the tile count kept is
keep_count(sparsity, number of tiles). Ties: lower tile index (row-major over the tile grid).
"""

from __future__ import annotations

import math

import torch

from ..config import keep_count
from .ranking import top_positions


def tile_grid(rows: int, cols: int, block_shape: tuple[int, int]) -> tuple[int, int]:
    bh, bw = block_shape
    return math.ceil(rows / bh), math.ceil(cols / bw)


def padded_tiles(matrix: torch.Tensor, block_shape: tuple[int, int]) -> torch.Tensor:
    """[Rb, Cb, bh, bw] view of the zero-padded matrix."""
    bh, bw = block_shape
    rows, cols = matrix.shape
    rb, cb = tile_grid(rows, cols, block_shape)
    padded = torch.nn.functional.pad(matrix, (0, cb * bw - cols, 0, rb * bh - rows))
    return padded.reshape(rb, bh, cb, bw).permute(0, 2, 1, 3)


def kept_tiles(matrix: torch.Tensor, block_shape: tuple[int, int], sparsity: float) -> torch.Tensor:
    """Flat tile indices (ascending, int64) of the tiles kept."""
    tiles = padded_tiles(matrix, block_shape)
    acc = torch.float64 if matrix.dtype == torch.float64 else torch.float32
    norms = tiles.to(acc).pow(2).sum(dim=(2, 3)).sqrt().reshape(-1)
    keep = keep_count(sparsity, norms.numel())
    return top_positions(norms.to(torch.float32) if acc == torch.float32 else norms, keep)


def block_mask(matrix: torch.Tensor, block_shape: tuple[int, int], sparsity: float) -> torch.Tensor:
    """bool [R, C]: True inside kept tiles."""
    rows, cols = matrix.shape
    rb, cb = tile_grid(rows, cols, block_shape)
    keep = torch.zeros(rb * cb, dtype=torch.bool)
    keep[kept_tiles(matrix, block_shape, sparsity)] = True
    bh, bw = block_shape
    full = keep.reshape(rb, cb).repeat_interleave(bh, 0).repeat_interleave(bw, 1)
    return full[:rows, :cols]
