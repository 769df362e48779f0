"""GPU runtime: packed layers as operators on a CUDA device (CuPy RawKernels).

The only package that imports CuPy, and only lazily: ``import balprune.runtime`` works on a machine
without CuPy or a GPU; ``load`` (and building an operator) raises NoGpuError with the cause there.
Host-side validation (``validate_balanced``) needs neither.
"""

from __future__ import annotations

from pathlib import Path

from .balanced import BalancedLinear, interleave_rows, kernel_name, kernel_variants, validate_balanced
from .dense import DenseLinear


def load(path: str | Path, device: int = 0, **options) -> dict:
    """Open a packed file and return {tensor name: operator} for its pruned layers.

    Balanced layers in float32/float16/bfloat16 become BalancedLinear (``options`` go to it:
    layout, staging, threads); other pruned layers (unstructured, block, float64 balanced) become
    a DenseLinear fallback computing on their dense-with-zeros matrix. Tensors stored dense
    (biases, norms, layers left unpruned) are not operators and are left out. Conv weights run as
    their [C_out, C_in*kh*kw] matrix. Raises NoGpuError without CuPy or a GPU (checked before the
    file is read), FormatError / InvalidInputError for a bad file.
    """
    from ..formats.base import as_matrix
    from ..formats.packed_file import read_packed
    from . import _gpu

    _gpu.require_device(device)
    pf = read_packed(path)
    ops: dict = {}
    for name in pf.names():
        entry = pf.manifest["tensors"][name]
        if entry["pattern"] == "dense":
            continue
        obj = pf.load(name)
        if entry["pattern"] == "balanced" and entry["dtype"] in ("F32", "F16", "BF16"):
            ops[name] = BalancedLinear.from_tensor(obj, device=device, name=name, **options)
        else:
            ops[name] = DenseLinear(as_matrix(obj.to_dense()), device=device, name=name)
    return ops


__all__ = ["BalancedLinear", "DenseLinear", "interleave_rows", "kernel_name", "kernel_variants", "load",
           "validate_balanced"]
