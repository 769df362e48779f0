"""CuPy, imported lazily, and the device facts the launch wrappers need.

Nothing here runs at import time: ``import balprune.runtime`` works without CuPy or a GPU, and the
first call that needs one raises NoGpuError naming the cause.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from ..errors import NoGpuError


def cupy():
    """The cupy module, or NoGpuError saying why it cannot be used."""
    try:
        import cupy as cp  # noqa: PLC0415 - lazy by design
    except ImportError as e:
        raise NoGpuError(f"CuPy is not importable: {e}", hint="install balprune[gpu] (cupy-cuda13x)") from e
    except Exception as e:  # a wrong CuPy wheel for the driver can fail with other errors at import
        raise NoGpuError(f"CuPy failed to load: {type(e).__name__}: {e}") from e
    return cp


def require_device(device: int) -> int:
    """Check that CUDA device ``device`` exists and can be used; returns it as an int."""
    cp = cupy()
    if isinstance(device, bool) or not isinstance(device, int) or device < 0:
        raise NoGpuError(f"device must be a non-negative int, got {device!r}")
    try:
        count = cp.cuda.runtime.getDeviceCount()
    except Exception as e:
        raise NoGpuError(f"no usable CUDA device: {type(e).__name__}: {e}",
                         hint="check the driver and CUDA_VISIBLE_DEVICES") from e
    if count == 0:
        raise NoGpuError("no CUDA device is visible", hint="check CUDA_VISIBLE_DEVICES")
    if device >= count:
        raise NoGpuError(f"CUDA device {device} does not exist ({count} visible)")
    return device


@dataclass(frozen=True)
class DeviceInfo:
    index: int
    name: str
    compute_capability: int  # e.g. 90
    multiprocessors: int
    l2_bytes: int
    smem_per_block_optin: int  # the most dynamic shared memory one CTA can be given
    smem_per_sm: int
    max_threads_per_sm: int
    regs_per_sm: int


@functools.cache
def device_info(device: int) -> DeviceInfo:
    cp = cupy()
    p = cp.cuda.runtime.getDeviceProperties(device)
    name = p["name"].decode() if isinstance(p["name"], bytes) else str(p["name"])
    return DeviceInfo(
        index=device,
        name=name,
        compute_capability=int(p["major"]) * 10 + int(p["minor"]),
        multiprocessors=int(p["multiProcessorCount"]),
        l2_bytes=int(p["l2CacheSize"]),
        smem_per_block_optin=int(p.get("sharedMemPerBlockOptin", p["sharedMemPerBlock"])),
        smem_per_sm=int(p.get("sharedMemPerMultiprocessor", p["sharedMemPerBlock"])),
        max_threads_per_sm=int(p.get("maxThreadsPerMultiProcessor", 2048)),
        regs_per_sm=int(p.get("regsPerMultiprocessor", 65536)),
    )


def as_cupy(t):
    """A CuPy view of a CUDA torch tensor (no copy); bfloat16 as its uint16 bits (CuPy has no bfloat16)."""
    import torch

    cp = cupy()
    return cp.from_dlpack(t.view(torch.int16)).view(cp.uint16) if t.dtype == torch.bfloat16 else cp.from_dlpack(t)


def as_torch(a, dtype=None):
    """A torch view of a CuPy array (no copy); uint16 bits read as ``dtype`` torch.bfloat16 when given so."""
    import torch

    t = torch.from_dlpack(a)
    return t.view(torch.bfloat16) if dtype == torch.bfloat16 else t


def cupyx_sparse():
    """The cupyx.scipy.sparse module (cuSPARSE through CuPy), or NoGpuError saying why it cannot be used."""
    cupy()
    import cupyx.scipy.sparse as cps  # noqa: PLC0415 - lazy by design

    return cps


def is_torch_tensor(x) -> bool:
    return type(x).__module__.startswith("torch") and hasattr(x, "is_cuda")
