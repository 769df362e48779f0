"""Balanced sparsity (Yao et al. 2019): every block of every row keeps exactly k entries.

A weight matrix [R, K] (a conv weight [C_out, C_in, kh, kw] is viewed as [C_out, C_in*kh*kw],
row-major) is split row by row into B blocks of length L; block j covers columns
[j*L, (j+1)*L), the row viewed as zero-padded to B*L columns. Each block keeps the k entries of
largest magnitude (ties: lower column first); padding columns rank below every real column, so
they are kept only when a block has fewer than k real columns.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .kinds import BalancedPattern, keep_count
from .ranking import magnitude_bits

#: Largest block length an in-block index can address (uint16).
MAX_BLOCK_LENGTH = 65536


@dataclass(frozen=True)
class BalancedGeometry:
    """How one [rows, cols] matrix is cut: B blocks of length L, k kept per block.

    ``blocks_requested`` is what the user asked for; ``blocks`` can be fewer when the row is too
    short (K=33 with 32 blocks gives L=2, so 17 blocks cover it). ``padded_width`` = B * L.
    """

    rows: int
    cols: int
    blocks: int
    block_length: int
    keep: int
    blocks_requested: int | None

    @property
    def padded_width(self) -> int:
        return self.blocks * self.block_length

    @property
    def index_dtype(self) -> torch.dtype:
        """The offsets encoding's index type (formats.layouts owns the rule)."""
        from ..formats.layouts import offsets_index_dtype  # formats imports this module: no cycle at call time

        return offsets_index_dtype(self.block_length)

    def real_length(self, block: int) -> int:
        """Number of real (non-padding) columns in block ``block``."""
        return max(0, min(self.block_length, self.cols - block * self.block_length))

    @property
    def kept_real_per_row(self) -> int:
        """Kept entries per row that fall on real columns (padding is chosen last)."""
        return sum(min(self.keep, self.real_length(j)) for j in range(self.blocks))

    @property
    def achieved_sparsity(self) -> float:
        return 1.0 - self.kept_real_per_row / self.cols

    @property
    def prunes_anything(self) -> bool:
        return self.kept_real_per_row < self.cols


def geometry_for(rows: int, cols: int, pattern: BalancedPattern) -> BalancedGeometry:
    """The geometry of ``pattern`` on a [rows, cols] matrix (cols >= 1).

    With ``blocks`` B: L = ceil(K / B), then B' = ceil(K / L) <= B blocks (fewer when the row is
    too short for B non-empty blocks). With ``block_size`` L: B = ceil(K / L).
    k = keep_count(sparsity, L). Raises ValueError when L exceeds MAX_BLOCK_LENGTH.
    """
    if pattern.blocks is not None:
        length = math.ceil(cols / pattern.blocks)
    else:
        length = pattern.block_size
    blocks = math.ceil(cols / length)
    if length > MAX_BLOCK_LENGTH:
        raise ValueError(
            f"block length {length} exceeds {MAX_BLOCK_LENGTH}, the most a uint16 in-block index addresses"
        )
    return BalancedGeometry(rows, cols, blocks, length, keep_count(pattern.sparsity, length), pattern.blocks)


def _padded_blocks(matrix: torch.Tensor, g: BalancedGeometry) -> torch.Tensor:
    pad = g.padded_width - g.cols
    if pad:
        matrix = torch.nn.functional.pad(matrix, (0, pad))
    return matrix.reshape(matrix.shape[0], g.blocks, g.block_length)


def _block_keys(magnitudes: torch.Tensor, g: BalancedGeometry, eligible: torch.Tensor | None) -> torch.Tensor:
    """Integer keys [r, B, L]: real columns by (magnitude, lower offset); padding below; ineligible lowest.

    int32 for F16/BF16 (15 magnitude bits + at most 16 offset bits fit in 31 bits), int64 for F32:
    half the memory traffic for the common half-precision checkpoints.
    """
    L = g.block_length
    offset_bits = max(1, (L - 1).bit_length())
    key_dtype = torch.int32 if magnitudes.dtype in (torch.float16, torch.bfloat16) else torch.int64
    rank_by_offset = torch.arange(L - 1, -1, -1, dtype=key_dtype)
    bits = magnitude_bits(magnitudes).to(key_dtype)
    keys = (_padded_blocks(bits, g) << offset_bits) | rank_by_offset
    if g.padded_width != g.cols:
        real = _padded_blocks(torch.ones(1, g.cols, dtype=torch.bool), g)
        # Padding ranks below every real column (real keys are >= 0), lower offset first.
        keys = torch.where(real, keys, rank_by_offset - (L + 1))
    if eligible is not None:
        keys = torch.where(eligible, keys, rank_by_offset - (3 * L + 2))
    return keys


#: Bytes of one chunk's key array. Small on purpose: temporaries under glibc's 32 MB mmap threshold
#: are reused from the heap; larger ones are mapped, faulted and zeroed anew for every chunk, which
#: measured 5x slower on the 1e9-parameter benchmark (BENCHMARKS.md).
CHUNK_KEY_BYTES = 8 << 20


def _chunk_rows(g: BalancedGeometry) -> int:
    return max(1, CHUNK_KEY_BYTES // (g.padded_width * 8))


def balanced_offsets(matrix: torch.Tensor, g: BalancedGeometry, eligible: torch.Tensor | None = None,
                     dtype: torch.dtype = torch.int64) -> torch.Tensor:
    """In-block offsets [R, B, k] (``dtype``, ascending per block) of the kept entries.

    ``matrix`` is [R, K] F16/BF16/F32/F64 with finite values. ``eligible`` (bool [R, B, L],
    optional) restricts the choice to a previous mask, which is how iterative masks stay nested;
    it must hold at least k entries per block. Work is chunked by rows so temporaries stay small
    whatever the tensor size.
    """
    if matrix.dtype == torch.float64:
        # 63-bit magnitudes leave no room for the offset in an int64 key: compare as float64,
        # keeping the same rule through a stable sort.
        return _balanced_offsets_f64(matrix.abs(), g, eligible).to(dtype)
    out = torch.empty(g.rows, g.blocks, g.keep, dtype=dtype)
    step = _chunk_rows(g)
    for r0 in range(0, g.rows, step):
        r1 = min(g.rows, r0 + step)
        keys = _block_keys(matrix[r0:r1], g, None if eligible is None else eligible[r0:r1])
        idx = torch.topk(keys, g.keep, dim=-1, sorted=False).indices
        out[r0:r1] = torch.sort(idx, dim=-1).values
    return out


def _balanced_offsets_f64(mags: torch.Tensor, g: BalancedGeometry, eligible: torch.Tensor | None) -> torch.Tensor:
    scores = _padded_blocks(mags, g).clone()
    if g.padded_width != g.cols:
        real = _padded_blocks(torch.ones(1, g.cols, dtype=torch.bool), g)
        scores = torch.where(real, scores, torch.tensor(-1.0, dtype=torch.float64))
    if eligible is not None:
        scores = torch.where(eligible, scores, torch.tensor(-2.0, dtype=torch.float64))
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices[..., : g.keep]
    return torch.sort(order, dim=-1).values


def offsets_to_mask(offsets: torch.Tensor, g: BalancedGeometry) -> torch.Tensor:
    """bool [R, B, L] mask over the padded blocks from in-block offsets [R, B, k]."""
    mask = torch.zeros(g.rows, g.blocks, g.block_length, dtype=torch.bool)
    mask.scatter_(-1, offsets, True)
    return mask


def balanced_mask(matrix: torch.Tensor, g: BalancedGeometry) -> torch.Tensor:
    """bool [R, K]: True where ``matrix`` keeps an entry under geometry ``g``."""
    mask = offsets_to_mask(balanced_offsets(matrix, g), g)
    return mask.reshape(g.rows, g.padded_width)[:, : g.cols]
