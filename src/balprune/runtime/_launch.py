"""Kernel launches with their arguments packed once: each call is one cuLaunchKernel.

CuPy's ``Function.__call__`` converts every argument on every launch (5-10 us of host time for a
dozen arguments). A model step is dozens to hundreds of launches of the same kernels on the same
buffers, so eagerly run models were host-bound (a Bi-LSTM utterance: 400+ launches). Here the
arguments are packed into a ctypes parameter array at build time and the call passes that array
to the driver on the current CuPy stream, which is where CuPy itself would launch.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable

import numpy as np

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
    whose CTAs cannot all be resident at once (a kernel with grid barriers would hang instead)."""

    def __init__(self, func, grid: tuple, block: tuple, args: tuple, shared_mem: int = 0,
                 cooperative: bool = False) -> None:
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

    def __call__(self) -> None:
        if self._cooperative:
            self._launch(self._fptr, *self._dims, self._stream().ptr, self._params_ptr)
        else:
            self._launch(self._fptr, *self._dims, self._stream().ptr, self._params_ptr, 0)


def prepared(func, grid: tuple, block: tuple, args: tuple, shared_mem: int = 0, packed: bool = True,
             cooperative: bool = False) -> Callable[[], None]:
    """A zero-argument launch: PreparedLaunch (``packed``, where the driver call is available), else
    CuPy's own call (cheaper for a launch made once: packing costs more than it saves).
    ``cooperative`` launches are always packed (CuPy's call cannot make one for a module function)."""
    import cupy as cp

    if cooperative:
        return PreparedLaunch(func, grid, block, args, shared_mem, cooperative=True)
    if packed and hasattr(cp.cuda.driver, "launchKernel"):
        try:
            return PreparedLaunch(func, grid, block, args, shared_mem)
        except TypeError:
            pass
    return lambda: func(grid, block, args, shared_mem=shared_mem)
