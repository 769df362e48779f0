"""Pure tensor -> mask functions, one module per pattern; no I/O, no state."""

from .balanced import BalancedGeometry, balanced_mask, balanced_offsets, geometry_for
from .block import block_mask
from .unstructured import unstructured_mask
from .vector import vector_mask, vector_shape

__all__ = ["BalancedGeometry", "balanced_mask", "balanced_offsets", "block_mask", "geometry_for", "unstructured_mask",
           "vector_mask", "vector_shape"]
