"""The unstructured packed tensor: CSR over the [rows, cols] matrix view, int32 indices.

``crow_indices`` int32 [R+1], ``col_indices`` int32 [nnz] (strictly increasing within a row),
``values`` [nnz] in the source dtype. nnz is the keep count of the pruning run, so a kept weight
that happens to be zero is stored explicitly and the size is known before any data is read.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..errors import FormatError
from ..patterns.unstructured import mask_keep_n
from ..safeio import check_fits_memory
from . import spec
from .base import (
    PartSpec,
    as_matrix,
    check_finite_values,
    check_part,
    code_of,
    positive_int,
    torch_dtype,
)
from .bsr import check_compressed

INT32_MAX = 2**31 - 1


@dataclass(frozen=True)
class CsrTensor:
    shape: tuple[int, ...]
    dtype: torch.dtype
    crow_indices: torch.Tensor
    col_indices: torch.Tensor
    values: torch.Tensor
    sparsity_target: float

    pattern = "unstructured"

    @property
    def rows(self) -> int:
        return self.shape[0]

    @property
    def cols(self) -> int:
        return math.prod(self.shape[1:])

    @classmethod
    def from_dense(cls, dense: torch.Tensor, nnz: int, sparsity_target: float) -> CsrTensor:
        """Pack a dense-with-zeros tensor with at most ``nnz`` non-zeros into exactly nnz entries.

        The stored set is the non-zeros filled up with zeros by the ranking rule (lower flat
        position first). Raises ValueError if there are more than nnz non-zeros.
        """
        m = as_matrix(dense)
        if int((m != 0).sum()) > nnz:
            raise ValueError(f"more than nnz={nnz} non-zeros")
        if m.shape[1] > INT32_MAX or nnz > INT32_MAX:
            raise ValueError("tensor too large for int32 CSR indices")
        mask = mask_keep_n(m, nnz)
        rows_idx, cols_idx = torch.nonzero(mask, as_tuple=True)
        counts = torch.bincount(rows_idx, minlength=m.shape[0])
        crow = torch.zeros(m.shape[0] + 1, dtype=torch.int64)
        crow[1:] = counts.cumsum(0)
        return cls(tuple(dense.shape), dense.dtype, crow.to(torch.int32), cols_idx.to(torch.int32),
                   m[rows_idx, cols_idx].contiguous(), sparsity_target)

    def to_dense(self, name: str = "tensor") -> torch.Tensor:
        """The dense-with-zeros tensor; InvalidInputError (exit 4) first when it cannot fit in memory."""
        rows = self.shape[0]
        check_fits_memory(rows * self.cols * self.values.element_size() + 2 * self.values.numel() * 8,
                          f"tensor {name!r}: the dense form of {list(self.shape)} {self.dtype}")
        out = torch.zeros(rows, self.cols, dtype=self.dtype)
        row_of = torch.repeat_interleave(torch.arange(rows), (self.crow_indices[1:] - self.crow_indices[:-1]).to(torch.int64))
        out[row_of, self.col_indices.to(torch.int64)] = self.values
        return out.reshape(self.shape)

    def parts(self) -> dict[str, torch.Tensor]:
        return {"crow_indices": self.crow_indices, "col_indices": self.col_indices, "values": self.values}

    def sparsity_achieved(self) -> float:
        return self.manifest()["sparsity_achieved"]

    def manifest(self) -> dict:
        return csr_entry(self.shape, code_of(self.dtype), self.values.numel(), self.sparsity_target)

    @staticmethod
    def part_specs(entry: dict, name: str) -> dict[str, PartSpec]:
        shape = spec.req_shape(entry, "shape", name)
        torch_dtype(spec.req_choice(entry, "dtype", name, {"F16", "BF16", "F32", "F64"}), name)
        spec.req_choice(entry, "layout", name, {spec.Layout.CSR.value})
        spec.req_choice(entry, "index_dtype", name, {"I32"})
        rows = spec.req_int(entry, "rows", name, 1)
        cols = spec.req_int(entry, "cols", name, 1)
        nnz = spec.req_int(entry, "nnz", name, 0)
        spec.req_float(entry, "sparsity_target", name)
        spec.req_float(entry, "sparsity_achieved", name)
        if len(shape) < 2 or shape[0] != rows or math.prod(shape[1:]) != cols or nnz > rows * cols:
            raise FormatError(f"manifest entry {name!r}: shape {list(shape)}, rows {rows}, cols {cols}, nnz {nnz} disagree")
        return {
            "crow_indices": PartSpec("I32", (rows + 1,)),
            "col_indices": PartSpec("I32", (nnz,)),
            "values": PartSpec(entry["dtype"], (nnz,)),
        }

    @classmethod
    def from_parts(cls, entry: dict, parts: dict[str, torch.Tensor], name: str) -> CsrTensor:
        for part, ps in cls.part_specs(entry, name).items():
            check_part(name, part, parts[part], ps)
        return cls(tuple(entry["shape"]), torch_dtype(entry["dtype"], name), parts["crow_indices"],
                   parts["col_indices"], parts["values"], float(entry["sparsity_target"]))

    def check(self, name: str) -> None:
        """Every invariant of FORMAT.md (``check_csr_arrays``); FormatError naming the first violation."""
        check_csr_arrays(self.crow_indices, self.col_indices, self.values, self.rows, self.cols,
                         where=f"tensor {name!r}")


def check_csr_arrays(crow_indices: torch.Tensor, col_indices: torch.Tensor, values: torch.Tensor, rows: int,
                     cols: int, *, where: str) -> None:
    """THE validator of a CSR matrix's arrays (FORMAT.md, pattern ``unstructured``); FormatError
    starting with ``where`` at the first violation.

    ``crow_indices`` int32 [rows + 1], ``col_indices`` int32 [nnz], ``values`` [nnz] F32/F16/BF16/F64:
    CPU torch tensors, C-contiguous. Content: crow_indices starts at 0, never decreases and ends at
    nnz; column indices lie in [0, cols) (a negative one would wrap in torch's indexing) and strictly
    increase within a row (sorted, no duplicates); values finite.
    """
    rows = positive_int(rows, f"{where}: rows")
    cols = positive_int(cols, f"{where}: cols")
    crow, col, v = crow_indices, col_indices, values
    check_compressed(crow, col, v, n_rows=rows, n_cols=cols, value_shape=(), where=where, row="row", column="column",
                     total="nnz")
    check_finite_values(where, v)


def csr_entry(shape: tuple[int, ...], dtype: str, nnz: int, target: float) -> dict:
    """The manifest entry of a CSR tensor, known before packing."""
    rows, cols = shape[0], math.prod(shape[1:])
    return {
        "pattern": "unstructured", "shape": list(shape), "dtype": dtype,
        "layout": spec.Layout.CSR.value, "rows": rows, "cols": cols, "nnz": nnz,
        "index_dtype": "I32", "sparsity_target": target, "sparsity_achieved": 1.0 - nnz / (rows * cols),
    }
