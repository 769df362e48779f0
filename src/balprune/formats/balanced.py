"""The balanced packed tensor: k values and k in-block indices per block, kernel-ready.

Layout ROWS_SLOTS_BLOCKS (FORMAT.md): ``values`` [R, k, B] in the source dtype and ``indices``
[R, k, B] as uint8 (L <= 256) or uint16 (L <= 65536). Entry (r, t, j) is the t-th kept entry of
block j of row r, its column being j*L + indices[r, t, j]. Within a block the indices strictly
increase with t. For a fixed (r, t) the B entries are contiguous, so a warp whose lane j owns
block j reads one coalesced run per slot, and lane j only ever touches x[j*L : (j+1)*L].
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..config import BalancedPattern
from ..errors import FormatError
from ..patterns.balanced import MAX_BLOCK_LENGTH, BalancedGeometry, balanced_offsets, geometry_for
from ..safeio import check_fits_memory
from . import spec
from .base import (
    CHECK_CHUNK_ENTRIES,
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
class BalancedTensor:
    geometry: BalancedGeometry
    shape: tuple[int, ...]
    dtype: torch.dtype
    values: torch.Tensor  # [R, k, B], dtype
    indices: torch.Tensor  # [R, k, B], uint8/uint16
    sparsity_target: float

    pattern = "balanced"

    @classmethod
    def from_dense(cls, dense: torch.Tensor, pattern: BalancedPattern) -> BalancedTensor:
        """Pack a dense-with-zeros tensor whose every block holds at most k non-zeros.

        The kept positions are the block's non-zeros, filled up to k with its zeros by the
        ranking rule (lower offset first, real columns before padding), so to_dense(from_dense(d))
        == d bit for bit. Raises ValueError if a block holds more than k non-zeros.
        """
        m = as_matrix(dense)
        g = geometry_for(m.shape[0], m.shape[1], pattern)
        offsets = balanced_offsets(m, g)  # [R, B, k]
        blocks = _padded(m, g)
        vals = torch.gather(blocks, -1, offsets)
        nonzero_blocks = (blocks != 0).sum(-1)
        if bool((nonzero_blocks > g.keep).any()):
            raise ValueError(f"a block holds more than k={g.keep} non-zeros: the tensor is not balanced")
        return cls(
            g, tuple(dense.shape), dense.dtype,
            vals.permute(0, 2, 1).contiguous(),
            offsets.permute(0, 2, 1).to(g.index_dtype).contiguous(),
            pattern.sparsity,
        )

    @classmethod
    def from_offsets(cls, weight: torch.Tensor, pattern: BalancedPattern, offsets: torch.Tensor) -> BalancedTensor:
        """Pack ``weight`` keeping the in-block ``offsets`` [R, B, k] (ascending) chosen for it.

        The one-shot fast path: ``offsets = balanced_offsets(matrix, g)`` followed by this gives
        the same object as ``from_dense(where(mask, weight, 0))`` (if a kept entry is zero, every
        dropped entry of its block is zero too, so the fill-up rule picks the same zeros), without
        the mask, the dense copy or a second ranking. Gathers chunk by chunk.
        """
        m = as_matrix(weight)
        g = geometry_for(m.shape[0], m.shape[1], pattern)
        if tuple(offsets.shape) != (g.rows, g.blocks, g.keep):
            raise ValueError(f"offsets shape {tuple(offsets.shape)} != {(g.rows, g.blocks, g.keep)}")
        vals = torch.empty(g.rows, g.keep, g.blocks, dtype=m.dtype)
        step = max(1, (8 << 20) // (g.padded_width * 8))
        for r0 in range(0, g.rows, step):
            r1 = min(g.rows, r0 + step)
            blocks = _padded(m[r0:r1], g)
            vals[r0:r1] = torch.gather(blocks, -1, offsets[r0:r1].to(torch.int64)).permute(0, 2, 1)
        return cls(g, tuple(weight.shape), weight.dtype, vals,
                   offsets.permute(0, 2, 1).to(g.index_dtype).contiguous(), pattern.sparsity)

    def to_dense(self, name: str = "tensor") -> torch.Tensor:
        """The dense-with-zeros tensor; InvalidInputError (exit 4) first when it cannot fit in memory."""
        g = self.geometry
        item = self.values.element_size()
        # the padded [R, B, L] scatter target, the cropped copy, and the int64 index view
        check_fits_memory(g.rows * g.padded_width * item + g.rows * g.cols * item + self.indices.numel() * 8,
                          f"tensor {name!r}: the dense form of {list(self.shape)} {self.dtype}")
        out = torch.zeros(g.rows, g.blocks, g.block_length, dtype=self.dtype)
        idx = self.indices.permute(0, 2, 1).to(torch.int64)
        out.scatter_(-1, idx, self.values.permute(0, 2, 1))
        return out.reshape(g.rows, g.padded_width)[:, : g.cols].reshape(self.shape).clone()

    def parts(self) -> dict[str, torch.Tensor]:
        return {"values": self.values, "indices": self.indices}

    def sparsity_achieved(self) -> float:
        """1 - kept real entries / cols, in O(1) (equal to the geometry's figure, which loops over
        the blocks: a manifest may claim billions of them)."""
        g = self.geometry
        last = g.cols - (g.blocks - 1) * g.block_length  # real columns of the last block
        kept = (g.blocks - 1) * min(g.keep, g.block_length) + min(g.keep, last)
        return 1.0 - kept / g.cols

    def manifest(self) -> dict:
        return balanced_entry(self.shape, code_of(self.dtype), self.geometry, self.sparsity_target)

    @staticmethod
    def part_specs(entry: dict, name: str) -> dict[str, PartSpec]:
        """Validate a manifest entry and derive the parts' dtype and shape from it."""
        shape = spec.req_shape(entry, "shape", name)
        torch_dtype(spec.req_choice(entry, "dtype", name, {"F16", "BF16", "F32", "F64"}), name)
        spec.req_choice(entry, "layout", name, {spec.Layout.ROWS_SLOTS_BLOCKS.value})
        rows = spec.req_int(entry, "rows", name, 1)
        cols = spec.req_int(entry, "cols", name, 1)
        blocks = spec.req_int(entry, "blocks", name, 1)
        length = spec.req_int(entry, "block_length", name, 1)
        keep = spec.req_int(entry, "keep", name, 1)
        if entry["blocks_requested"] is not None:
            spec.req_int(entry, "blocks_requested", name, 1)
        spec.req_float(entry, "sparsity_target", name)
        spec.req_float(entry, "sparsity_achieved", name)
        if len(shape) < 2 or shape[0] != rows or math.prod(shape[1:]) != cols:
            raise FormatError(f"manifest entry {name!r}: shape {list(shape)} is not rows x cols = {rows} x {cols}")
        if length > 65536 or keep > length or blocks != -(-cols // length):
            raise FormatError(
                f"manifest entry {name!r}: blocks={blocks}, block_length={length}, keep={keep} do not fit cols={cols}"
            )
        want_index = "U8" if length <= 256 else "U16"
        if entry["index_dtype"] != want_index:
            raise FormatError(f"manifest entry {name!r}: index_dtype must be {want_index} for block_length {length}")
        return {"values": PartSpec(entry["dtype"], (rows, keep, blocks)), "indices": PartSpec(want_index, (rows, keep, blocks))}

    @classmethod
    def from_parts(cls, entry: dict, parts: dict[str, torch.Tensor], name: str) -> BalancedTensor:
        specs = cls.part_specs(entry, name)
        for part, ps in specs.items():
            check_part(name, part, parts[part], ps)
        g = BalancedGeometry(entry["rows"], entry["cols"], entry["blocks"], entry["block_length"],
                             entry["keep"], entry["blocks_requested"])
        return cls(g, tuple(entry["shape"]), torch_dtype(entry["dtype"], name),
                   parts["values"], parts["indices"], float(entry["sparsity_target"]))

    def check(self, name: str) -> None:
        """Every invariant of FORMAT.md and of the GPU kernel (``check_balanced_arrays``); FormatError
        naming the first violation. Matching ``sparsity_achieved`` is the manifest's side
        (PackedFile.load)."""
        g = self.geometry
        check_balanced_arrays(self.values, self.indices, g.rows, g.cols, g.blocks, g.block_length, g.keep,
                              where=f"tensor {name!r}")


def check_balanced_arrays(values: torch.Tensor, indices: torch.Tensor, rows: int, cols: int, blocks: int,
                          block_length: int, keep: int, *, where: str) -> None:
    """THE validator of a balanced matrix's arrays (FORMAT.md, pattern ``balanced``); FormatError
    starting with ``where`` at the first violation. The runtime's ``validate_balanced`` calls it.

    ``values`` [rows, keep, blocks] F32/F16/BF16/F64 and ``indices`` [rows, keep, blocks] uint8
    (block_length <= 256) or uint16 (<= 65536), CPU torch tensors, C-contiguous. Geometry: all
    positive, blocks == ceil(cols / block_length), keep <= block_length. Content: every index <
    block_length; strictly increasing with the slot inside each block (sorted, no duplicates);
    padding columns (j*block_length + index >= cols, only in the last block) kept exactly where the
    block has fewer than keep real columns, and holding 0; values finite. Walks the rows in chunks,
    so its temporaries stay bounded whatever the size.
    """
    rows = positive_int(rows, f"{where}: rows")
    cols = positive_int(cols, f"{where}: cols")
    blocks = positive_int(blocks, f"{where}: blocks")
    L = positive_int(block_length, f"{where}: block_length")
    keep = positive_int(keep, f"{where}: keep")
    if L > MAX_BLOCK_LENGTH:
        raise FormatError(f"{where}: block_length {L} exceeds {MAX_BLOCK_LENGTH}, the most a uint16 index addresses")
    if keep > L:
        raise FormatError(f"{where}: keep {keep} exceeds block_length {L}")
    if blocks != -(-cols // L):
        raise FormatError(f"{where}: blocks {blocks} is not ceil(cols / block_length) = {-(-cols // L)}")
    v, i = values, indices
    if v.dtype not in VALUE_DTYPES:
        raise FormatError(f"{where}: values dtype {v.dtype} is not float32, float16, bfloat16 or float64")
    want_index = torch.uint8 if L <= 256 else torch.uint16
    if i.dtype != want_index:
        raise FormatError(f"{where}: indices dtype {i.dtype} must be {want_index} for block_length {L}")
    shape = (rows, keep, blocks)
    for what, t in (("values", v), ("indices", i)):
        if tuple(t.shape) != shape:
            raise FormatError(f"{where}: {what} shape {list(t.shape)} is not [rows, keep, blocks] = {list(shape)}")
        if not t.is_contiguous():
            raise FormatError(f"{where}: {what} is not C-contiguous")
    pad_from = cols - (blocks - 1) * L  # in-block offsets >= this are padding (last block only)
    pad_want = max(0, keep - pad_from)  # padding slots the last block must keep (fill-up rule)
    step = max(1, CHECK_CHUNK_ENTRIES // (keep * blocks))
    for r0 in range(0, rows, step):
        r1 = min(rows, r0 + step)
        idx = i[r0:r1].to(torch.int64)  # [n, keep, blocks]
        bad = idx >= L
        if bool(bad.any()):
            r, t, j = torch.nonzero(bad)[0].tolist()
            raise FormatError(f"{where}: index {int(idx[r, t, j])} >= block_length {L} at row {r0 + r}, "
                              f"block {j}, slot {t}")
        if keep > 1:
            bad = idx[:, 1:, :] <= idx[:, :-1, :]
            if bool(bad.any()):
                r, t, j = torch.nonzero(bad)[0].tolist()
                raise FormatError(f"{where}: indices of row {r0 + r}, block {j} are unsorted or duplicated "
                                  f"(slot {t + 1}: {int(idx[r, t + 1, j])} after {int(idx[r, t, j])})")
        if pad_from < L:
            last = idx[:, :, blocks - 1]
            on_pad = last >= pad_from
            bad = on_pad.sum(1) != pad_want
            if bool(bad.any()):
                r = int(torch.nonzero(bad)[0])
                raise FormatError(f"{where}: row {r0 + r}, block {blocks - 1} keeps {int(on_pad[r].sum())} padding "
                                  f"column(s), the fill-up rule gives {pad_want} (padding kept while real columns "
                                  f"were left out)")
            bad = on_pad & (v[r0:r1, :, blocks - 1] != 0)
            if bool(bad.any()):
                r, t = torch.nonzero(bad)[0].tolist()
                raise FormatError(f"{where}: non-zero value on padding column {(blocks - 1) * L + int(last[r, t])} "
                                  f"(cols = {cols}) at row {r0 + r}, block {blocks - 1}, slot {t}")
        check_finite_values(where, v[r0:r1])


def balanced_entry(shape: tuple[int, ...], dtype: str, g: BalancedGeometry, target: float) -> dict:
    """The manifest entry of a balanced tensor, from its geometry alone (known before packing)."""
    return {
        "pattern": "balanced", "shape": list(shape), "dtype": dtype,
        "layout": spec.Layout.ROWS_SLOTS_BLOCKS.value, "rows": g.rows, "cols": g.cols,
        "blocks": g.blocks, "blocks_requested": g.blocks_requested, "block_length": g.block_length,
        "keep": g.keep, "index_dtype": code_of(g.index_dtype),
        "sparsity_target": target, "sparsity_achieved": g.achieved_sparsity,
    }


def _padded(m: torch.Tensor, g: BalancedGeometry) -> torch.Tensor:
    """[rows of m, B, L] view of m zero-padded to B*L columns (m may be a chunk of rows)."""
    pad = g.padded_width - g.cols
    if pad:
        m = torch.nn.functional.pad(m, (0, pad))
    return m.reshape(m.shape[0], g.blocks, g.block_length)
