"""The one ranking rule every pattern uses: larger magnitude first, then lower position.

Ties are common (bf16 has under 2,000 distinct magnitudes per million values), so the order must
not depend on a sort's stability or on the device. For F16, BF16 and F32 the bit pattern of a
non-negative IEEE float is monotone in its value, so ``(magnitude bits << s) | (n - 1 - position)``
is an integer key that is unique per position and orders exactly by the rule; ``topk`` or
``kthvalue`` on it is deterministic on any device. F64 magnitudes (63 bits) do not leave room for
the position, so they go through a stable descending sort instead, which applies the same rule.
"""

from __future__ import annotations

import torch

_BITS_VIEW = {torch.float16: torch.int16, torch.bfloat16: torch.int16, torch.float32: torch.int32}


#: dtype -> (integer view, bit pattern of +inf, mask clearing the sign bit)
_INF_BITS = {torch.float16: (torch.int16, 0x7C00, 0x7FFF), torch.bfloat16: (torch.int16, 0x7F80, 0x7FFF),
             torch.float32: (torch.int32, 0x7F800000, 0x7FFFFFFF)}


def check_finite(t: torch.Tensor, name: str, *, hint: str = "fix or exclude the tensor (--exclude)") -> None:
    """InvalidInputError naming the count and first position of NaN/Inf values in ``t`` (``hint``: what
    the user can do about it where the check runs)."""
    from ..errors import InvalidInputError

    # Fast path: an IEEE float is finite iff its magnitude bits are below the +inf pattern, so one
    # integer max per chunk answers for the common all-finite case without a bool copy.
    fast = _INF_BITS.get(t.dtype)
    if fast is not None and t.is_contiguous() and t.numel():
        view, inf_bits, magnitude_mask = fast
        flat = t.reshape(-1).view(view)
        step = 1 << 22
        if all(int((flat[i:i + step] & magnitude_mask).max()) < inf_bits for i in range(0, flat.numel(), step)):
            return
    bad = ~torch.isfinite(t)
    if bool(bad.any()):
        count = int(bad.sum())
        first = tuple(int(i) for i in torch.nonzero(bad)[0]) if t.dim() else ()
        raise InvalidInputError(
            f"tensor {name!r}: {count} NaN/Inf value(s), first at index {list(first)}",
            hint=hint,
        )


def magnitude_bits(t: torch.Tensor) -> torch.Tensor:
    """int64 tensor, same shape: a key monotone in |t| (exact, no rounding) for F16/BF16/F32."""
    view = _BITS_VIEW.get(t.dtype)
    if view is None:
        raise TypeError(f"no integer magnitude key for {t.dtype}")
    return t.abs().contiguous().view(view).to(torch.int64)


def ranking_keys(scores: torch.Tensor, position_bits: int) -> torch.Tensor:
    """Unique int64 keys along the last dim: larger |score| first, then lower position.

    ``scores`` is F16/BF16/F32 with last-dim length n <= 2**position_bits. Keys are >= 0.
    """
    n = scores.shape[-1]
    assert n <= (1 << position_bits)
    pos = torch.arange(n - 1, -1, -1, dtype=torch.int64)
    return (magnitude_bits(scores) << position_bits) | pos


def top_positions(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Positions (int64, ascending) of the k best entries of each row of the last dim.

    ``scores``: [..., n] floating magnitudes (non-negative values are ranked by value; callers
    may pass negative scores to rank positions below every real one). Ties: lower position wins.
    """
    n = scores.shape[-1]
    if k == n:
        return torch.arange(n).expand(*scores.shape[:-1], n).clone()
    if scores.dtype in _BITS_VIEW and bool((scores >= 0).all()):
        keys = ranking_keys(scores, max(1, (n - 1).bit_length()))
        idx = torch.topk(keys, k, dim=-1, sorted=False).indices
    else:
        order = torch.sort(scores.to(torch.float64), dim=-1, descending=True, stable=True).indices
        idx = order[..., :k]
    return torch.sort(idx, dim=-1).values
