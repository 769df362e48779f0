"""End-to-end packed-model runtimes at batch 1: the LSTM language model, the Bi-LSTM acoustic
model and VGG, built from a packed file with every stage on the path measured fastest on this GPU
(balprune's kernel, the same masked matrix through cuBLAS / cuDNN, or for an LSTM's steps one
persistent kernel for all of them).

``load_model(path)`` reads the file, recognises the architecture (balprune.models.detect), builds
the runtime and returns it; ``model.forward(inputs)`` answers one request (compare it with
balprune.models.reference_outputs), ``model.run()`` is one unit of work on static buffers and
``model.capture()`` its CUDA graph; ``model.choices`` says which path each layer took and why.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ...errors import InvalidInputError
from .._linear import TORCH_OF
from .base import PackedModel
from .lstm import PackedBiLstm, PackedLstmLm
from .stages import Choice, Projection, dispatch
from .vgg import PackedVgg


def load_model(path: str | Path, *, dtype: str = "float16", device: int = 0, paths: str = "auto",
               measure: bool = True, frames: int = 50, progress=None) -> PackedModel:
    """Build the runtime of the packed model at ``path`` (see module doc).

    ``dtype``: float32, float16 or bfloat16: weights are cast from the file's dtype (the mask and
    indices as stored), activations are that dtype, accumulation fp32. ``paths``: "auto"
    (fastest correct per layer), "sparse" (balprune's kernel wherever the layer has one) or
    "dense". ``measure=False`` skips timing (auto then takes the sparse path where there is one).
    ``frames``: the utterance length a ctc-bilstm runtime is built for.

    Order: the whole file is verified first (formats.packed_file.verify_packed: FormatError /
    InvalidInputError, exit 4, for any malformed field or out-of-range index, with no GPU needed),
    then the architecture recognised (InvalidInputError when it is not a built-in one), then the
    GPU probed (NoGpuError). The builders read every tensor through ``PackedFile.load``, which
    checks it again on the bytes it returns, so nothing unchecked is densified or uploaded.
    """
    from ...formats.packed_file import verify_packed
    from ...models import detect
    from .. import _gpu

    pf = verify_packed(path)
    arch = detect(pf)
    if dtype in TORCH_OF:
        _check_representable(pf, TORCH_OF[dtype], dtype)
    _gpu.require_device(device)
    common = {"dtype": dtype, "device": device, "paths": paths, "measure": measure, "progress": progress}
    if arch.kind == "lstm-lm":
        return PackedLstmLm(pf, arch, **common)
    if arch.kind == "ctc-bilstm":
        return PackedBiLstm(pf, arch, frames=frames, **common)
    return PackedVgg(pf, arch, **common)


def _check_representable(pf, tdt: torch.dtype, dtype: str) -> None:
    """InvalidInputError (exit 4) when a stored weight is beyond ``dtype``'s largest finite value.

    The runtime casts the file's values to the requested dtype; an fp32 weight of 7e4 becomes inf in
    float16, and the failure would surface later as "stored values hold NaN/Inf" or as a model outside
    its tolerance. Checked on the stored values (packed values, or the dense tensor), in chunks.
    """
    limit = torch.finfo(tdt).max
    for name in pf.names():
        t = pf.load(name)
        values = t if isinstance(t, torch.Tensor) else getattr(t, "values", None)
        if not isinstance(values, torch.Tensor) or not values.is_floating_point():
            continue
        if torch.finfo(values.dtype).max <= limit:
            continue
        flat = values.reshape(-1)
        peak = 0.0
        for a in range(0, flat.numel(), 1 << 24):
            peak = max(peak, float(flat[a:a + (1 << 24)].abs().max()))
        if peak > limit:
            raise InvalidInputError(f"tensor {name!r}: weights up to |w| = {peak:.4g} exceed {dtype}'s largest finite "
                                    f"value {limit:.6g}", hint="run it at float32 or bfloat16 (--dtype)")


__all__ = ["Choice", "PackedBiLstm", "PackedLstmLm", "PackedModel", "PackedVgg", "Projection",
           "dispatch", "load_model"]
