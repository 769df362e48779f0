"""What every packed-tensor class provides: the dense <-> matrix view, part checks, and the
memory check every allocation a packed file asks for goes through."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..container import CODE_FROM_TORCH, TORCH_FROM_CODE
from ..errors import FormatError

#: dtypes a packed tensor's values may have (FORMAT.md: F32/F16/BF16/F64).
VALUE_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)

#: Entries per chunk when a validator walks an index array: bounds its int64 temporaries (128 MiB).
CHECK_CHUNK_ENTRIES = 1 << 24


def as_matrix(dense: torch.Tensor) -> torch.Tensor:
    """The [rows, cols] view a pattern prunes: 2-D as is; N-D (conv) as [shape[0], prod(rest)]."""
    return dense.reshape(dense.shape[0], -1)


@dataclass(frozen=True)
class PartSpec:
    """The dtype code and shape a part must have, derived from the manifest alone."""

    dtype: str
    shape: tuple[int, ...]


def torch_dtype(code: str, name: str) -> torch.dtype:
    try:
        return TORCH_FROM_CODE[code]
    except KeyError:
        raise FormatError(f"manifest entry {name!r}: dtype {code!r} is not a prunable float type") from None


def code_of(dtype: torch.dtype) -> str:
    return CODE_FROM_TORCH[dtype]


def check_part(name: str, part: str, tensor: torch.Tensor, spec: PartSpec) -> None:
    if code_of(tensor.dtype) != spec.dtype or tuple(tensor.shape) != spec.shape:
        raise FormatError(
            f"tensor {name!r} part {part!r}: is {code_of(tensor.dtype)} {list(tensor.shape)}, "
            f"manifest says {spec.dtype} {list(spec.shape)}"
        )


def check_finite_values(where: str, values: torch.Tensor) -> None:
    """FormatError ``<where>: stored values hold NaN/Inf`` unless every value is finite (chunked)."""
    flat = values.reshape(-1)
    for a in range(0, flat.numel(), CHECK_CHUNK_ENTRIES):
        if not bool(torch.isfinite(flat[a:a + CHECK_CHUNK_ENTRIES]).all()):
            raise FormatError(f"{where}: stored values hold NaN/Inf")


def positive_int(v, what: str) -> int:
    """``v`` as an int >= 1 (Python or numpy integer, never a bool); FormatError naming ``what`` otherwise."""
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or int(v) < 1:
        raise FormatError(f"{what} must be a positive int, got {v!r}")
    return int(v)


