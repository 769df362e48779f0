"""GPU runtime: packed layers as operators on a CUDA device (CuPy RawKernels).

The only package that imports CuPy, and only lazily: ``import balprune.runtime`` works on a machine
without CuPy or a GPU; ``load`` (and building an operator) raises NoGpuError with the cause there.
Host-side validation (``validate_balanced``, ``validate_bsr``) needs neither.
"""

from __future__ import annotations

from pathlib import Path

from ..patterns.registry import ENCODINGS
from .balanced import BalancedLinear, interleave_rows, kernel_name, kernel_variants, operator_for, validate_balanced
from .bsr import BsrLinear, validate_bsr
from .dense import DenseLinear


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
    fallback's size is checked against host memory first. Which builder makes an encoding's operator,
    for which dtypes and with which options, is its record in patterns.registry (``ENCODINGS``).
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
        # the encoding's own operator: balanced -> runtime.balanced.operator_for, every BSR-packed tensor
        # ("block", and "vector" whose 1 x V tiles pack the same way) -> BsrLinear; unstructured: none
        enc = ENCODINGS[entry["pattern"]]
        if enc.operator is not None and entry["dtype"] in enc.operator_dtypes:
            # obj comes from PackedFile.load, checked on the bytes it returned: not checked twice
            ops[name] = enc.operator(obj, device=device, name=name, **{"validate": False, **enc.operator_kwargs(options)})
        else:
            ops[name] = DenseLinear(as_matrix(obj.to_dense(name)), device=device, name=name)
    return ops


__all__ = ["BalancedLinear", "BsrLinear", "DenseLinear", "interleave_rows", "kernel_name", "kernel_variants", "load",
           "operator_for",
           "validate_balanced", "validate_bsr"]
