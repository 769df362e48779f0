"""What every sparse operator of the runtime shares: the value types and the call contract.

A subclass holds one matrix on a device and defines ``rows``, ``cols``, ``dtype`` (a key of
STORAGE), ``device``, ``name`` and ``_configs`` (a dict), and implements
``_launch_config(batch) -> dict`` (with kernel, grid, block, shared_mem) and
``_launch_args(x, y, batch, cfg) -> tuple`` (the kernel's arguments up to y; every sparse kernel
then takes the epilogue's bias pointer and act flag, which this class appends). This class gives it
``launch_config`` (cached), ``prepared_launch`` and ``__call__``: x of shape [cols] or [cols, N] as a CuPy
array or a torch CUDA tensor (via DLPack) on the operator's device, in its dtype (bfloat16 as a
torch tensor, or as a CuPy uint16 array of its bits), C-contiguous; returns [rows] / [rows, N] of
the same kind; every check happens before the launch.
"""

from __future__ import annotations

import numpy as np
import torch

from ..errors import UsageError

VALUE_DTYPES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}
#: Device storage dtype (numpy name) and kernel type name of each value dtype. bfloat16 travels
#: as its raw bits (uint16): CuPy has no bfloat16.
STORAGE = {"float32": ("float32", "float"), "float16": ("float16", "bp::f16"), "bfloat16": ("uint16", "bp::bf16")}
TORCH_OF = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class SparseLinear:
    """Base of BalancedLinear and BsrLinear (see the module doc for the contract)."""

    def _compiled(self, key, filename: str, name: str, smem: int = 0):
        """The kernel ``name`` of kernels/``filename`` built for this layer's device and ``defines``
        (cached per ``key`` on the operator; runtime.kernels caches the module), with its dynamic
        shared-memory limit raised to ``smem`` where that plus the build's static shared memory passes the
        48 KB a launch gets by default."""
        k = self._kernels.get(key)
        if k is None:
            from .kernels import load_module

            k = load_module(filename, (name,), device=self.device, defines=self.defines).get_function(name)
            self._kernels[key] = k
        if smem + k.shared_size_bytes > 48 * 1024 and k.max_dynamic_shared_size_bytes < smem:
            k.max_dynamic_shared_size_bytes = smem
        return k

    def launch_config(self, batch: int) -> dict:
        """Grid, block, shared memory and kernel of a launch for ``batch`` columns (cached)."""
        cfg = self._configs.get(batch)
        if cfg is None:
            cfg = self._configs[batch] = self._launch_config(batch)
        return cfg

    def prepared_launch(self, x, y, batch: int, packed: bool = True, *, bias=None, relu: bool = False,
                        overlap: bool = False):
        """A zero-argument callable launching y = act(W x + bias) on CuPy arrays already checked by
        the caller.

        For timing loops and models: no per-call checks, arguments built once. ``x`` [cols] /
        [cols, batch] and ``y`` [rows] / [rows, batch], C-contiguous, in the layer's storage dtype.
        ``bias``: None or a C-contiguous float32 CuPy array [rows] on the layer's device, added to
        every column of a row; ``relu``: clamp at 0 after it. Both happen in the kernel's fp32
        epilogue, before the one rounding to the storage dtype (no extra launch).
        ``packed`` (default): the arguments are packed once and each call is one driver launch
        (runtime._launch); False: CuPy's own call, for a single launch. ``overlap``: a programmatic
        dependent launch (runtime._launch; every sparse kernel opens with bp::overlap_prologue).
        """
        from ._launch import prepared

        cfg = self.launch_config(batch)
        args = self._launch_args(x, y, batch, cfg) + self._epilogue_args(bias, relu)
        return prepared(cfg["kernel"], cfg["grid"], cfg["block"], args, cfg["shared_mem"], packed=packed,
                        overlap=overlap)

    def _epilogue_args(self, bias, relu: bool) -> tuple:
        """The two trailing kernel arguments every sparse kernel takes (bp::epilogue): bias pointer
        (0: none) and act (0 identity, 1 ReLU)."""
        if bias is None:
            return (np.uint64(0), np.int32(1 if relu else 0))
        from . import _gpu

        cp = _gpu.cupy()
        if not isinstance(bias, cp.ndarray) or bias.dtype != np.float32 or bias.shape != (self.rows,) \
                or not bias.flags.c_contiguous or bias.device.id != self.device:
            raise UsageError(f"{self.name}: bias must be a C-contiguous float32 CuPy array of shape "
                             f"[{self.rows}] on device {self.device}")
        return (bias, np.int32(1 if relu else 0))

    # -- the call ----------------------------------------------------------------------------------

    def _check_input(self, x):
        """(cupy view of x, batch, torch-or-None) after checking dtype, device, contiguity, shape."""
        from . import _gpu

        cp = _gpu.cupy()
        tx = None
        if _gpu.is_torch_tensor(x):
            tx = x
            if not x.is_cuda or x.device.index != self.device:
                raise UsageError(f"{self.name}: x is on {x.device}, the layer on cuda:{self.device}")
            if x.dtype != TORCH_OF[self.dtype]:
                raise UsageError(f"{self.name}: x dtype {x.dtype} does not match the layer's {self.dtype}")
            if not x.is_contiguous():
                raise UsageError(f"{self.name}: x must be C-contiguous")
            x = cp.from_dlpack(x.view(torch.int16)).view(cp.uint16) if x.dtype == torch.bfloat16 \
                else cp.from_dlpack(x)
        elif isinstance(x, cp.ndarray):
            if x.device.id != self.device:
                raise UsageError(f"{self.name}: x is on device {x.device.id}, the layer on {self.device}")
            want = STORAGE[self.dtype][0]
            if x.dtype != np.dtype(want):
                raise UsageError(f"{self.name}: x dtype {x.dtype} does not match the layer's {self.dtype}"
                                 + (" (pass bfloat16 as uint16 bits)" if self.dtype == "bfloat16" else ""))
            if not x.flags.c_contiguous:
                raise UsageError(f"{self.name}: x must be C-contiguous")
        else:
            raise UsageError(f"{self.name}: x must be a CuPy array or a torch CUDA tensor, got {type(x).__name__}")
        if x.ndim not in (1, 2) or x.shape[0] != self.cols or (x.ndim == 2 and x.shape[1] < 1):
            raise UsageError(f"{self.name}: x shape {list(x.shape)} is not [{self.cols}] or [{self.cols}, N>=1]")
        return x, (1 if x.ndim == 1 else int(x.shape[1])), tx

    def __call__(self, x, out=None):
        """y = W x. ``out`` (optional): a C-contiguous CuPy array of the result's shape and dtype."""
        from . import _gpu

        cp = _gpu.cupy()
        xc, batch, tx = self._check_input(x)
        shape = (self.rows,) if xc.ndim == 1 else (self.rows, batch)
        storage = np.dtype(STORAGE[self.dtype][0])
        if out is not None:
            if not isinstance(out, cp.ndarray) or out.shape != shape or out.dtype != storage \
                    or not out.flags.c_contiguous or out.device.id != self.device:
                raise UsageError(f"{self.name}: out must be a C-contiguous {storage} CuPy array of shape "
                                 f"{list(shape)} on device {self.device}")
        stream = None
        if tx is not None:
            stream = cp.cuda.ExternalStream(torch.cuda.current_stream(self.device).cuda_stream, self.device)
        with cp.cuda.Device(self.device):
            if stream is not None:
                with stream:
                    y = self._launch(xc, batch, shape, storage, out)
            else:
                y = self._launch(xc, batch, shape, storage, out)
        if tx is None:
            return y
        if self.dtype == "bfloat16":
            return torch.from_dlpack(y.view(cp.int16)).view(torch.bfloat16)
        return torch.from_dlpack(y)

    def _launch(self, xc, batch: int, shape, storage, out):
        from . import _gpu

        cp = _gpu.cupy()
        y = cp.empty(shape, dtype=storage) if out is None else out
        self.prepared_launch(xc, y, batch, packed=False)()  # one launch: packing would cost more than it saves
        return y
