"""The packed format v1 (FORMAT.md): one class per pattern, exact from_dense / to_dense inverses.

``PACKED_CLASSES`` maps a manifest entry's ``pattern`` to its class; every class offers
``from_parts(entry, parts, name)``, ``part_specs(entry, name)`` (the manifest entry typed and its
parts' dtypes and shapes derived), ``parts()``, ``manifest()``, ``sparsity_achieved()``,
``to_dense(name)`` (its size checked against memory first) and ``check(name)``, which runs the
pattern's one validator (``check_balanced_arrays``, ``check_csr_arrays``, ``check_bsr_arrays``; the
GPU runtime's host validation calls the same functions).
"""

from .balanced import BalancedTensor, balanced_entry
from .bsr import BsrTensor, bsr_entry
from .csr import CsrTensor, csr_entry

PACKED_CLASSES = {"balanced": BalancedTensor, "unstructured": CsrTensor, "block": BsrTensor}

__all__ = ["PACKED_CLASSES", "BalancedTensor", "BsrTensor", "CsrTensor", "balanced_entry", "bsr_entry", "csr_entry"]
