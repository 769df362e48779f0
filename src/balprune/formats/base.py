"""What every packed-tensor class provides, and the shared dense <-> matrix view."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..container import CODE_FROM_TORCH, TORCH_FROM_CODE
from ..errors import FormatError


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


def check_finite_values(name: str, values: torch.Tensor) -> None:
    if values.numel() and not bool(torch.isfinite(values).all()):
        raise FormatError(f"tensor {name!r}: stored values hold NaN/Inf")
