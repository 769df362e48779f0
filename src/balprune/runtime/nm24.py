"""2:4 layers on the sparse tensor cores: kernels/nm24_sparse_mma.cu (mma.sp m16n8k32).

``Nm24Linear`` holds one balanced matrix of block length 4 keeping 2 (``--nm 2:4``, or balanced
blocks of 4 at 50%) in fp16 or bf16, in the layout formats.layouts.nm24_records builds (A fragments
and metadata words as the MMA takes them: 1.125 bytes per dense weight, the bitmask encoding's
bytes), and computes y = act(W x + bias) with fp32 accumulation. The tensor core decodes the
2-bit positions itself, so the kernel spends about one instruction per kept value where the
CUDA-core kernels spend ten or more finding each value's column (kernels/NOTES.md v16). fp32
layers and other geometries have no sparse-MMA form: ``supports`` says which do.
"""

from __future__ import annotations

import numpy as np

from ..errors import UsageError
from ..formats.layouts import NM24_TILE_ROWS, is_nm24, nm24_records
from ._linear import VALUE_DTYPES as _VALUE_DTYPES
from .balanced import BalancedOperator, _host_numpy, checked_arrays

#: Value dtypes the sparse MMA takes.
DTYPES = ("float16", "bfloat16")
#: Batch columns of one pass: 8 (one MMA per tile, batch 1..8) or 16 (two MMAs per tile).
BATCH_TILES = (8, 16)
#: Warps per CTA (split K): at most 16 (the kernel's __launch_bounds__(512)).
MAX_WARPS = 16
#: Warps wanted on the whole GPU (~32 per SM on 132 SMs) when choosing the split.
_TARGET_WARPS = 4224


def supports(dtype: str, block_length: int, keep: int) -> bool:
    """Whether a balanced matrix of this dtype and geometry runs on the sparse tensor cores."""
    return dtype in DTYPES and is_nm24(block_length, keep)


def kernel_name(dtype: str, batch_tile: int) -> str:
    """The CuPy name expression of bp::nm24_spmm<T, NT> (NT = batch_tile / 8 MMAs per tile)."""
    t = {"float16": "bp::f16", "bfloat16": "bp::bf16"}[dtype]
    return f"bp::nm24_spmm<{t}, {batch_tile // 8}>"


def kernel_variants() -> list[str]:
    """Every instantiation the runtime can launch (the compile test builds them all)."""
    return [kernel_name(d, nb) for d in DTYPES for nb in BATCH_TILES]


class Nm24Linear(BalancedOperator):
    """y = W x for one 2:4 W [rows, cols] (fp16/bf16) on a GPU, through the sparse tensor cores.

    Built from offsets-form arrays (``values``/``indices`` [rows, 2, blocks], validated on the host
    first unless ``validate=False``) or with ``from_tensor(BalancedTensor)`` of either stored
    encoding. UsageError for a geometry or dtype the sparse MMA does not take (``supports``). The
    call contract is SparseLinear's.
    """

    def __init__(self, values, indices, *, cols: int, block_length: int, device: int = 0, validate: bool = True,
                 name: str = "tensor", defines: tuple[str, ...] = ()) -> None:
        from . import _gpu

        v, i, rows, keep, blocks = checked_arrays(values, indices, cols, block_length, name=name, validate=validate)
        dtype = _VALUE_DTYPES[v.dtype]
        if not supports(dtype, block_length, keep):
            raise UsageError(f"{name}: the sparse tensor cores take 2:4 (block length 4, keep 2) in float16 or "
                             f"bfloat16, not block length {block_length}, keep {keep}, {dtype}")
        cp = _gpu.cupy()
        self.device = _gpu.require_device(device)
        self.info = _gpu.device_info(self.device)
        self.name = name
        self.rows, self.cols, self.blocks, self.block_length, self.keep = rows, int(cols), blocks, 4, 2
        self.dtype = dtype
        self.defines = tuple(defines)
        records = nm24_records(_host_numpy(v), i.numpy())
        self.row_tiles, self.pairs = int(records.shape[0]), int(records.shape[1])
        with cp.cuda.Device(self.device):
            self.records_dev = cp.asarray(records)
        self._kernels: dict[tuple, object] = {}
        self._configs: dict[int, dict] = {}

    @property
    def weight_bytes(self) -> int:
        """Bytes of A fragments and metadata the kernel streams per pass (tile padding included)."""
        return int(self.records_dev.nbytes)

    def warps(self) -> int:
        """Warps per CTA (the split of K): enough CTAs x warps to fill the GPU, at most MAX_WARPS
        and at most the k-tile pairs of a row (each warp needs one)."""
        want = -(-_TARGET_WARPS // self.row_tiles)
        return max(1, min(MAX_WARPS, want, self.pairs))

    def _launch_config(self, batch: int) -> dict:
        nb = BATCH_TILES[0] if batch <= BATCH_TILES[0] else BATCH_TILES[1]
        wk = self.warps()
        smem = wk * NM24_TILE_ROWS * nb * 4
        k = self._compiled((nb,), "nm24_sparse_mma.cu", kernel_name(self.dtype, nb), smem)
        return {"kernel": k, "grid": (self.row_tiles, -(-batch // nb)), "block": (32 * wk,), "shared_mem": smem,
                "batch_tile": nb, "warps": wk}

    def _launch_args(self, x, y, batch: int, cfg: dict) -> tuple:
        """The kernel arguments of one launch (kernels/nm24_sparse_mma.cu's parameter order, up to y)."""
        return (self.records_dev, np.int32(self.rows), np.int32(self.pairs), x, np.int32(self.cols), np.int32(batch), y)

    def __repr__(self) -> str:
        return f"Nm24Linear({self.name!r}, [{self.rows}, {self.cols}], 2:4, {self.dtype}, device={self.device})"


def nm24_alternative(packed):
    """bench's sparse-tensor-core path of a balanced layer (patterns.registry.BenchAlternative):
    the tensor itself when it is 2:4 in a 16-bit dtype, else None."""
    g = packed.geometry
    dtype = _VALUE_DTYPES.get(packed.values.dtype)
    return packed if dtype is not None and supports(dtype, g.block_length, g.keep) else None


__all__ = ["BATCH_TILES", "DTYPES", "Nm24Linear", "kernel_name", "kernel_variants", "nm24_alternative", "supports"]
