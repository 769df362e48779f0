"""The balanced packed tensor: k values per block and their positions, in either index encoding.

In memory the arrays are always the offsets form (formats.layouts): ``values`` [R, k, B] in the
source dtype and ``indices`` [R, k, B] as uint8 (L <= 256) or uint16 (L <= 65536). Entry (r, t, j)
is the t-th kept entry of block j of row r, its column being j*L + indices[r, t, j]; within a block
the indices strictly increase with t. ``encoding`` says how the file stores them (FORMAT.md):
``offsets`` (layout rows_slots_blocks: these arrays as they are) or ``bitmask`` (layout
rows_blocks_slots: values [R, B, k] in column order and one mask bit per column).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch

from ..errors import FormatError
from ..patterns.balanced import BalancedGeometry, balanced_offsets, geometry_for
from ..patterns.kinds import BalancedPattern
from ..safeio import check_fits_memory
from . import layouts, spec
from .base import (
    CHECK_CHUNK_ENTRIES,
    PartSpec,
    as_matrix,
    check_part,
    code_of,
    torch_dtype,
)
from .layouts import BITMASK, OFFSETS, check_balanced_arrays, check_bitmask_arrays


@dataclass(frozen=True)
class BalancedTensor:
    geometry: BalancedGeometry
    shape: tuple[int, ...]
    dtype: torch.dtype
    values: torch.Tensor  # [R, k, B], dtype
    indices: torch.Tensor  # [R, k, B], uint8/uint16 (offsets form, whatever the encoding)
    sparsity_target: float
    encoding: str = OFFSETS  # how the file stores the positions (layouts.ENCODINGS)

    pattern = "balanced"

    def with_encoding(self, encoding: str) -> BalancedTensor:
        """The same tensor stored with ``encoding`` (the arrays are shared, not copied)."""
        if encoding not in layouts.ENCODINGS:
            raise ValueError(f"index encoding must be one of {layouts.ENCODINGS}, got {encoding!r}")
        return replace(self, encoding=encoding)

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
        """The stored arrays of the encoding, in part order (FORMAT.md)."""
        if self.encoding == BITMASK:
            g = self.geometry
            return {"values": self.values.permute(0, 2, 1).contiguous(),
                    "mask": layouts.mask_from_offsets(self.indices, g.blocks, g.block_length)}
        return {"values": self.values, "indices": self.indices}

    def sparsity_achieved(self) -> float:
        """1 - kept real entries / cols, in O(1) (equal to the geometry's figure, which loops over
        the blocks: a manifest may claim billions of them)."""
        g = self.geometry
        last = g.cols - (g.blocks - 1) * g.block_length  # real columns of the last block
        kept = (g.blocks - 1) * min(g.keep, g.block_length) + min(g.keep, last)
        return 1.0 - kept / g.cols

    def manifest(self) -> dict:
        return balanced_entry(self.shape, code_of(self.dtype), self.geometry, self.sparsity_target, self.encoding)

    @staticmethod
    def part_specs(entry: dict, name: str) -> dict[str, PartSpec]:
        """Validate a manifest entry and derive the parts' dtype and shape from it (an entry read
        from a format-v1 file has had ``index_encoding: offsets`` filled in by read_packed)."""
        shape = spec.req_shape(entry, "shape", name)
        torch_dtype(spec.req_choice(entry, "dtype", name, {"F16", "BF16", "F32", "F64"}), name)
        encoding = spec.req_choice(entry, "index_encoding", name, set(layouts.ENCODINGS))
        spec.req_choice(entry, "layout", name, {spec.BALANCED_LAYOUT[encoding].value})
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
        if length > layouts.MAX_BLOCK_LENGTH or keep > length or blocks != -(-cols // length):
            raise FormatError(
                f"manifest entry {name!r}: blocks={blocks}, block_length={length}, keep={keep} do not fit cols={cols}"
            )
        want_index = _index_code(encoding, length)
        if entry["index_dtype"] != want_index:
            raise FormatError(f"manifest entry {name!r}: index_dtype must be {want_index} for "
                              f"{encoding} indices of block_length {length}")
        if encoding == BITMASK:
            return {"values": PartSpec(entry["dtype"], (rows, blocks, keep)),
                    "mask": PartSpec("U8", (rows, layouts.mask_row_bytes(blocks, length)))}
        return {"values": PartSpec(entry["dtype"], (rows, keep, blocks)), "indices": PartSpec(want_index, (rows, keep, blocks))}

    @classmethod
    def from_parts(cls, entry: dict, parts: dict[str, torch.Tensor], name: str) -> BalancedTensor:
        """The tensor of a manifest entry and its stored parts. Bitmask parts are checked completely
        (check_bitmask_arrays) before they are decoded to the offsets form: the decoding relies on
        exactly k bits per block."""
        specs = cls.part_specs(entry, name)
        for part, ps in specs.items():
            check_part(name, part, parts[part], ps)
        g = BalancedGeometry(entry["rows"], entry["cols"], entry["blocks"], entry["block_length"],
                             entry["keep"], entry["blocks_requested"])
        encoding = entry["index_encoding"]
        values, positions = parts["values"], parts["indices" if encoding == OFFSETS else "mask"]
        if encoding == BITMASK:
            # validating and decoding unpack a chunk of rows (at least one) as bools, and the
            # decoded offsets; a crafted file of few, very wide rows must not outgrow its parts
            row_bits = g.blocks * g.block_length
            rows_at_once = max(1, min(g.rows, CHECK_CHUNK_ENTRIES // max(1, row_bits)))
            check_fits_memory(rows_at_once * row_bits * 2 + rows_at_once * g.blocks * g.keep * 8
                              + g.rows * g.blocks * g.keep * (2 + values.element_size()),
                              f"tensor {name!r}: decoding its bitmask")
            check_bitmask_arrays(values, positions, g.rows, g.cols, g.blocks, g.block_length, g.keep,
                                 where=f"tensor {name!r}")
            values = values.permute(0, 2, 1).contiguous()
            positions = layouts.offsets_from_mask(positions, g.blocks, g.block_length, g.keep)
        return cls(g, tuple(entry["shape"]), torch_dtype(entry["dtype"], name), values, positions,
                   float(entry["sparsity_target"]), encoding)

    def check(self, name: str) -> None:
        """Every invariant of FORMAT.md and of the GPU kernel on the offsets-form arrays
        (``check_balanced_arrays``, whatever the stored encoding); FormatError naming the first violation. Matching ``sparsity_achieved`` is the manifest's side
        (PackedFile.load)."""
        g = self.geometry
        check_balanced_arrays(self.values, self.indices, g.rows, g.cols, g.blocks, g.block_length, g.keep,
                              where=f"tensor {name!r}")


def _index_code(encoding: str, block_length: int) -> str:
    """The manifest's index_dtype: the mask's U8 for bitmask, the offsets' U8/U16 otherwise."""
    return "U8" if encoding == BITMASK else code_of(layouts.offsets_index_dtype(block_length))


def balanced_entry(shape: tuple[int, ...], dtype: str, g: BalancedGeometry, target: float,
                   encoding: str = OFFSETS) -> dict:
    """The manifest entry of a balanced tensor, from its geometry and encoding alone (known before
    packing). Always carries ``index_encoding``; a format-v1 file is written without it
    (spec.entry_for_version)."""
    return {
        "pattern": "balanced", "shape": list(shape), "dtype": dtype,
        "layout": spec.BALANCED_LAYOUT[encoding].value, "index_encoding": encoding, "rows": g.rows,
        "cols": g.cols, "blocks": g.blocks, "blocks_requested": g.blocks_requested,
        "block_length": g.block_length, "keep": g.keep, "index_dtype": _index_code(encoding, g.block_length),
        "sparsity_target": target, "sparsity_achieved": g.achieved_sparsity,
    }


def _padded(m: torch.Tensor, g: BalancedGeometry) -> torch.Tensor:
    """[rows of m, B, L] view of m zero-padded to B*L columns (m may be a chunk of rows)."""
    pad = g.padded_width - g.cols
    if pad:
        m = torch.nn.functional.pad(m, (0, pad))
    return m.reshape(m.shape[0], g.blocks, g.block_length)
