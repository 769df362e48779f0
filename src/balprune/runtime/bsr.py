"""Block-sparse (BSR) layers on the GPU: host-side validation, launch geometry, and the operator.

``validate_bsr`` runs on the CPU (numpy / torch only, no CuPy) and checks everything the kernel
relies on before a byte reaches the device. ``bsr_geometry`` and ``choose_team_lanes`` are the
launch plan as pure functions (testable without a GPU). ``BsrLinear`` uploads the packed file's
BSR arrays as they are (no repacking: the kernel loads chunks of the largest power-of-two size
<= 16 bytes that divides a tile row, so every load is naturally aligned in the file's layout) and
computes y = W x with kernels/bsr_spmv.cu.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import FormatError, UsageError
from ..formats.base import positive_int
from ..formats.bsr import block_shape_of, check_bsr_arrays
from ._linear import STORAGE as _STORAGE
from ._linear import VALUE_DTYPES as _VALUE_DTYPES
from ._linear import SparseLinear
from .balanced import INT_LIMIT, _as_torch, _host_numpy, _next_pow2

#: Batch columns per pass the kernel is built for.
BATCH_TILES = (1, 2, 4, 8)
#: At most this many lanes (8 warps) share one unit by default: wider teams mean more CTA-wide
#: reductions for little more memory parallelism.
MAX_AUTO_TEAM_LANES = 256


def _elem_bytes(dtype: str) -> int:
    return 4 if dtype == "float32" else 2


def load_bytes(dtype: str, bw: int) -> int:
    """Bytes one lane loads per chunk: the largest power of two <= 16 dividing bw * sizeof(value).

    A chunk then never crosses a row of a tile, and since tiles and their rows start at multiples
    of bw values, every chunk of the file's [nnz_blocks, bh, bw] array is naturally aligned.
    """
    es = _elem_bytes(dtype)
    lb = es
    while lb < 16 and (bw * es) % (2 * lb) == 0:
        lb *= 2
    return lb


def unroll(lb: int, batch_tile: int) -> int:
    """Chunks each lane issues before the first use (the kernel's BsrUnroll)."""
    budget = 64 if batch_tile <= 2 else (32 if batch_tile == 4 else 16)
    cap = 8 if batch_tile <= 2 else 4
    return max(2, min(cap, budget // lb))


def kernel_name(dtype: str, lb: int, batch_tile: int) -> str:
    """The CuPy name expression of one instantiation of bp::bsr_spmm."""
    return f"bp::bsr_spmm<{_STORAGE[dtype][1]}, {lb}, {batch_tile}>"


def kernel_variants() -> list[str]:
    """Every instantiation the runtime can launch (the compile test builds them all)."""
    return [kernel_name(d, lb, nb) for d in _STORAGE for lb in (2, 4, 8, 16) if lb >= _elem_bytes(d)
            for nb in BATCH_TILES]


@dataclass(frozen=True)
class BsrGeometry:
    """How the kernel cuts a BSR matrix into work (kernels/README.md, "bp::bsr_spmm").

    A row of a tile is ``nseg`` chunks of ``seg`` values (``load_bytes`` bytes). A unit of work is
    a band of ``band_rows`` rows of one tile row (``bands`` per tile row, the last one possibly
    shorter); ``lanes_per_tile`` = band_rows * min(nseg, 32) <= 32 lanes cover a full band of one
    tile, each owning one (row, chunk); rows wider than 32 chunks are ``groups`` = ceil(nseg / 32)
    virtual tiles of 32 chunks (then band_rows = 1).
    """

    rows: int
    cols: int
    bh: int
    bw: int
    tile_rows: int
    tile_cols: int
    load_bytes: int
    seg: int
    nseg: int
    band_rows: int
    bands: int
    lanes_per_tile: int
    groups: int

    @property
    def units(self) -> int:
        return self.tile_rows * self.bands


def bsr_geometry(rows: int, cols: int, block_shape: tuple[int, int], dtype: str) -> BsrGeometry:
    bh, bw = block_shape
    lb = load_bytes(dtype, bw)
    seg = lb // _elem_bytes(dtype)
    nseg = bw // seg
    nseg_e = min(nseg, 32)
    band_rows = max(1, min(bh, 32 // nseg_e))
    return BsrGeometry(rows=rows, cols=cols, bh=bh, bw=bw, tile_rows=-(-rows // bh), tile_cols=-(-cols // bw),
                       load_bytes=lb, seg=seg, nseg=nseg, band_rows=band_rows, bands=-(-bh // band_rows),
                       lanes_per_tile=band_rows * nseg_e, groups=-(-nseg // 32))


def min_team_lanes(g: BsrGeometry) -> int:
    """The smallest team the kernel accepts: a power of two >= lanes_per_tile (a whole warp or
    more when a tile row has several bands, so that one warp never mixes band heights)."""
    return max(_next_pow2(g.lanes_per_tile), 32 if g.bands > 1 else 1)


def choose_team_lanes(g: BsrGeometry, nnz_blocks: int, threads: int, multiprocessors: int,
                      batch_tile: int = 1) -> int:
    """Lanes per unit (a power of two): a heuristic, to be tuned by measurement.

    Start from the smallest team; widen it (up to min(threads, 256)) while a lane would run more
    than two unrolled rounds of chunk loads over the average tile row (each round is one memory
    round trip), then while the grid holds fewer lanes than one full wave of the chip (2048 per
    SM) and every lane still gets at least one full round.
    """
    tl = min_team_lanes(g)
    cap = max(tl, min(threads, MAX_AUTO_TEAM_LANES))
    per_unit = (nnz_blocks / max(1, g.tile_rows)) * g.groups  # (virtual) tiles per unit, average
    unr = unroll(g.load_bytes, batch_tile)

    def steps(lanes: int) -> float:  # chunk loads per lane over the average unit
        return per_unit / max(1, lanes // g.lanes_per_tile)

    while tl < cap and steps(tl) > 2 * unr:
        tl *= 2
    while tl < cap and g.units * tl < multiprocessors * 2048 and steps(2 * tl) >= unr:
        tl *= 2
    return tl


# ---------------------------------------------------------------------------------------------
# Host-side validation
# ---------------------------------------------------------------------------------------------

def validate_bsr(crow_indices, col_indices, values, rows: int, cols: int, block_shape, *,
                 name: str = "tensor", format_checked: bool = False) -> None:
    """Check a packed BSR matrix on the CPU before it reaches the kernel; FormatError naming the
    first problem.

    ``crow_indices`` int32 [ceil(rows/bh) + 1], ``col_indices`` int32 [nnz_blocks], ``values``
    [nnz_blocks, bh, bw] float32/float16/bfloat16: numpy arrays or CPU torch tensors, all
    C-contiguous. What the kernel adds to the format: its value dtypes, and sizes within its 32-bit
    indexing (padded rows, padded cols and tile size each <= INT_LIMIT). Everything else (shapes,
    row pointers, tile columns in range and sorted, zeros outside the matrix in edge tiles, finite
    values) is formats.bsr.check_bsr_arrays, the one validator of the format, which this calls unless
    ``format_checked`` (the arrays come from PackedFile.load, which ran it on the bytes it returned).
    """
    rows = positive_int(rows, "rows")
    cols = positive_int(cols, "cols")
    bh, bw = block_shape_of(block_shape, name)
    rb, cb = -(-rows // bh), -(-cols // bw)
    if rb * bh > INT_LIMIT or cb * bw > INT_LIMIT or bh * bw > INT_LIMIT:
        raise FormatError(f"{name}: [{rows}, {cols}] with {bh}x{bw} tiles exceeds the kernel's 32-bit indexing "
                          f"(padded rows, padded cols and tile size must each be <= {INT_LIMIT})")
    crow = _as_torch(crow_indices, f"{name}: crow_indices")
    col = _as_torch(col_indices, f"{name}: col_indices")
    v = _as_torch(values, f"{name}: values")
    if v.dtype not in _VALUE_DTYPES:
        raise FormatError(f"{name}: values dtype {v.dtype} is not float32, float16 or bfloat16")
    if not format_checked:
        check_bsr_arrays(crow, col, v, rows, cols, (bh, bw), where=name)


# ---------------------------------------------------------------------------------------------
# The operator
# ---------------------------------------------------------------------------------------------

class BsrLinear(SparseLinear):
    """y = W x for one block-sparse W [rows, cols] (BSR, bh x bw tiles) held on a GPU.

    Build from the packed arrays (``crow_indices`` int32 [ceil(rows/bh)+1], ``col_indices`` int32
    [nnz_blocks], ``values`` [nnz_blocks, bh, bw]; numpy or CPU torch; validated on the host
    first) or with ``from_tensor(BsrTensor)``. The arrays are uploaded as they are. Call with x of
    shape [cols] or [cols, N] (a CuPy array, or a torch CUDA tensor, on the same device, in the
    layer's dtype: float32, float16, or bfloat16 — as a torch tensor, or as a CuPy uint16 array
    of bfloat16 bits), C-contiguous; returns [rows] or [rows, N] of the same kind and dtype.
    fp32 accumulation; the result is rounded to the layer's dtype once. Any x alignment works (a
    16-byte aligned x gets vector loads).

    ``threads``: threads per CTA, a power of two in [32, 1024]. ``team_lanes``: lanes computing
    one band of a tile row (0: auto, ``choose_team_lanes``; else a power of two between
    ``min_team_lanes`` and ``threads``). ``defines``: extra -D options for the kernel build.
    """

    def __init__(self, crow_indices, col_indices, values, *, rows: int, cols: int, device: int = 0,
                 threads: int = 256, team_lanes: int = 0, validate: bool = True, name: str = "tensor",
                 defines: tuple[str, ...] = ()) -> None:
        from . import _gpu

        if isinstance(threads, bool) or not isinstance(threads, int) or threads < 32 or threads > 1024 \
                or threads & (threads - 1):
            raise UsageError(f"threads must be a power of two in [32, 1024], got {threads!r}")
        if isinstance(team_lanes, bool) or not isinstance(team_lanes, int) or team_lanes < 0 \
                or team_lanes & (team_lanes - 1):
            raise UsageError(f"team_lanes must be 0 (auto) or a power of two, got {team_lanes!r}")
        crow = _as_torch(crow_indices, f"{name}: crow_indices")
        col = _as_torch(col_indices, f"{name}: col_indices")
        v = _as_torch(values, f"{name}: values")
        if v.dim() != 3:
            raise FormatError(f"{name}: values must be [nnz_blocks, bh, bw], got shape {list(v.shape)}")
        block_shape = (int(v.shape[1]), int(v.shape[2]))
        # validate=False: the format was checked already; the kernel's limits are always checked.
        validate_bsr(crow, col, v, rows, cols, block_shape, name=name, format_checked=not validate)
        cp = _gpu.cupy()
        self.device = _gpu.require_device(device)
        self.info = _gpu.device_info(self.device)
        self.name = name
        self.rows, self.cols = int(rows), int(cols)
        self.block_shape = block_shape
        self.nnz_blocks = int(col.shape[0])
        self.dtype = _VALUE_DTYPES[v.dtype]
        self.geometry = bsr_geometry(self.rows, self.cols, block_shape, self.dtype)
        self.threads = threads
        if team_lanes and not min_team_lanes(self.geometry) <= team_lanes <= threads:
            raise UsageError(f"{name}: team_lanes {team_lanes} must lie in [{min_team_lanes(self.geometry)}, "
                             f"{threads}] for {block_shape[0]}x{block_shape[1]} tiles of {self.dtype}")
        self.team_lanes = team_lanes
        self.defines = tuple(defines)
        with cp.cuda.Device(self.device):
            # Fresh allocations (CuPy aligns them to 256 bytes): the kernel's chunk loads need
            # load_bytes alignment of the values' base.
            self.values_dev = cp.asarray(_host_numpy(v.reshape(self.nnz_blocks, block_shape[0] * block_shape[1])))
            self.crow_dev = cp.asarray(crow.contiguous().numpy())
            self.col_dev = cp.asarray(col.contiguous().numpy())
        if self.nnz_blocks and self.values_dev.data.ptr % 16:
            raise UsageError(f"{name}: device values are not 16-byte aligned")  # CuPy's allocator never does this
        self._kernels: dict[tuple, object] = {}
        self._configs: dict[int, dict] = {}

    @classmethod
    def from_tensor(cls, bt, **kw) -> BsrLinear:
        """From a balprune.formats.BsrTensor (conv weights run as their [C_out, C_in*kh*kw] view)."""
        kw.setdefault("name", "tensor")
        return cls(bt.crow_indices, bt.col_indices, bt.values, rows=bt.rows, cols=bt.cols, **kw)

    # -- geometry of one launch -----------------------------------------------------------------

    @property
    def weight_bytes(self) -> int:
        """Bytes of values, tile-column indices and row pointers the kernel streams per pass."""
        return int(self.values_dev.nbytes + self.col_dev.nbytes + self.crow_dev.nbytes)

    def _kernel(self, nb: int):
        return self._compiled(nb, "bsr_spmv.cu", kernel_name(self.dtype, self.geometry.load_bytes, nb))

    def _launch_config(self, batch: int) -> dict:
        g = self.geometry
        nb = min(8, _next_pow2(batch))
        passes = -(-batch // nb)
        if passes > 65535:
            raise UsageError(f"{self.name}: batch {batch} needs {passes} passes of {nb} columns, more than 65535")
        tl = self.team_lanes or choose_team_lanes(g, self.nnz_blocks, self.threads, self.info.multiprocessors, nb)
        teams = self.threads // tl
        smem = self.threads * nb * 4 if tl > 32 else 0  # cross-warp reduction of teams of several warps
        return {"kernel": self._kernel(nb), "grid": (max(1, -(-g.units // teams)), passes), "block": (self.threads,),
                "shared_mem": smem, "batch_tile": nb, "team_lanes": tl, "teams_per_cta": teams}

    def _launch_args(self, x, y, batch: int, cfg: dict) -> tuple:
        """The kernel arguments of one launch (kernels/bsr_spmv.cu's parameter order)."""
        g = self.geometry
        return (self.values_dev, self.crow_dev, self.col_dev, np.int32(self.rows), np.int32(self.cols),
                np.int32(g.tile_rows), np.int32(g.bh), np.int32(g.bw), np.int32(g.band_rows), np.int32(g.bands),
                np.int32(cfg["team_lanes"]), x, np.int32(batch), y)

    def __repr__(self) -> str:
        bh, bw = self.block_shape
        return (f"BsrLinear({self.name!r}, [{self.rows}, {self.cols}], tiles {bh}x{bw}, nnz_blocks={self.nnz_blocks}, "
                f"{self.dtype}, device={self.device})")


__all__ = ["BATCH_TILES", "BsrGeometry", "BsrLinear", "bsr_geometry", "choose_team_lanes", "kernel_name",
           "kernel_variants", "load_bytes", "min_team_lanes", "unroll", "validate_bsr"]
