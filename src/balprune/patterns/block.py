"""Block sparsity: bh x bw tiles kept or dropped whole, ranked by the tile's L2 norm.

The matrix is viewed as zero-padded to multiples of the tile shape; the tile count kept is
keep_count(sparsity, number of tiles). Ties: lower tile index (row-major over the tile grid).
"""

from __future__ import annotations

import torch

from .kinds import keep_count
from .ranking import top_positions


def tile_grid(rows: int, cols: int, block_shape: tuple[int, int]) -> tuple[int, int]:
    """(tile rows, tile cols) covering the matrix, in exact integer arithmetic (any size a manifest may claim)."""
    bh, bw = block_shape
    return -(-rows // bh), -(-cols // bw)


def padded_tiles(matrix: torch.Tensor, block_shape: tuple[int, int]) -> torch.Tensor:
    """[Rb, Cb, bh, bw] view of the zero-padded matrix."""
    bh, bw = block_shape
    rows, cols = matrix.shape
    rb, cb = tile_grid(rows, cols, block_shape)
    padded = torch.nn.functional.pad(matrix, (0, cb * bw - cols, 0, rb * bh - rows))
    return padded.reshape(rb, bh, cb, bw).permute(0, 2, 1, 3)


def kept_tiles(matrix: torch.Tensor, block_shape: tuple[int, int], sparsity: float,
               eligible: torch.Tensor | None = None) -> torch.Tensor:
    """bool [Rb*Cb]: the tiles kept, by L2 norm (F32 accumulation, F64 for F64), lower index on ties.

    ``eligible`` (bool [Rb*Cb], optional) restricts the choice to a previous step's tiles, which
    rank below every eligible one: how iterative block masks stay nested.
    """
    acc = torch.float64 if matrix.dtype == torch.float64 else torch.float32
    norms = padded_tiles(matrix, block_shape).to(acc).pow(2).sum(dim=(2, 3)).sqrt().reshape(-1)
    if eligible is not None:
        norms = torch.where(eligible, norms.to(torch.float64), torch.tensor(-1.0, dtype=torch.float64))
    out = torch.zeros(norms.numel(), dtype=torch.bool)
    out[top_positions(norms, keep_count(sparsity, norms.numel()))] = True
    return out


def tiles_to_mask(tiles: torch.Tensor, rows: int, cols: int, block_shape: tuple[int, int]) -> torch.Tensor:
    """bool [rows, cols]: True inside the tiles set in ``tiles`` (bool [Rb*Cb])."""
    rb, cb = tile_grid(rows, cols, block_shape)
    bh, bw = block_shape
    return tiles.reshape(rb, cb).repeat_interleave(bh, 0).repeat_interleave(bw, 1)[:rows, :cols]


def block_mask(matrix: torch.Tensor, block_shape: tuple[int, int], sparsity: float) -> torch.Tensor:
    """bool [R, C]: True inside kept tiles."""
    return tiles_to_mask(kept_tiles(matrix, block_shape, sparsity), *matrix.shape, block_shape)
