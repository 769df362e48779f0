"""Plain helpers for tests (importable as `from helpers import ...`)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def run_subprocess(*args: str, **kw) -> subprocess.CompletedProcess:
    """Run `python -m balprune ARGS` in a fresh interpreter (for exit codes and signals)."""
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"))
    return subprocess.run([sys.executable, "-m", "balprune", *map(str, args)], capture_output=True, text=True,
                          env=env, **kw)


def small_state_dict(seed: int = 0, dtype=torch.float32) -> dict[str, torch.Tensor]:
    """A model-like state dict: linears (ragged K), a conv, 1-D tensors, an int buffer."""
    g = torch.Generator().manual_seed(seed)
    return {
        "conv.weight": torch.randn(16, 3, 3, 3, generator=g).to(dtype),
        "conv2.weight": torch.randn(8, 16, 3, 3, generator=g).to(dtype),
        "fc1.weight": torch.randn(24, 100, generator=g).to(dtype),
        "fc1.bias": torch.randn(24, generator=g).to(dtype),
        "fc2.weight": torch.randn(10, 64, generator=g).to(dtype),
        "norm.running_mean": torch.randn(8, generator=g).to(dtype),
        "norm.num_batches_tracked": torch.tensor(7),
        "q.weight": torch.randint(-128, 127, (12, 40), generator=g, dtype=torch.int8),
    }


def gpu_skip_reason() -> str | None:
    """Why GPU tests cannot run here (None when CuPy sees a CUDA device): the skip reason they show."""
    try:
        import cupy
    except Exception as e:  # ImportError, or a CuPy wheel that does not match the driver
        return f"CuPy is not importable ({type(e).__name__}: {e})"
    try:
        n = cupy.cuda.runtime.getDeviceCount()
    except Exception as e:
        return f"no usable CUDA device ({type(e).__name__}: {e})"
    return None if n > 0 else "no CUDA device is visible"


#: Unit roundoff of each output dtype and the norm-wise bound of the GPU kernel tests.
U_OUT = {torch.float32: 2.0**-24, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}
REL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def assert_within_rounding(y: torch.Tensor, ref: torch.Tensor, absdot: torch.Tensor, n, dtype: torch.dtype) -> None:
    """The sparse kernels' error bound against a float64 reference (see the GPU test modules' docs):
    every element |y - ref| <= u_out*|ref| + n*2^-24*sum|w*x| + tiny (n: products per output, a
    number or a column of them), no non-finite output, and ||y - ref|| / ||ref|| < REL[dtype]
    (y exactly 0 where ref is all zeros)."""
    y64 = y.to(torch.float64).reshape(ref.shape)
    assert bool(torch.isfinite(y64).all()), "non-finite output (unwritten element?)"
    tiny = 2.0**-24 if dtype == torch.float16 else 1e-30
    tol = U_OUT[dtype] * ref.abs() + n * 2.0**-24 * absdot + tiny
    err = (y64 - ref).abs()
    worst = int(torch.argmax(err / tol))
    assert bool((err <= tol).all()), (f"element {worst}: got {float(y64.flatten()[worst])}, "
                                      f"ref {float(ref.flatten()[worst])}, tol {float(tol.flatten()[worst])}")
    norm = float(torch.linalg.norm(ref))
    if norm > 0:
        rel = float(torch.linalg.norm(y64 - ref)) / norm
        assert rel < REL[dtype], rel
    else:
        assert bool((y64 == 0).all())
