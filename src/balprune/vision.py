"""torchvision, importable wherever torch is: the one place balprune imports it from.

balprune uses torchvision's pure-Python parts only: the VGG model definitions
(``torchvision.models.vgg``) and ``datasets.ImageFolder`` / ``transforms``. None of them calls
torchvision's compiled operators (nms, roi_align, ...).

Why this module exists: the Linux torchvision wheels on PyPI are CUDA builds. Next to a CPU-only
torch (the small install CI and laptops use) their compiled extension cannot load
(``libtorch_cuda.so`` is missing); torchvision notices and disables its operators, but its
``__init__`` then registers fake kernels for ``torchvision::nms`` and ``torchvision::qnms``
without checking, and ``import torchvision`` fails with "operator torchvision::nms does not
exist". :func:`torchvision` imports it normally; only when exactly that failure happens does it
declare those operator schemas (names and signatures, no kernels) and import again. Calling one
of the compiled operators then still fails with torchvision's own "Couldn't load custom C++ ops"
error, as it would on any install without them; nothing else changes. With a torchvision whose
extension loads (any GPU install), this module does nothing beyond the import.
"""

from __future__ import annotations

import sys
import types

# The operators torchvision's import registers fake kernels for without checking that its
# extension loaded, with the schemas its C++ extension declares.
_UNCHECKED_OPS = {
    "nms": "(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms": "(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
}


def torchvision() -> types.ModuleType:
    """The ``torchvision`` module, imported (see the module docstring for the CPU-torch case).

    Raises ImportError when torchvision is not installed, and any other import failure as is.
    """
    try:
        import torchvision as tv

        return tv
    except RuntimeError as exc:
        if not _is_missing_operator_failure(exc):
            raise
    _forget_partial_import()
    _declare_unchecked_ops()
    import torchvision as tv

    return tv


def _is_missing_operator_failure(exc: RuntimeError) -> bool:
    return any(f"torchvision::{name} does not exist" in str(exc) for name in _UNCHECKED_OPS)


def _forget_partial_import() -> None:
    # The failed import left half-initialised torchvision modules behind; a second import must
    # run the package from the start.
    for name in [n for n in sys.modules if n == "torchvision" or n.startswith("torchvision.")]:
        del sys.modules[name]


def _declare_unchecked_ops() -> None:
    import torch

    for name, schema in _UNCHECKED_OPS.items():
        if not hasattr(torch.ops.torchvision, name):
            torch.library.define(f"torchvision::{name}", schema)
