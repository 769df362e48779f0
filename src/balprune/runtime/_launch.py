"""Kernel launches with their arguments packed once: each call is one cuLaunchKernel.

CuPy's ``Function.__call__`` converts every argument on every launch (5-10 us of host time for a
dozen arguments). A model step is dozens to hundreds of launches of the same kernels on the same
buffers, so eagerly run models were host-bound (a Bi-LSTM utterance: 400+ launches). Here the
arguments are packed into a ctypes parameter array at build time and the call passes that array
to the driver on the current CuPy stream, which is where CuPy itself would launch.

``overlap`` launches go through cuLaunchKernelEx with the programmatic-stream-serialization
attribute (Hopper's programmatic dependent launch): the grid is placed while the previous one in
the stream still runs, and waits in its kernel's ``bp::overlap_prologue`` (kernels/bp_common.cuh)
until that one has finished. Only kernels that call the prologue before touching global memory
may be launched so; OVERLAP_KERNEL_FILES names the sources whose every kernel does (a CPU test
holds the sources to it).
"""

from __future__ import annotations

import ctypes
import functools
from collections.abc import Callable

import numpy as np

from ..errors import GpuRuntimeError

#: kernels/ sources whose every __global__ function calls bp::overlap_prologue() first: the only
#: kernels an ``overlap`` launch may run (tests/test_launch_overlap.py reads the sources).
OVERLAP_KERNEL_FILES = ("balanced_spmv.cu", "balanced_bitmask.cu", "nm24_sparse_mma.cu", "bsr_spmv.cu", "llama_ops.cu")

#: cuda.h: CUlaunchAttributeID CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION
PROGRAMMATIC_STREAM_SERIALIZATION = 6


class LaunchAttribute(ctypes.Structure):
    """cuda.h CUlaunchAttribute: a 4-byte id, padding to 8, a 64-byte value union (8-byte aligned)."""

    _fields_ = [("id", ctypes.c_uint32), ("_pad", ctypes.c_uint32), ("value", ctypes.c_uint64 * 8)]


class LaunchConfig(ctypes.Structure):
    """cuda.h CUlaunchConfig (cuLaunchKernelEx's first argument)."""

    _fields_ = [("gridDimX", ctypes.c_uint32), ("gridDimY", ctypes.c_uint32), ("gridDimZ", ctypes.c_uint32),
                ("blockDimX", ctypes.c_uint32), ("blockDimY", ctypes.c_uint32), ("blockDimZ", ctypes.c_uint32),
                ("sharedMemBytes", ctypes.c_uint32), ("hStream", ctypes.c_void_p),
                ("attrs", ctypes.POINTER(LaunchAttribute)), ("numAttrs", ctypes.c_uint32)]


def overlap_config(grid: tuple, block: tuple, shared_mem: int) -> tuple[LaunchConfig, LaunchAttribute]:
    """A CUlaunchConfig of one programmatic-stream-serialization attribute (allowed = 1); the caller
    sets ``hStream`` before each launch and keeps the attribute alive with the config."""
    attr = LaunchAttribute(id=PROGRAMMATIC_STREAM_SERIALIZATION)
    attr.value[0] = 1  # programmaticStreamSerializationAllowed: the union's first int
    cfg = LaunchConfig(*grid, *block, int(shared_mem), None, ctypes.pointer(attr), 1)
    return cfg, attr


@functools.cache
def _driver() -> ctypes.CDLL:
    """The CUDA driver library (OSError where there is none)."""
    return ctypes.CDLL("libcuda.so.1")


@functools.cache
def _launch_kernel_ex():
    """The driver's cuLaunchKernelEx (ctypes; CuPy has no binding for it)."""
    try:
        fn = _driver().cuLaunchKernelEx
    except (OSError, AttributeError) as e:
        raise GpuRuntimeError(f"the CUDA driver has no cuLaunchKernelEx ({e})",
                              hint="overlapped launches need a CUDA 12 or newer driver") from e
    fn.restype = ctypes.c_int
    fn.argtypes = [ctypes.POINTER(LaunchConfig), ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p]
    return fn


class LaunchError(GpuRuntimeError, RuntimeError):
    """A driver launch refused (exit 7 as every GPU fault); a RuntimeError as CuPy's own launch errors
    are, so callers that fall back on one (measure.measure_us when a graph cannot be captured) do on both."""


def _error_name(rc: int) -> str:
    """cuda.h's name of CUresult ``rc`` (cuGetErrorName), or "unknown"."""
    name = ctypes.c_char_p()
    try:
        _driver().cuGetErrorName(ctypes.c_int(rc), ctypes.byref(name))
    except (OSError, AttributeError):
        return "unknown"
    return name.value.decode("ascii", "replace") if name.value else "unknown"


_CTYPES = {np.dtype(np.int32): ctypes.c_int32, np.dtype(np.int64): ctypes.c_int64,
           np.dtype(np.uint32): ctypes.c_uint32, np.dtype(np.uint64): ctypes.c_uint64,
           np.dtype(np.float32): ctypes.c_float, np.dtype(np.float64): ctypes.c_double}


def function_ptr(func) -> int:
    """The CUfunction handle of a CuPy kernel: a RawKernel (what RawModule.get_function returns)
    holds it in ``.kernel`` (a cupy.cuda.Function, compiled for the current device), a Function
    in ``.ptr``."""
    return int(getattr(func, "kernel", func).ptr)


class PreparedLaunch:
    """``func`` (a CuPy Function) on ``grid`` x ``block`` with ``args``: CuPy arrays (passed as their
    device pointer), numpy scalars (passed by value in their own width) or numpy arrays (their
    bytes passed by value: a struct parameter of exactly that size, e.g. a descriptor table the
    kernel reads from the constant bank). The arrays are kept
    alive as long as this object; the kernel's dynamic shared-memory attribute must already allow
    ``shared_mem``. ``cooperative``: launched with cuLaunchCooperativeKernel, which refuses a grid
    whose CTAs cannot all be resident at once (a kernel with grid barriers would hang instead).
    ``overlap``: launched with programmatic dependent launch (module doc; the kernel must come from
    OVERLAP_KERNEL_FILES)."""

    def __init__(self, func, grid: tuple, block: tuple, args: tuple, shared_mem: int = 0,
                 cooperative: bool = False, overlap: bool = False) -> None:
        if cooperative and overlap:
            raise ValueError("a launch is cooperative or overlapped, not both")
        import cupy as cp

        values = []
        self._keep = []
        for a in args:
            if isinstance(a, cp.ndarray):
                values.append(ctypes.c_uint64(a.data.ptr))
                self._keep.append(a)
            elif isinstance(a, np.generic) and a.dtype in _CTYPES:
                values.append(_CTYPES[a.dtype](a.item()))
            elif isinstance(a, np.ndarray):
                values.append((ctypes.c_uint64 * -(-a.nbytes // 8)).from_buffer_copy(
                    np.ascontiguousarray(a).tobytes().ljust(-(-a.nbytes // 8) * 8, b"\0")))
            else:
                raise TypeError(f"cannot pack kernel argument of type {type(a).__name__}")
        self._values = values
        self._params = (ctypes.c_void_p * max(1, len(values)))(*[ctypes.addressof(v) for v in values])
        self._params_ptr = ctypes.addressof(self._params)
        self._func = func  # keeps the module loaded
        self._fptr = function_ptr(func)
        g = tuple(grid) + (1,) * (3 - len(grid))
        b = tuple(block) + (1,) * (3 - len(block))
        self._dims = (*g, *b, int(shared_mem))
        self._stream = cp.cuda.get_current_stream
        self._cooperative = cooperative
        self._launch = cp.cuda.driver.launchCooperativeKernel if cooperative else cp.cuda.driver.launchKernel
        self._overlap = None
        if overlap:
            self._overlap = overlap_config(g, b, shared_mem)
            self._launch_ex = _launch_kernel_ex()

    def __call__(self) -> None:
        if self._overlap is not None:
            cfg = self._overlap[0]
            cfg.hStream = self._stream().ptr or None
            rc = self._launch_ex(ctypes.byref(cfg), self._fptr, self._params_ptr, None)
            if rc != 0:
                raise LaunchError(f"cuLaunchKernelEx failed: {_error_name(rc)} (CUresult {rc})")
        elif self._cooperative:
            self._launch(self._fptr, *self._dims, self._stream().ptr, self._params_ptr)
        else:
            self._launch(self._fptr, *self._dims, self._stream().ptr, self._params_ptr, 0)


def prepared(func, grid: tuple, block: tuple, args: tuple, shared_mem: int = 0, packed: bool = True,
             cooperative: bool = False, overlap: bool = False) -> Callable[[], None]:
    """A zero-argument launch: PreparedLaunch (``packed``, where the driver call is available), else
    CuPy's own call (cheaper for a launch made once: packing costs more than it saves).
    ``cooperative`` and ``overlap`` launches are always packed (CuPy's call can make neither)."""
    import cupy as cp

    if cooperative or overlap:
        return PreparedLaunch(func, grid, block, args, shared_mem, cooperative=cooperative, overlap=overlap)
    if packed and hasattr(cp.cuda.driver, "launchKernel"):
        try:
            return PreparedLaunch(func, grid, block, args, shared_mem)
        except TypeError:
            pass
    return lambda: func(grid, block, args, shared_mem=shared_mem)
