"""The packed format v1 (FORMAT.md): one class per pattern, exact from_dense / to_dense inverses.

``PACKED_CLASSES`` maps a manifest entry's ``pattern`` to its class; every class offers
``from_parts(entry, parts, name)``, ``part_specs(entry, name)``, ``parts()``, ``manifest()``,
``to_dense()`` and ``check(name)``.
"""

from .balanced import BalancedTensor, balanced_entry
from .bsr import BsrTensor, bsr_entry
from .csr import CsrTensor, csr_entry

PACKED_CLASSES = {"balanced": BalancedTensor, "unstructured": CsrTensor, "block": BsrTensor}

__all__ = ["PACKED_CLASSES", "BalancedTensor", "BsrTensor", "CsrTensor", "balanced_entry", "bsr_entry", "csr_entry"]
