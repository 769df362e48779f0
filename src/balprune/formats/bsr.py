"""The block packed tensor: BSR over the [rows, cols] matrix view, zero-padded to whole tiles.

``crow_indices`` int32 [ceil(R/bh)+1], ``col_indices`` int32 [nnzb] (tile columns, strictly
increasing within a tile row), ``values`` [nnzb, bh, bw] in the source dtype. Edge tiles extend
past the matrix; their outside part is stored as zeros and cropped by to_dense.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..errors import FormatError
from ..patterns.block import padded_tiles, tile_grid
from ..patterns.ranking import top_positions
from . import spec
from .base import PartSpec, as_matrix, check_finite_values, check_part, code_of, torch_dtype


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

    def to_dense(self) -> torch.Tensor:
        bh, bw = self.block_shape
        rb, cb = tile_grid(self.rows, self.cols, self.block_shape)
        tiles = torch.zeros(rb * cb, bh, bw, dtype=self.dtype)
        crow = self.crow_indices.to(torch.int64)
        trow = torch.repeat_interleave(torch.arange(rb), crow[1:] - crow[:-1])
        tiles[trow * cb + self.col_indices.to(torch.int64)] = self.values
        full = tiles.reshape(rb, cb, bh, bw).permute(0, 2, 1, 3).reshape(rb * bh, cb * bw)
        return full[: self.rows, : self.cols].reshape(self.shape).clone()

    def parts(self) -> dict[str, torch.Tensor]:
        return {"crow_indices": self.crow_indices, "col_indices": self.col_indices, "values": self.values}

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
        rb, cb = tile_grid(rows, cols, (bs[0], bs[1]))
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
        rb, cb = tile_grid(self.rows, self.cols, self.block_shape)
        crow = self.crow_indices.to(torch.int64)
        col = self.col_indices.to(torch.int64)
        nnzb = col.numel()
        if int(crow[0]) != 0 or int(crow[-1]) != nnzb or bool((crow[1:] < crow[:-1]).any()):
            raise FormatError(f"tensor {name!r}: crow_indices must rise from 0 to nnz_blocks={nnzb}")
        if nnzb:
            if int(col.min()) < 0 or int(col.max()) >= cb:
                raise FormatError(f"tensor {name!r}: tile column index out of range [0, {cb})")
            trow = torch.repeat_interleave(torch.arange(rb), crow[1:] - crow[:-1])
            if bool(((trow[1:] == trow[:-1]) & (col[1:] <= col[:-1])).any()):
                raise FormatError(f"tensor {name!r}: tile columns unsorted or duplicated within a tile row")
        check_finite_values(name, self.values)


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
