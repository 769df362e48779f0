"""Balanced-sparse layers on the GPU: host-side validation, upload, and the launch wrapper.

``validate_balanced`` runs on the CPU (numpy / torch only, no CuPy) and checks everything the
kernel relies on before a byte reaches the device: the format's own validator
(formats.layouts.check_balanced_arrays) plus the kernel's dtypes and 32-bit limits. ``BalancedLinear`` uploads one packed matrix
and computes y = W x with kernels/balanced_spmv.cu.
"""

from __future__ import annotations

import numpy as np
import torch

from ..errors import FormatError, UsageError
from ..formats.base import positive_int
from ..formats.layouts import check_balanced_arrays, interleave_rows, offsets_index_dtype
from ._linear import STORAGE as _STORAGE
from ._linear import VALUE_DTYPES as _VALUE_DTYPES
from ._linear import SparseLinear

_INDEX_KERNEL_TYPE = {"uint8": "unsigned char", "uint16": "unsigned short"}
_STORAGE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}
#: The kernels index rows, columns and in-row offsets with 32-bit ints; this leaves headroom for a
#: tile and for the last CTA's units (shared by validate_balanced and validate_bsr).
INT_LIMIT = 2**31 - 2**16

#: Weight layouts the kernel reads (kernels/README.md).
LAYOUTS = ("interleaved", "direct")
#: Batch columns per pass the kernel is built for.
BATCH_TILES = (1, 2, 4, 8)


def vector_width(dtype: str) -> int:
    """Slots per 16-byte value vector: 4 for float32, 8 for the 16-bit types."""
    return 4 if dtype == "float32" else 8


#: x staging modes of bp::balanced_spmm (kernels/balanced_spmv.cu): read from global memory,
#: staged in shared memory as fp32, staged in shared memory in the layer's own 16-bit type,
#: copied into shared memory as it is (batch 1, any type: no transposition).
X_GLOBAL, X_SHARED_F32, X_SHARED_OWN, X_SHARED_RAW = 0, 1, 2, 3
#: Values of BalancedLinear's ``staging`` option.
STAGINGS = ("auto", "shared", "global", "raw")


def kernel_name(dtype: str, index_dtype: str, batch_tile: int, staging: int, layout: str) -> str:
    """The CuPy name expression of one instantiation of bp::balanced_spmm (staging: X_* mode)."""
    return (f"bp::balanced_spmm<{_STORAGE[dtype][1]}, {_INDEX_KERNEL_TYPE[index_dtype]}, {batch_tile}, "
            f"{int(staging)}, {'true' if layout == 'interleaved' else 'false'}>")


def own_staging_allowed(dtype: str, batch_tile: int, layout: str) -> bool:
    """Whether X_SHARED_OWN exists for this combination (16-bit values, NB >= 2, interleaved)."""
    return dtype != "float32" and batch_tile >= 2 and layout == "interleaved"


def pipelined_kernel_name(dtype: str, index_dtype: str, raw_x: bool = False) -> str:
    """The name expression of bp::balanced_spmv_tma (batch 1, bulk-copy pipeline); ``raw_x``: x
    kept in shared memory as it is (X_SHARED_RAW) instead of transposed to fp32."""
    return (f"bp::balanced_spmv_tma<{_STORAGE[dtype][1]}, {_INDEX_KERNEL_TYPE[index_dtype]}, "
            f"{'true' if raw_x else 'false'}>")


def kernel_variants() -> list[str]:
    """Every instantiation the runtime can launch (the compile test builds them all)."""
    return [kernel_name(d, i, nb, xs, lay) for d in _STORAGE for i in _INDEX_KERNEL_TYPE for nb in BATCH_TILES
            for xs in (X_SHARED_F32, X_GLOBAL, X_SHARED_OWN, X_SHARED_RAW) for lay in LAYOUTS
            if (xs != X_SHARED_OWN or own_staging_allowed(d, nb, lay)) and (xs != X_SHARED_RAW or nb == 1)] + \
        [pipelined_kernel_name(d, i, r) for d in _STORAGE for i in _INDEX_KERNEL_TYPE for r in (False, True)]


# ---------------------------------------------------------------------------------------------
# Host-side validation
# ---------------------------------------------------------------------------------------------

def _as_torch(a, what: str) -> torch.Tensor:
    if isinstance(a, torch.Tensor):
        if a.device.type != "cpu":
            raise FormatError(f"{what} must be on the CPU for validation, is on {a.device}")
        return a
    if isinstance(a, np.ndarray):
        try:
            return torch.from_numpy(a)
        except TypeError as e:
            raise FormatError(f"{what}: numpy dtype {a.dtype} is not supported") from e
    raise FormatError(f"{what} must be a numpy array or a torch tensor, got {type(a).__name__}")


def validate_balanced(values, indices, rows: int, cols: int, blocks: int, block_length: int, keep: int,
                      *, name: str = "tensor", format_checked: bool = False) -> None:
    """Check a packed balanced matrix on the CPU before it reaches the kernel; FormatError naming
    the first problem.

    ``values`` [rows, keep, blocks] float32/float16/bfloat16 and ``indices`` [rows, keep, blocks]
    uint8 (block_length <= 256) or uint16 (<= 65536), numpy arrays or CPU torch tensors, both
    C-contiguous. What the kernel adds to the format: its value dtypes, and sizes within its 32-bit
    indexing (rows, the padded row blocks * block_length and the slots per row keep * blocks, each
    <= INT_LIMIT, the limits validate_bsr applies). Everything else (geometry, shapes, index ranges
    and order, padding, finite values) is formats.layouts.check_balanced_arrays, the one validator
    of the format, which this calls unless ``format_checked`` (the arrays come from PackedFile.load,
    which ran it on the very bytes it returned: a second pass over a large layer costs seconds).
    """
    rows = positive_int(rows, "rows")
    cols = positive_int(cols, "cols")
    blocks = positive_int(blocks, "blocks")
    L = positive_int(block_length, "block_length")
    keep = positive_int(keep, "keep")
    if rows > INT_LIMIT or blocks * L > INT_LIMIT or keep * blocks > INT_LIMIT:
        raise FormatError(f"{name}: [{rows}, {cols}] with {blocks} blocks of {L} (keep {keep}) exceeds the kernel's "
                          f"32-bit indexing (rows, padded cols and keep * blocks must each be <= {INT_LIMIT})")
    v = _as_torch(values, f"{name}: values")
    i = _as_torch(indices, f"{name}: indices")
    if v.dtype not in _VALUE_DTYPES:
        raise FormatError(f"{name}: values dtype {v.dtype} is not float32, float16 or bfloat16")
    if not format_checked:
        check_balanced_arrays(v, i, rows, cols, blocks, L, keep, where=name)


# ---------------------------------------------------------------------------------------------
# The operator
# ---------------------------------------------------------------------------------------------

def _host_numpy(t: torch.Tensor) -> np.ndarray:
    if t.dtype == torch.bfloat16:
        return t.contiguous().view(torch.int16).numpy().view(np.uint16)
    return t.contiguous().numpy()


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def checked_arrays(values, indices, cols: int, block_length: int, *, name: str, validate: bool):
    """(values, indices as CPU torch tensors, rows, keep, blocks) of a balanced operator's offsets-form
    arrays after validate_balanced. validate=False: the format was checked already (PackedFile.load,
    or a validated copy); the kernels' own limits and value dtype are cheap and always checked."""
    v = _as_torch(values, f"{name}: values")
    i = _as_torch(indices, f"{name}: indices")
    if v.dim() != 3:
        raise FormatError(f"{name}: values must be [rows, keep, blocks], got shape {list(v.shape)}")
    rows, keep, blocks = (int(d) for d in v.shape)
    validate_balanced(v, i, rows, cols, blocks, block_length, keep, name=name, format_checked=not validate)
    return v, i, rows, keep, blocks


class BalancedOperator(SparseLinear):
    """Base of the operators built from a balanced matrix's offsets-form arrays (BalancedLinear,
    runtime.bitmask.BitmaskLinear): ``cls(values, indices, cols=, block_length=, **options)``."""

    @classmethod
    def from_tensor(cls, bt, **kw):
        """From a balprune.formats.BalancedTensor (conv weights run as their [C_out, C_in*kh*kw] view;
        either stored encoding: the tensor holds the offsets form in memory)."""
        g = bt.geometry
        kw.setdefault("name", "tensor")
        return cls(bt.values, bt.indices, cols=g.cols, block_length=g.block_length, **kw)


class BalancedLinear(BalancedOperator):
    """y = W x for one balanced-sparse W [rows, cols] held on a GPU.

    Build from the packed arrays (``values``/``indices`` [rows, keep, blocks], numpy or CPU
    torch; validated on the host first) or with ``from_tensor(BalancedTensor)``. Call with x of
    shape [cols] or [cols, N] (a CuPy array, or a torch CUDA tensor, on the same device, in the
    layer's dtype: float32, float16, or bfloat16 — as a torch tensor, or as a CuPy uint16 array
    of bfloat16 bits), C-contiguous; returns [rows] or [rows, N] of the same kind and dtype.
    fp32 accumulation; the result is rounded to the layer's dtype once.

    ``layout``: "interleaved" (repacked once on the device for 16-byte loads; the fast path) or
    "direct" (the file's arrays as they are). ``staging``: "auto" (x in shared memory when it
    fits), "shared", "global", or "raw" (at batch 1, x copied into shared memory as it is: no
    transposition, the cheapest staging, reads with index-dependent bank conflicts; other
    batches as "auto"). ``threads``: threads per CTA (a multiple of 32, <= 1024); the
    pipelined batch-1 kernel uses threads/32 consumer warps (at most 31) plus one producer warp.
    ``pipeline``: "auto" (the bulk-copy pipelined kernel for batch 1 with 16-bit values when it
    fits; fp32 runs balanced_spmm, measured as fast), True (require it for batch 1), False (never).
    With ``staging="raw"`` the pipelined kernel keeps x as it is too (no transposition; a
    smaller x region, so more of the weights in flight).
    ``stages``: ring depth of the pipeline (0: as many as fit, up to 15). ``team_warps``: consumer warps per group in the pipeline (0: auto).
    ``defines``: extra -D options for the kernel build (experiments, e.g. "BP_WEIGHT_HINT=0").
    """

    def __init__(self, values, indices, *, cols: int, block_length: int, device: int = 0,
                 layout: str = "interleaved", staging: str = "auto", threads: int = 1024,
                 validate: bool = True, name: str = "tensor", defines: tuple[str, ...] = (),
                 pipeline: bool | str = "auto", stages: int = 0, team_warps: int = 0) -> None:
        from . import _gpu

        if layout not in LAYOUTS:
            raise UsageError(f"layout must be one of {LAYOUTS}, got {layout!r}")
        if staging not in STAGINGS:
            raise UsageError(f"staging must be one of {', '.join(map(repr, STAGINGS))}, got {staging!r}")
        if isinstance(threads, bool) or not isinstance(threads, int) or threads % 32 or not 32 <= threads <= 1024:
            raise UsageError(f"threads must be a multiple of 32 in [32, 1024], got {threads!r}")
        v, i, rows, keep, blocks = checked_arrays(values, indices, cols, block_length, name=name, validate=validate)
        cp = _gpu.cupy()
        self.device = _gpu.require_device(device)
        self.info = _gpu.device_info(self.device)
        self.name = name
        self.rows, self.cols, self.blocks, self.block_length, self.keep = rows, int(cols), blocks, int(block_length), keep
        self.dtype = _VALUE_DTYPES[v.dtype]
        self.index_dtype = str(offsets_index_dtype(self.block_length)).removeprefix("torch.")
        self.layout, self.staging, self.threads = layout, staging, threads
        self.defines = tuple(defines)
        if pipeline not in ("auto", True, False):
            raise UsageError(f"pipeline must be 'auto', True or False, got {pipeline!r}")
        if isinstance(stages, bool) or not isinstance(stages, int) or not 0 <= stages <= 15:
            raise UsageError(f"stages must be an int in [0, 15], got {stages!r}")
        if team_warps not in (0, 1, 2, 4, 8, 16):
            raise UsageError(f"team_warps must be 0 (auto), 1, 2, 4, 8 or 16, got {team_warps!r}")
        self.pipeline, self.stages, self.team_warps = pipeline, stages, team_warps
        self.lanes_per_row = min(32, _next_pow2(blocks))
        with cp.cuda.Device(self.device):
            dv = cp.asarray(_host_numpy(v))
            di = cp.asarray(_host_numpy(i))
            if layout == "interleaved":
                dv, di, stride = interleave_rows(dv, di, vector_width(self.dtype), xp=cp)
            else:
                dv, di, stride = dv.reshape(rows, keep * blocks), di.reshape(rows, keep * blocks), keep * blocks
            self.values_dev, self.indices_dev, self.row_stride = dv, di, int(stride)
        self._kernels: dict[tuple, object] = {}
        self._configs: dict[int, dict] = {}

    # -- geometry of one launch -----------------------------------------------------------------

    @property
    def weight_bytes(self) -> int:
        """Bytes of values and indices the kernel streams per pass (padding of the layout included)."""
        return int(self.values_dev.nbytes + self.indices_dev.nbytes)

    def shared_bytes(self, batch_tile: int, staging: int = X_SHARED_F32) -> int:
        """Dynamic shared memory of a launch: fp32 x plus its transpose scratch (X_SHARED_F32), x in
        its own 16-bit type (X_SHARED_OWN), or nothing (X_GLOBAL)."""
        B, L = self.blocks, self.block_length
        if staging == X_SHARED_RAW:
            return -(-B * L * _STORAGE_BYTES[self.dtype] // 16) * 16
        if staging == X_SHARED_OWN:
            return B * L * batch_tile * 2
        return (B * L + B * (L | 1)) * batch_tile * 4 if staging == X_SHARED_F32 else 0

    def plan(self, batch: int) -> tuple[int, int]:
        """(batch tile NB, x staging mode X_*) for a batch of ``batch`` columns.

        The widest tile (up to 8, at most the batch rounded up to a power of two) whose x fits in
        shared memory, 16-bit layers staging x in their own type (half the bytes, so batch 8 of
        K = 8192 runs in one pass); x from global memory when even NB = 1 does not fit.
        """
        limit = self.info.smem_per_block_optin
        if self.staging == "raw" and batch == 1 and self.shared_bytes(1, X_SHARED_RAW) <= limit:
            return 1, X_SHARED_RAW
        want = min(8, _next_pow2(batch))
        tiles = [nb for nb in reversed(BATCH_TILES) if nb <= want]
        if self.staging != "global":
            for nb in tiles:
                if own_staging_allowed(self.dtype, nb, self.layout) and self.shared_bytes(nb, X_SHARED_OWN) <= limit:
                    return nb, X_SHARED_OWN
                if self.shared_bytes(nb) <= limit:
                    return nb, X_SHARED_F32
            if self.staging == "shared":
                raise UsageError(f"{self.name}: x needs {self.shared_bytes(1)} bytes of shared memory, "
                                 f"the device allows {limit}")
        return want, X_GLOBAL

    def pipeline_plan(self) -> tuple[int, int, int, int] | None:
        """(consumer warps, group rows, stages, shared bytes) of the pipelined batch-1 kernel, or None.

        Needs the interleaved layout and x in shared memory (fp32 transposed, or as it is with
        staging "raw"). Consumer warps come in teams of
        ``team_warps`` (auto: the better of 8 and 4; all consumers when fewer than 8), each team
        computing one group of
        team_warps * 32/P rows per stage. Stages: as many as shared memory holds (<= 15), at
        least two, and a multiple of the team count (stage s always belongs to team s % teams:
        see kernels/balanced_spmv.cu), with at least 8 consumer warps (fewer: None, and batch 1
        runs balanced_spmm). Auto picks the most consumer warps (counting up to 24), then the
        most bytes in flight.
        """
        if self.pipeline is False or self.layout != "interleaved" or self.staging == "global":
            return None
        if self.pipeline == "auto" and self.dtype == "float32":
            # Measured on an H200 (kernels/NOTES.md, run 5): for fp32 balanced_spmm was as fast or
            # faster (24.2 vs 24.7 us, 16384 x 8192); the pipeline wins for 16-bit values.
            return None
        limit = self.info.smem_per_block_optin
        fixed = 256 + -(-self.shared_bytes(1, self._pipeline_staging()) // 128) * 128
        rpw = 32 // self.lanes_per_row
        ncw_max = min(31, max(1, self.threads // 32))
        row_bytes = self.row_stride * (self.values_dev.itemsize + self.indices_dev.itemsize)
        best = None
        small = 1 << (ncw_max.bit_length() - 1)  # fewer than 8 consumer warps: one team of them all
        for wpt in ((self.team_warps,) if self.team_warps else ((8, 4) if ncw_max >= 8 else (small,))):
            if wpt > ncw_max:
                continue
            group = wpt * rpw
            fit = min(15, (limit - fixed) // (group * row_bytes)) if limit > fixed else 0
            if self.stages:
                if fit < self.stages:
                    continue
                stages = self.stages
                teams = max(t for t in range(1, ncw_max // wpt + 1) if stages % t == 0)
            else:
                teams = max(1, min(ncw_max // wpt, fit))
                stages = fit // teams * teams
            if stages < 2 or teams * wpt < min(8, ncw_max):  # too few consumers: balanced_spmm does better
                continue
            plan = (teams * wpt, group, stages, fixed + stages * group * row_bytes)
            score = (min(plan[0], 24), stages * group * row_bytes)
            if best is None or score > best[0]:
                best = (score, plan)
        return None if best is None else best[1]

    def _pipeline_staging(self) -> int:
        """x staging of the pipelined kernel: as it is with staging "raw", else fp32 transposed."""
        return X_SHARED_RAW if self.staging == "raw" else X_SHARED_F32

    def _kernel(self, nb: int, xs: int, pipelined: bool = False, smem: int = 0):
        name = pipelined_kernel_name(self.dtype, self.index_dtype, xs == X_SHARED_RAW) if pipelined else \
            kernel_name(self.dtype, self.index_dtype, nb, xs, self.layout)
        return self._compiled((nb, xs, pipelined), "balanced_spmv.cu", name, smem)

    def _launch_config(self, batch: int) -> dict:
        info = self.info
        pp = self.pipeline_plan() if batch == 1 else None
        if pp is None and batch == 1 and self.pipeline is True:
            raise UsageError(f"{self.name}: the pipelined kernel does not fit (layout {self.layout}, "
                             f"staging {self.staging}, {self.shared_bytes(1, self._pipeline_staging())} bytes of x)")
        if pp is not None:
            ncw, group, stages, smem = pp
            xs = self._pipeline_staging()
            k = self._kernel(1, xs, True, smem)
            ngroups = -(-self.rows // group)
            per_sm = max(1, min(info.max_threads_per_sm // ((ncw + 1) * 32), info.smem_per_sm // (smem + 1024)))
            return {"kernel": k, "grid": (max(1, min(ngroups, info.multiprocessors * per_sm)),),
                    "block": ((ncw + 1) * 32,), "shared_mem": smem, "batch_tile": 1, "staging": xs,
                    "pipelined": True, "group_rows": group, "stages": stages, "ctas_per_sm": per_sm}
        nb, xs = self.plan(batch)
        smem = self.shared_bytes(nb, xs)
        k = self._kernel(nb, xs, False, smem)
        nwarps = self.threads // 32
        rows_per_cta = (32 // self.lanes_per_row) * nwarps
        per_sm = max(1, min(info.max_threads_per_sm // self.threads,
                            info.regs_per_sm // max(1, k.num_regs * self.threads),
                            (info.smem_per_sm // (smem + 1024)) if smem else 64))
        passes = -(-batch // nb)
        grid_x = max(1, min(-(-self.rows // rows_per_cta), -(-info.multiprocessors * per_sm // passes)))
        return {"kernel": k, "grid": (grid_x, passes), "block": (self.threads,), "shared_mem": smem,
                "batch_tile": nb, "staging": xs, "pipelined": False, "ctas_per_sm": per_sm}

    def _launch_args(self, x, y, batch: int, cfg: dict) -> tuple:
        """The kernel arguments of one launch (kernels/balanced_spmv.cu's parameter order)."""
        head = (self.values_dev, self.indices_dev, np.int64(self.row_stride), np.int32(self.rows),
                np.int32(self.blocks), np.int32(self.block_length), np.int32(self.keep),
                np.int32(self.lanes_per_row), x, np.int32(self.cols))
        if cfg["pipelined"]:
            # x is fetched by one bulk copy when 16-byte aligned (its tail, < 16 bytes, by loads)
            x_bulk = (self.cols * x.itemsize) // 16 * 16 if x.data.ptr % 16 == 0 else 0
            args = head + (y, np.int32(cfg["group_rows"]), np.int32(cfg["stages"]), np.int32(x_bulk))
        else:
            args = head + (np.int32(batch), y)
        return args

    def __repr__(self) -> str:
        return (f"BalancedLinear({self.name!r}, [{self.rows}, {self.cols}], B={self.blocks}, L={self.block_length}, "
                f"k={self.keep}, {self.dtype}/{self.index_dtype}, layout={self.layout}, device={self.device})")


#: Options BitmaskLinear takes (the others are BalancedLinear's offsets-kernel choices).
BITMASK_OPTIONS = ("device", "validate", "name", "defines", "walk")


def operator_for(bt, **options):
    """The runtime operator of a BalancedTensor for the encoding its file stores: BitmaskLinear
    (kernels/balanced_bitmask.cu, one bit of index per weight) for ``bitmask``, BalancedLinear
    (kernels/balanced_spmv.cu) for ``offsets``. ``options`` go to the operator; the offsets kernel's
    own choices (layout, staging, threads, pipeline, ...) are dropped for a bitmask tensor."""
    if bt.encoding == "bitmask":
        from .bitmask import BitmaskLinear

        return BitmaskLinear.from_tensor(bt, **{k: v for k, v in options.items() if k in BITMASK_OPTIONS})
    return BalancedLinear.from_tensor(bt, **options)


__all__ = ["BATCH_TILES", "operator_for", "LAYOUTS", "STAGINGS", "X_GLOBAL", "X_SHARED_F32", "X_SHARED_OWN", "X_SHARED_RAW", "BalancedLinear", "interleave_rows", "kernel_name", "kernel_variants",
           "pipelined_kernel_name", "validate_balanced", "vector_width"]
