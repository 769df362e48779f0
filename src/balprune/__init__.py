"""balprune: Balanced Sparsity (Yao et al., AAAI 2019) pruning, packing and batch-1 GPU inference.

``import balprune`` never touches a GPU and never imports CuPy; only ``balprune.runtime`` does,
lazily, when asked to.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
