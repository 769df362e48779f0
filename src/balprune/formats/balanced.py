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
from ..patterns.balanced import BalancedGeometry, balanced_offsets, geometry_for
from . import spec
from .base import PartSpec, as_matrix, check_finite_values, check_part, code_of, torch_dtype


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

    def to_dense(self) -> torch.Tensor:
        g = self.geometry
        out = torch.zeros(g.rows, g.blocks, g.block_length, dtype=self.dtype)
        idx = self.indices.permute(0, 2, 1).to(torch.int64)
        out.scatter_(-1, idx, self.values.permute(0, 2, 1))
        return out.reshape(g.rows, g.padded_width)[:, : g.cols].reshape(self.shape).clone()

    def parts(self) -> dict[str, torch.Tensor]:
        return {"values": self.values, "indices": self.indices}

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
        """Every invariant the GPU kernel relies on; FormatError naming the first violation.

        Indices within [0, L); strictly increasing within each block (sorted, no duplicates);
        padding columns kept only where a block has fewer than k real columns, and holding zero;
        the manifest's achieved sparsity matching the geometry; values finite.
        """
        g = self.geometry
        idx = self.indices.to(torch.int64).permute(0, 2, 1)  # [R, B, k]
        if idx.numel() == 0:
            return
        if int(idx.max()) >= g.block_length:
            raise FormatError(f"tensor {name!r}: in-block index {int(idx.max())} >= block length {g.block_length}")
        if g.keep > 1 and not bool((idx[..., 1:] > idx[..., :-1]).all()):
            bad = torch.nonzero(~(idx[..., 1:] > idx[..., :-1]))[0].tolist()
            raise FormatError(
                f"tensor {name!r}: indices of row {bad[0]} block {bad[1]} are unsorted or duplicated"
            )
        real = torch.tensor([g.real_length(j) for j in range(g.blocks)], dtype=torch.int64)
        on_padding = idx >= real.view(1, -1, 1)
        want = (g.keep - real).clamp(min=0).view(1, -1)
        if not bool((on_padding.sum(-1) == want).all()):
            raise FormatError(f"tensor {name!r}: padding columns kept while real columns were left out")
        vals = self.values.permute(0, 2, 1)
        if bool((vals[on_padding] != 0).any()):
            raise FormatError(f"tensor {name!r}: non-zero value stored on a padding column")
        check_finite_values(name, self.values)


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
