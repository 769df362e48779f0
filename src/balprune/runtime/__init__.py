"""GPU runtime: packed layers as operators on a CUDA device (CuPy RawKernels).

The only package that imports CuPy, and only lazily: ``import balprune.runtime`` works on a machine
without CuPy or a GPU; ``load`` (and building an operator) raises NoGpuError with the cause there.
Host-side validation (``validate_balanced``, ``validate_bsr``) needs neither.
"""

from __future__ import annotations

from pathlib import Path

from .balanced import BalancedLinear, interleave_rows, kernel_name, kernel_variants, validate_balanced
from .bsr import BsrLinear, validate_bsr
from .dense import DenseLinear

#: load() options BsrLinear also takes (the others are BalancedLinear's own).
_BSR_OPTIONS = ("threads", "defines", "team_lanes")


def load(path: str | Path, device: int = 0, **options) -> dict:
    """Open a packed file and return {tensor name: operator} for its pruned layers.

    Balanced layers in float32/float16/bfloat16 become BalancedLinear (``options`` go to it:
    layout, staging, threads, ...); BSR-packed layers (block, vector) in those dtypes become BsrLinear (it takes
    the options ``threads`` (a power of two there), ``defines`` and ``team_lanes``; ``team_lanes``
    is not given to BalancedLinear); other pruned layers (unstructured, float64) become a DenseLinear fallback
    computing on their dense-with-zeros matrix. Tensors stored dense
    (biases, norms, layers left unpruned) are not operators and are left out. Conv weights run as
    their [C_out, C_in*kh*kw] matrix. Raises NoGpuError without CuPy or a GPU (checked before the
    file is read), FormatError / InvalidInputError for a bad file: every layer comes from
    ``PackedFile.load``, which checks it completely (formats' validators, the same code
    validate_balanced / validate_bsr run) before anything is densified or uploaded, and a dense
    fallback's size is checked against host memory first.
    """
    from ..formats.base import as_matrix
    from ..formats.bsr import BsrTensor
    from ..formats.packed_file import read_packed
    from . import _gpu

    _gpu.require_device(device)
    pf = read_packed(path)
    ops: dict = {}
    balanced_options = {k: v for k, v in options.items() if k != "team_lanes"}
    bsr_options = {k: v for k, v in options.items() if k in _BSR_OPTIONS}
    for name in pf.names():
        entry = pf.manifest["tensors"][name]
        if entry["pattern"] == "dense":
            continue
        obj = pf.load(name)
        if entry["pattern"] == "balanced" and entry["dtype"] in ("F32", "F16", "BF16"):
            # obj comes from PackedFile.load, checked on the bytes it returned: not checked twice
            ops[name] = BalancedLinear.from_tensor(obj, device=device, name=name, **{"validate": False, **balanced_options})
        elif isinstance(obj, BsrTensor) and entry["dtype"] in ("F32", "F16", "BF16"):
            # every BSR-packed tensor: pattern "block", and "vector" (1 x V tiles) which packs the same way
            ops[name] = BsrLinear.from_tensor(obj, device=device, name=name, **{"validate": False, **bsr_options})
        else:
            ops[name] = DenseLinear(as_matrix(obj.to_dense(name)), device=device, name=name)
    return ops


__all__ = ["BalancedLinear", "BsrLinear", "DenseLinear", "interleave_rows", "kernel_name", "kernel_variants", "load",
           "validate_balanced", "validate_bsr"]
