"""The block packed tensor: BSR over the [rows, cols] matrix view, zero-padded to whole tiles.

``crow_indices`` int32 [ceil(R/bh)+1], ``col_indices`` int32 [nnzb] (tile columns, strictly
increasing within a tile row), ``values`` [nnzb, bh, bw] in the source dtype. Edge tiles extend
past the matrix; their outside part is stored as zeros and cropped by to_dense.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from ..errors import FormatError
from ..patterns.block import padded_tiles, tile_grid
from ..patterns.ranking import top_positions
from ..safeio import check_fits_memory
from . import spec
from .base import (
    VALUE_DTYPES,
    PartSpec,
    as_matrix,
    check_finite_values,
    check_part,
    code_of,
    positive_int,
    torch_dtype,
)


@dataclass(frozen=True)
class BsrTensor:
    shape: tuple[int, ...]
    dtype: torch.dtype
    block_shape: tuple[int, int]
    crow_indices: torch.Tensor
    col_indices: torch.Tensor
    values: torch.Tensor
    sparsity_target: float

    pattern = "block"

    @property
    def rows(self) -> int:
        return self.shape[0]

    @property
    def cols(self) -> int:
        return math.prod(self.shape[1:])

    @classmethod
    def from_dense(cls, dense: torch.Tensor, block_shape: tuple[int, int], nnz_blocks: int,
                   sparsity_target: float) -> BsrTensor:
        """Pack a dense-with-zeros tensor with at most ``nnz_blocks`` non-zero tiles.

        The stored tiles are the non-zero ones, filled up to nnz_blocks with zero tiles of lowest
        index. Raises ValueError if more tiles are non-zero.
        """
        m = as_matrix(dense)
        tiles = padded_tiles(m, block_shape)  # [Rb, Cb, bh, bw]
        rb, cb = tiles.shape[:2]
        nonzero = (tiles != 0).flatten(2).any(-1).reshape(-1)
        if int(nonzero.sum()) > nnz_blocks:
            raise ValueError(f"more than nnz_blocks={nnz_blocks} non-zero tiles")
        kept = top_positions(nonzero.to(torch.float32), nnz_blocks)
        trow, tcol = kept // cb, kept % cb
        crow = torch.zeros(rb + 1, dtype=torch.int64)
        crow[1:] = torch.bincount(trow, minlength=rb).cumsum(0)
        values = tiles.reshape(rb * cb, *block_shape)[kept].contiguous()
        return cls(tuple(dense.shape), dense.dtype, tuple(block_shape), crow.to(torch.int32),
                   tcol.to(torch.int32), values, sparsity_target)

    def to_dense(self, name: str = "tensor") -> torch.Tensor:
        """The dense-with-zeros tensor; InvalidInputError (exit 4) first when it cannot fit in memory."""
        bh, bw = self.block_shape
        rb, cb = tile_grid(self.rows, self.cols, (bh, bw))
        item = self.values.element_size()
        # the padded tiles, their row-major copy, and the cropped result
        check_fits_memory(2 * rb * cb * bh * bw * item + self.rows * self.cols * item,
                          f"tensor {name!r}: the dense form of {list(self.shape)} {self.dtype} in {bh}x{bw} tiles")
        tiles = torch.zeros(rb * cb, bh, bw, dtype=self.dtype)
        crow = self.crow_indices.to(torch.int64)
        trow = torch.repeat_interleave(torch.arange(rb), crow[1:] - crow[:-1])
        tiles[trow * cb + self.col_indices.to(torch.int64)] = self.values
        full = tiles.reshape(rb, cb, bh, bw).permute(0, 2, 1, 3).reshape(rb * bh, cb * bw)
        return full[: self.rows, : self.cols].reshape(self.shape).clone()

    def parts(self) -> dict[str, torch.Tensor]:
        return {"crow_indices": self.crow_indices, "col_indices": self.col_indices, "values": self.values}

    def sparsity_achieved(self) -> float:
        return self.manifest()["sparsity_achieved"]

    def manifest(self) -> dict:
        return bsr_entry(self.shape, code_of(self.dtype), self.block_shape, self.values.shape[0], self.sparsity_target)

    @staticmethod
    def part_specs(entry: dict, name: str) -> dict[str, PartSpec]:
        shape = spec.req_shape(entry, "shape", name)
        torch_dtype(spec.req_choice(entry, "dtype", name, {"F16", "BF16", "F32", "F64"}), name)
        spec.req_choice(entry, "layout", name, {spec.Layout.BSR.value})
        spec.req_choice(entry, "index_dtype", name, {"I32"})
        rows = spec.req_int(entry, "rows", name, 1)
        cols = spec.req_int(entry, "cols", name, 1)
        bs = spec.req_shape(entry, "block_shape", name)
        nnzb = spec.req_int(entry, "nnz_blocks", name, 0)
        spec.req_float(entry, "sparsity_target", name)
        spec.req_float(entry, "sparsity_achieved", name)
        if len(bs) != 2 or min(bs) < 1:
            raise FormatError(f"manifest entry {name!r}: block_shape must be [bh, bw] with bh, bw >= 1")
        rb, cb = tile_grid(rows, cols, bs)
        if len(shape) < 2 or shape[0] != rows or math.prod(shape[1:]) != cols or nnzb > rb * cb:
            raise FormatError(f"manifest entry {name!r}: shape, rows, cols and nnz_blocks disagree")
        return {
            "crow_indices": PartSpec("I32", (rb + 1,)),
            "col_indices": PartSpec("I32", (nnzb,)),
            "values": PartSpec(entry["dtype"], (nnzb, bs[0], bs[1])),
        }

    @classmethod
    def from_parts(cls, entry: dict, parts: dict[str, torch.Tensor], name: str) -> BsrTensor:
        for part, ps in cls.part_specs(entry, name).items():
            check_part(name, part, parts[part], ps)
        return cls(tuple(entry["shape"]), torch_dtype(entry["dtype"], name), tuple(entry["block_shape"]),
                   parts["crow_indices"], parts["col_indices"], parts["values"], float(entry["sparsity_target"]))

    def check(self, name: str) -> None:
        """Every invariant of FORMAT.md and of the GPU kernel (``check_bsr_arrays``); FormatError
        naming the first violation."""
        check_bsr_arrays(self.crow_indices, self.col_indices, self.values, self.rows, self.cols, self.block_shape,
                         where=f"tensor {name!r}")


def block_shape_of(block_shape, where: str) -> tuple[int, int]:
    """``block_shape`` as two positive ints (bh, bw); FormatError otherwise."""
    try:
        bh, bw = block_shape
    except (TypeError, ValueError):
        raise FormatError(f"{where}: block_shape must be [bh, bw], got {block_shape!r}") from None
    for v in (bh, bw):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or int(v) < 1:
            raise FormatError(f"{where}: block_shape must be two positive ints, got {block_shape!r}")
    return int(bh), int(bw)


def check_bsr_arrays(crow_indices: torch.Tensor, col_indices: torch.Tensor, values: torch.Tensor, rows: int,
                     cols: int, block_shape, *, where: str) -> None:
    """THE validator of a BSR matrix's arrays (FORMAT.md, pattern ``block``); FormatError starting
    with ``where`` at the first violation. The runtime's ``validate_bsr`` calls it.

    ``crow_indices`` int32 [ceil(rows/bh) + 1], ``col_indices`` int32 [nnz_blocks], ``values``
    [nnz_blocks, bh, bw] F32/F16/BF16/F64: CPU torch tensors, C-contiguous. Content: crow_indices
    starts at 0, never decreases and ends at nnz_blocks; tile columns lie in [0, ceil(cols/bw)) and
    strictly increase within a tile row; the parts of edge tiles outside the matrix hold 0; values
    finite.
    """
    rows = positive_int(rows, f"{where}: rows")
    cols = positive_int(cols, f"{where}: cols")
    bh, bw = block_shape_of(block_shape, where)
    rb, cb = tile_grid(rows, cols, (bh, bw))
    crow, col, v = crow_indices, col_indices, values
    tile_row_of = check_compressed(crow, col, v, n_rows=rb, n_cols=cb, value_shape=(bh, bw), where=where,
                                   row="tile row", column="tile column", total="nnz_blocks",
                                   rows_expr="ceil(rows / bh)")
    if int(col.shape[0]):
        if rows % bh:
            a, b = int(crow[rb - 1]), int(crow[rb])
            bad = (v[a:b, rows % bh:, :] != 0).flatten(1).any(1)
            if bool(bad.any()):
                p = a + int(torch.nonzero(bad)[0])
                raise FormatError(f"{where}: non-zero value below the last row (rows = {rows}) in the tile at tile "
                                  f"row {rb - 1}, tile column {int(col[p])}")
        if cols % bw:
            pos = torch.nonzero(col == cb - 1).flatten()
            bad = (v[pos][:, :, cols % bw:] != 0).flatten(1).any(1)
            if bool(bad.any()):
                p = int(pos[int(torch.nonzero(bad)[0])])
                raise FormatError(f"{where}: non-zero value right of the last column (cols = {cols}) in the tile at "
                                  f"tile row {tile_row_of(p)}, tile column {cb - 1}")
    check_finite_values(where, v)


def check_compressed(crow: torch.Tensor, col: torch.Tensor, values: torch.Tensor, *, n_rows: int, n_cols: int,
                     value_shape: tuple[int, ...], where: str, row: str, column: str, total: str,
                     rows_expr: str = "rows"):
    """The checks CSR and BSR share (compressed rows of entries or tiles); FormatError at the first
    violation, worded with ``row`` / ``column`` / ``total`` ("row", "column", "nnz" for CSR; "tile row",
    "tile column", "nnz_blocks" for BSR). Returns ``row_of(position)``, the row holding an entry.

    ``crow`` int32 [n_rows + 1], ``col`` int32 [n], ``values`` [n, *value_shape] F32/F16/BF16/F64, all
    C-contiguous CPU tensors; crow starts at 0, never decreases and ends at n; columns lie in
    [0, n_cols) (a negative one would wrap in torch's indexing) and strictly increase within a row.
    """
    if values.dtype not in VALUE_DTYPES:
        raise FormatError(f"{where}: values dtype {values.dtype} is not float32, float16, bfloat16 or float64")
    for what, t in (("crow_indices", crow), ("col_indices", col)):
        if t.dtype != torch.int32:
            raise FormatError(f"{where}: {what} dtype {t.dtype} must be torch.int32")
    if tuple(crow.shape) != (n_rows + 1,):
        raise FormatError(f"{where}: crow_indices shape {list(crow.shape)} is not [{rows_expr} + 1] = [{n_rows + 1}]")
    if col.dim() != 1:
        raise FormatError(f"{where}: col_indices must be 1-D [{total}], got shape {list(col.shape)}")
    n = int(col.shape[0])
    if tuple(values.shape) != (n, *value_shape):
        dims = ", ".join([total] + ["bh", "bw"][:len(value_shape)])
        raise FormatError(f"{where}: values shape {list(values.shape)} is not [{dims}] = {[n, *value_shape]}")
    for what, t in (("crow_indices", crow), ("col_indices", col), ("values", values)):
        if not t.is_contiguous():
            raise FormatError(f"{where}: {what} is not C-contiguous")
    check_row_pointers(crow, n, where=where, unit=row, total=total)

    def row_of(p: int) -> int:
        return int(torch.searchsorted(crow, torch.tensor([p], dtype=torch.int32), right=True)[0]) - 1

    if n:
        bad = out_of_range_int32(col, n_cols)
        if bool(bad.any()):
            p = int(torch.nonzero(bad)[0])
            raise FormatError(f"{where}: {column} {'index ' if column == 'column' else ''}{int(col[p])} out of range "
                              f"[0, {n_cols}) at {row} {row_of(p)} (position {p} of col_indices)")
        p = first_unsorted(crow, col)
        if p is not None:
            raise FormatError(f"{where}: {column}{'s' if column != 'column' else ' indices'} of {row} {row_of(p)} are "
                              f"unsorted or duplicated (position {p}: {int(col[p])} after {int(col[p - 1])})")
    return row_of


def check_row_pointers(crow: torch.Tensor, nnz: int, *, where: str, unit: str, total: str) -> None:
    """CSR/BSR row pointers: crow[0] == 0, crow[-1] == nnz, never decreasing (so all in [0, nnz])."""
    if int(crow[0]) != 0:
        raise FormatError(f"{where}: crow_indices[0] is {int(crow[0])}, must be 0")
    if int(crow[-1]) != nnz:
        raise FormatError(f"{where}: crow_indices[-1] is {int(crow[-1])}, must be {total} = {nnz}")
    bad = crow[1:] < crow[:-1]
    if bool(bad.any()):
        k = int(torch.nonzero(bad)[0])
        raise FormatError(f"{where}: crow_indices decrease at {unit} {k} ({int(crow[k])} -> {int(crow[k + 1])})")


def out_of_range_int32(col: torch.Tensor, limit: int) -> torch.Tensor:
    """The mask of int32 ``col`` entries outside [0, limit). ``limit`` may exceed int32 (a manifest
    can claim any width): torch would wrap such a scalar in the comparison, so it is not compared."""
    bad = col < 0
    if limit <= 2**31 - 1:
        bad |= col >= limit
    return bad


def first_unsorted(crow: torch.Tensor, col: torch.Tensor) -> int | None:
    """The first position p of ``col`` whose index is <= the one before it in the same row, or None.

    ``crow`` must already satisfy check_row_pointers (so every row start lies in [0, len(col)]).
    """
    n = int(col.shape[0])
    if n < 2:
        return None
    starts = torch.zeros(n + 1, dtype=torch.bool)  # positions where a row begins
    starts[crow[:-1].to(torch.int64)] = True
    bad = (col[1:] <= col[:-1]) & ~starts[1:n]
    if bool(bad.any()):
        return int(torch.nonzero(bad)[0]) + 1
    return None


def bsr_entry(shape: tuple[int, ...], dtype: str, block_shape: tuple[int, int], nnz_blocks: int, target: float) -> dict:
    """The manifest entry of a BSR tensor, known before packing."""
    rows, cols = shape[0], math.prod(shape[1:])
    rb, cb = tile_grid(rows, cols, block_shape)
    return {
        "pattern": "block", "shape": list(shape), "dtype": dtype,
        "layout": spec.Layout.BSR.value, "rows": rows, "cols": cols,
        "block_shape": list(block_shape), "nnz_blocks": nnz_blocks, "index_dtype": "I32",
        "sparsity_target": target, "sparsity_achieved": 1.0 - nnz_blocks / (rb * cb),
    }
