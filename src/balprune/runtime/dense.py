"""A dense fallback operator: y = W x through CuPy's matmul (cuBLAS), for layers with no sparse kernel yet.

Same call contract as BalancedLinear: x [cols] or [cols, N] in the layer's dtype (CuPy array, or
torch CUDA tensor), C-contiguous, on the layer's device. bfloat16 layers are held and computed in
float32 (CuPy has no bfloat16) and take / return bfloat16 as torch tensors or uint16 bit arrays.
"""

from __future__ import annotations

import numpy as np
import torch

from ..errors import UsageError

_NAME = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16", torch.float64: "float64"}


class DenseLinear:
    def __init__(self, matrix: torch.Tensor, *, device: int = 0, name: str = "tensor") -> None:
        from . import _gpu

        if not isinstance(matrix, torch.Tensor) or matrix.dim() != 2 or matrix.dtype not in _NAME:
            raise UsageError(f"{name}: DenseLinear needs a 2-D float torch tensor")
        cp = _gpu.cupy()
        self.device = _gpu.require_device(device)
        self.name = name
        self.rows, self.cols = (int(d) for d in matrix.shape)
        self.dtype = _NAME[matrix.dtype]
        host = matrix.detach().cpu().contiguous()
        if self.dtype == "bfloat16":
            host = host.to(torch.float32)
        with cp.cuda.Device(self.device):
            self.matrix_dev = cp.asarray(host.numpy())

    @property
    def weight_bytes(self) -> int:
        return int(self.matrix_dev.nbytes)

    def __call__(self, x, out=None):
        from . import _gpu

        cp = _gpu.cupy()
        tx = x if _gpu.is_torch_tensor(x) else None
        if tx is not None:
            if not x.is_cuda or x.device.index != self.device:
                raise UsageError(f"{self.name}: x is on {x.device}, the layer on cuda:{self.device}")
            if _NAME.get(x.dtype) != self.dtype:
                raise UsageError(f"{self.name}: x dtype {x.dtype} does not match the layer's {self.dtype}")
            if not x.is_contiguous():
                raise UsageError(f"{self.name}: x must be C-contiguous")
            x = cp.from_dlpack(x.view(torch.int16)).view(cp.uint16) if x.dtype == torch.bfloat16 else cp.from_dlpack(x)
        elif not isinstance(x, cp.ndarray):
            raise UsageError(f"{self.name}: x must be a CuPy array or a torch CUDA tensor")
        want = np.dtype("uint16" if self.dtype == "bfloat16" else self.dtype)
        if x.dtype != want or not x.flags.c_contiguous or x.ndim not in (1, 2) or x.shape[0] != self.cols \
                or x.device.id != self.device:
            raise UsageError(f"{self.name}: x must be a C-contiguous {want} array of shape [{self.cols}] or "
                             f"[{self.cols}, N] on device {self.device}")
        with cp.cuda.Device(self.device):
            if self.dtype == "bfloat16":
                xf = (x.astype(cp.uint32) << 16).view(cp.float32)
                yf = self.matrix_dev @ xf
                bits = yf.view(cp.uint32)
                y = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(cp.uint16)  # round to nearest even
            else:
                y = self.matrix_dev @ x
            if out is not None:
                out[...] = y
                y = out
        if tx is None:
            return y
        if self.dtype == "bfloat16":
            return torch.from_dlpack(y.view(cp.int16)).view(torch.bfloat16)
        return torch.from_dlpack(y)

    def __repr__(self) -> str:
        return f"DenseLinear({self.name!r}, [{self.rows}, {self.cols}], {self.dtype}, device={self.device})"
