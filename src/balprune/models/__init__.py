"""End-to-end models from packed files: recognise a built-in architecture and build its dense reference.

``detect`` (arch.py) reads only a packed file's manifest; ``reference_module`` (reference.py) is the
dense masked torch model the GPU runtime is checked against and timed with. CPU-only: nothing here
imports CuPy.
"""

from __future__ import annotations

from .arch import Architecture, ConvRef, LinearRef, LstmCellRef, detect, stored_name
from .reference import TOLERANCE, reference_module, reference_outputs, relative_error, sample_inputs

__all__ = [
    "Architecture", "ConvRef", "LinearRef", "LstmCellRef", "TOLERANCE", "detect", "reference_module",
    "reference_outputs", "relative_error", "sample_inputs", "stored_name",
]
