"""Balanced-sparse layers read through the bitmask index encoding: kernels/balanced_bitmask.cu.

``BitmaskLinear`` holds one balanced matrix in a device layout of that kernel file and computes
y = act(W x + bias) with fp32 accumulation. Its default walk, the delta walk (``DeltaLinear``,
formats.layouts.delta_segments), stores per kept value a 4-bit column step from the previous kept
column; the mask walks 5 and 6 (formats.layouts.bitmask_segments) one bit per column. Either reads
far fewer index bytes than the offsets kernels' one or two bytes per kept value below ~87.5%
sparsity, which is where LLM linears are pruned. Host validation is the offsets validator
(validate_balanced): the arrays arrive in the offsets form every BalancedTensor holds in memory,
whatever the file stored.
"""

from __future__ import annotations

import numpy as np

from ..errors import FormatError, UsageError
from ..formats.layouts import DeltaGeometry, SegmentGeometry, bitmask_segments, delta_segments
from ._linear import STORAGE as _STORAGE
from ._linear import VALUE_DTYPES as _VALUE_DTYPES
from .balanced import INT_LIMIT, BalancedOperator, _host_numpy, checked_arrays

#: Batch columns per pass the kernel is built for (a larger batch runs in several passes over y's columns).
BATCH_TILES = (1, 2, 4, 8, 16)


def batch_tiles(dtype: str) -> tuple[int, ...]:
    """The tiles built for ``dtype``: float32 stops at 8 (16 fp32 sums and x values per weight
    do not fit the 64 registers of __launch_bounds__(256, 4) without spilling)."""
    return BATCH_TILES[:-1] if dtype == "float32" else BATCH_TILES


#: The kernel's walks (kernels/balanced_bitmask.cu): 7, the default, is the delta walk (DeltaLinear,
#: kernels/NOTES.md v37: its own layout of 4-bit column steps, ~7.4 SASS instructions per value; measured faster
#: than both mask walks on every Llama shape, BENCHMARKS.md); the mask walks (BP_BM_WALK) are 5, one segment per
#: lane at a time, and 6 (the uniform walk, two segments per lane at once, over a paired layout; ~16 instructions
#: per value). The model runtime times every walk (stages.sparse_alternatives), so does bench (the subject kernel
#: is the default walk, balanced_walk5 / balanced_walk6 the others), and a bare operator takes the default.
#: WALKS lists the default first.
WALKS = (7, 5, 6)
#: The walk whose layout is delta_segments' (BitmaskLinear(walk=DELTA_WALK) is a DeltaLinear).
DELTA_WALK = 7
WALK = WALKS[0]
#: Threads per CTA: the kernel's __launch_bounds__(256, 4).
THREADS = 256
_X_STAGE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}


def kernel_name(dtype: str, batch_tile: int, x_own: bool) -> str:
    """The CuPy name expression of bp::balanced_bitmask_spmm<T, XT, NB>: x staged as fp32, or in the
    layer's own 16-bit type (``x_own``: half the shared memory, so wider batch tiles fit)."""
    t = _STORAGE[dtype][1]
    return f"bp::balanced_bitmask_spmm<{t}, {t if x_own else 'float'}, {batch_tile}>"


def delta_kernel_name(dtype: str, batch_tile: int, x_own: bool) -> str:
    """The CuPy name expression of bp::balanced_delta_spmm<T, XT, NB> (x staged as in kernel_name)."""
    t = _STORAGE[dtype][1]
    return f"bp::balanced_delta_spmm<{t}, {t if x_own else 'float'}, {batch_tile}>"


def kernel_variants(walk: int = WALK) -> list[str]:
    """Every instantiation the runtime can launch for ``walk`` (``plan``'s choices; the compile test builds
    them all): x staged as fp32 at NB = 1 (and at every NB for float32), in the 16-bit types' own type at
    NB = 1 when fp32 does not fit, and always beyond NB = 1."""
    name = delta_kernel_name if walk == DELTA_WALK else kernel_name
    names = []
    for d in _STORAGE:
        for nb in batch_tiles(d):
            if d == "float32" or nb == 1:
                names.append(name(d, nb, False))
            if d != "float32":
                names.append(name(d, nb, True))
    return names


class BitmaskLinear(BalancedOperator):
    """y = W x for one balanced-sparse W [rows, cols] on a GPU, through the bitmask kernel.

    Build from offsets-form arrays (``values``/``indices`` [rows, keep, blocks], numpy or CPU
    torch; validated on the host first unless ``validate=False``: the arrays come from
    PackedFile.load, which checked them) or with ``from_tensor(BalancedTensor)``. The call contract
    is SparseLinear's (x [cols] or [cols, N] in the layer's dtype, C-contiguous). ``defines``: extra
    -D options for the kernel build (experiments, e.g. "BP_BM_AHEAD=4"). ``walk``: the kernel's walk
    version (WALKS; it also decides the layout: 6 pairs each lane's rounds; 7 builds a DeltaLinear).
    """

    def __new__(cls, *args, walk: int = WALK, **kw):
        # walk 7 is its own layout and kernel: the one knob callers turn (stages, bench, probes) picks the class.
        # Only a construction (arguments given) is redirected: copy.copy calls cls.__new__(cls) bare, and a copy of
        # a mask-walk operator must stay one
        delta = cls is BitmaskLinear and walk == DELTA_WALK and bool(args or kw)
        return super().__new__(DeltaLinear if delta else cls)

    def __init__(self, values, indices, *, cols: int, block_length: int, device: int = 0, validate: bool = True,
                 name: str = "tensor", defines: tuple[str, ...] = (), walk: int = WALK) -> None:
        from . import _gpu

        v, i, rows, keep, blocks = checked_arrays(values, indices, cols, block_length, name=name, validate=validate)
        cp = _gpu.cupy()
        self.device = _gpu.require_device(device)
        self.info = _gpu.device_info(self.device)
        self.name = name
        self.rows, self.cols, self.blocks, self.block_length, self.keep = rows, int(cols), blocks, int(block_length), keep
        self.dtype = _VALUE_DTYPES[v.dtype]
        if walk not in WALKS:
            raise UsageError(f"{name}: the bitmask kernel has walks {WALKS}, not {walk}")
        self.walk = int(walk)
        self.defines = (f"BP_BM_WALK={self.walk}",) + tuple(defines)
        # the staged x is indexed with 32-bit ints: refuse before building the layout
        if self._geometry(blocks, keep, v.element_size()).staged_cols * BATCH_TILES[-1] > INT_LIMIT:
            raise FormatError(f"{name}: {cols} columns exceed the bitmask kernel's 32-bit indexing")
        with cp.cuda.Device(self.device):
            self._build_layout(cp, _host_numpy(v), i.numpy())
        self._kernels: dict[tuple, object] = {}
        self._configs: dict[int, dict] = {}

    def _geometry(self, blocks: int, keep: int, itemsize: int):
        return SegmentGeometry(blocks, self.block_length, keep, itemsize)

    def _build_layout(self, cp, values, indices) -> None:
        """The device arrays of the walk's layout (on the current device)."""
        units, words, sg = bitmask_segments(values, indices, self.block_length, paired=self.walk == 6)
        self.segments = sg
        self.units_dev = cp.asarray(units)
        self.words_dev = cp.asarray(words)

    @property
    def weight_bytes(self) -> int:
        """Bytes of value units and mask words the kernel streams per pass (layout padding included)."""
        return int(self.units_dev.nbytes + self.words_dev.nbytes)

    def shared_bytes(self, batch_tile: int, x_own: bool) -> int:
        """Dynamic shared memory of a launch: x staged [seg_cols, Q*P, NB] as fp32 or in its own
        type (rounded up to 16 bytes), then per warp and lane ``_words_per_lane()`` mask words."""
        item = _X_STAGE_BYTES[self.dtype] if x_own else 4
        x_bytes = -(-self.segments.staged_cols * batch_tile * item // 16) * 16
        return x_bytes + (THREADS // 32) * self._words_per_lane() * 32 * 4

    def _words_per_lane(self) -> int:
        """Mask words a lane keeps in shared memory: its segment's (walk 5: W) or its two segments', each
        with one spare slot (walk 6: 2 * (W + 1))."""
        sg = self.segments
        return 2 * (sg.words + 1) if self.walk == 6 else sg.words

    def plan(self, batch: int) -> tuple[int, bool]:
        """(batch tile NB, x in its own type) for ``batch`` columns: the widest tile up to the batch
        (rounded up to a power of two, at most 16) whose x fits in shared memory, staging fp32 at
        NB = 1 and 16-bit layers' own type beyond (half the bytes). UsageError when even one column
        of x does not fit (K beyond ~110k for 16-bit, ~58k for float32)."""
        limit = self.info.smem_per_block_optin
        tiles = batch_tiles(self.dtype)
        want = min(tiles[-1], 1 << max(0, (batch - 1).bit_length()))
        for nb in reversed(tiles):
            if nb > want:
                continue
            own_choices = (False,) if self.dtype == "float32" else ((False, True) if nb == 1 else (True,))
            for own in own_choices:
                if self.shared_bytes(nb, own) <= limit:
                    return nb, own
        raise UsageError(f"{self.name}: x of {self.cols} columns does not fit in shared memory "
                         f"({self.shared_bytes(1, self.dtype != 'float32')} > {limit} bytes)")

    def _kernel(self, nb: int, own: bool, smem: int):
        return self._compiled((nb, own), "balanced_bitmask.cu", kernel_name(self.dtype, nb, own), smem)

    def _launch_config(self, batch: int) -> dict:
        info = self.info
        nb, own = self.plan(batch)
        smem = self.shared_bytes(nb, own)
        k = self._kernel(nb, own, smem)
        rows_per_cta = (32 // self.segments.lanes) * (THREADS // 32)  # (a delta row group is 32 / lanes rows)
        per_sm = max(1, min(info.max_threads_per_sm // THREADS, info.regs_per_sm // max(1, k.num_regs * THREADS),
                            info.smem_per_sm // (smem + k.shared_size_bytes + 1024)))  # (+ static: a build's own)
        passes = -(-batch // nb)
        grid_x = max(1, min(-(-self.rows // rows_per_cta), info.multiprocessors * per_sm))
        return {"kernel": k, "grid": (grid_x, passes), "block": (THREADS,), "shared_mem": smem, "batch_tile": nb,
                "x_own": own, "ctas_per_sm": per_sm}

    def _launch_args(self, x, y, batch: int, cfg: dict) -> tuple:
        """The kernel arguments of one launch (kernels/balanced_bitmask.cu's parameter order, up to y)."""
        sg = self.segments
        return (self.units_dev, self.words_dev, np.int32(self.rows), np.int32(sg.rounds), np.int32(sg.units),
                np.int32(sg.words), np.int32(sg.lanes), np.int32(sg.seg_keep), np.int32(sg.seg_cols),
                np.int32(sg.segments), x, np.int32(self.cols), np.int32(batch), y)

    def __repr__(self) -> str:
        return (f"BitmaskLinear({self.name!r}, [{self.rows}, {self.cols}], B={self.blocks}, L={self.block_length}, "
                f"k={self.keep}, {self.dtype}, device={self.device})")


def bitmask_alternative(packed):
    """bench's path of a balanced layer on a walk that is not the default (patterns.registry.BenchAlternative):
    the tensor itself when it is stored with bitmask indices, else None. bench times every walk, as the model
    runtime does (model.stages.sparse_alternatives)."""
    return packed if getattr(packed, "encoding", None) == "bitmask" else None


def walk5_from_tensor(packed, **kw) -> BitmaskLinear:
    """``BitmaskLinear.from_tensor`` on mask walk 5 (the subject kernel of a bitmask-stored layer is the default walk)."""
    return BitmaskLinear.from_tensor(packed, walk=5, **kw)


def walk6_from_tensor(packed, **kw) -> BitmaskLinear:
    """``BitmaskLinear.from_tensor`` on mask walk 6."""
    return BitmaskLinear.from_tensor(packed, walk=6, **kw)


class DeltaLinear(BitmaskLinear):
    """BitmaskLinear's walk 7: the same kernel file, staging and call contract, its own device layout
    (formats.layouts.delta_segments: per kept value a 4-bit column step, segments of a row group padded
    to one entry count) and kernel (bp::balanced_delta_spmm). Built as ``BitmaskLinear(..., walk=7)``."""

    def _geometry(self, blocks: int, keep: int, itemsize: int):
        return DeltaGeometry(blocks, self.block_length, keep, itemsize)

    def _build_layout(self, cp, values, indices) -> None:
        units, deltas, starts, dg = delta_segments(values, indices, self.block_length)
        self.segments = dg
        self.units_dev = cp.asarray(units)
        self.deltas_dev = cp.asarray(deltas)
        self.starts_dev = cp.asarray(starts)

    @property
    def weight_bytes(self) -> int:
        """Bytes of value units, step words and group starts the kernel streams per pass (padding included)."""
        return int(self.units_dev.nbytes + self.deltas_dev.nbytes + self.starts_dev.nbytes)

    def _words_per_lane(self) -> int:
        return 0  # the steps stream from global memory: shared memory holds x only

    def _kernel(self, nb: int, own: bool, smem: int):
        return self._compiled((nb, own), "balanced_bitmask.cu", delta_kernel_name(self.dtype, nb, own), smem)

    def _launch_args(self, x, y, batch: int, cfg: dict) -> tuple:
        """The kernel arguments of one launch (balanced_delta_spmm's parameter order, up to y)."""
        dg = self.segments
        return (self.units_dev, self.deltas_dev, self.starts_dev, np.int32(self.rows), np.int32(dg.rounds),
                np.int32(dg.lanes), np.int32(dg.seg_cols), np.int32(dg.segments), x, np.int32(self.cols),
                np.int32(batch), y)


__all__ = ["BATCH_TILES", "DELTA_WALK", "WALK", "WALKS", "BitmaskLinear", "DeltaLinear", "bitmask_alternative",
           "delta_kernel_name", "kernel_name", "kernel_variants", "walk5_from_tensor", "walk6_from_tensor"]
