"""End-to-end packed-model runtimes at batch 1: the LSTM language model, the Bi-LSTM acoustic
model, VGG and ResNet, built from a packed file with every stage on the path measured fastest on this GPU
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
from ...patterns.ranking import check_finite
from .._linear import TORCH_OF
from .base import PackedImageModel, PackedModel
from .lstm import PackedBiLstm, PackedLstmLm
from .resnet import PackedResNet
from .stages import Choice, Projection, dispatch
from .vgg import PackedVgg

#: The recognised architectures (models.arch.KINDS) this runtime builds, and the class of each.
RUNTIMES = {"lstm-lm": PackedLstmLm, "ctc-bilstm": PackedBiLstm, "vgg": PackedVgg, "resnet": PackedResNet}
RUNTIME_KINDS = tuple(RUNTIMES)
#: Float dtypes a packed model's tensors may hold for the runtime: those it runs in, and float64 (converted);
#: preflight refuses the others (float8) by name.
READABLE_FLOATS = (*TORCH_OF.values(), torch.float64)


def preflight(path: str | Path, dtypes: tuple[str, ...]):
    """(PackedFile, Architecture) of a packed model, checked for every runtime dtype in ``dtypes``, in one
    pass over the file and before any GPU is looked for: the whole file verified
    (formats.packed_file.verify_packed: FormatError / InvalidInputError, exit 4, for any malformed
    field or out-of-range index), every stored float finite and within each dtype's finite range (the runtime
    casts to it: an fp32 weight of 7e4 would be inf in float16; InvalidInputError naming the tensor,
    the figure and the dtype), the architecture recognised (InvalidInputError when it is not a
    built-in one, or one without a runtime here: RUNTIME_KINDS). ``bench --model`` runs it once for all
    its dtypes and hands the result to load_model.
    """
    from ...formats.packed_file import verify_packed
    from ...models import detect

    limits = sorted((torch.finfo(TORCH_OF[d]).max, d) for d in dict.fromkeys(dtypes) if d in TORCH_OF)

    def in_range(name: str, obj) -> None:
        values = obj if isinstance(obj, torch.Tensor) else getattr(obj, "values", None)
        if not isinstance(values, torch.Tensor) or not values.is_floating_point():
            return
        if values.dtype not in READABLE_FLOATS:  # float8: torch has no isfinite / abs for it on the CPU
            readable = ", ".join(str(d).split(".")[-1] for d in READABLE_FLOATS)
            raise InvalidInputError(f"{path}: tensor {name!r} is {str(values.dtype).split('.')[-1]}; the model runtime "
                                    f"reads {readable} weights",
                                    hint="prune the checkpoint with its float8 tensors converted or excluded")
        # every stored float finite (a NaN bias passed through by prune would otherwise fail every stage's
        # gate on the GPU and read as a runtime failure, exit 7), and within each requested dtype's range
        check_finite(values, name, hint="the model runtime needs finite weights: fix the checkpoint, then prune it")
        if not limits or torch.finfo(values.dtype).max <= limits[0][0]:
            return  # every value of this dtype fits the narrowest requested one
        flat = values.reshape(-1)
        peak = 0.0
        for a in range(0, flat.numel(), 1 << 24):
            peak = max(peak, float(flat[a:a + (1 << 24)].abs().max()))
        for limit, dtype in limits:
            if peak > limit:
                raise InvalidInputError(f"{path}: tensor {name!r}: weights up to |w| = {peak:.4g} exceed {dtype}'s "
                                        f"largest finite value {limit:.6g}", hint="run it at float32 or bfloat16 (--dtype)")

    pf = verify_packed(path, each=in_range)
    arch = detect(pf)
    if arch.kind not in RUNTIME_KINDS:
        raise InvalidInputError(f"{pf.path}: {arch.name} is recognised, but the packed model runtime runs "
                                f"{', '.join(RUNTIME_KINDS)} files only so far",
                                hint="`balprune bench PACKED` (without --model) times its layers one by one")
    return pf, arch


def load_model(path: str | Path, *, dtype: str = "float16", device: int = 0, paths: str = "auto",
               measure: bool = True, frames: int = 50, progress=None, checked=None,
               activations: str = "auto") -> PackedModel:
    """Build the runtime of the packed model at ``path`` (see module doc).

    ``dtype``: float32, float16 or bfloat16: weights are cast from the file's dtype (the mask and
    indices as stored), activations are that dtype, accumulation fp32. ``paths``: "auto"
    (fastest correct per layer), "sparse" (balprune's kernel wherever the layer has one) or
    "dense". ``measure=False`` skips timing (auto then takes the sparse path where there is one).
    ``frames``: the utterance length a ctc-bilstm runtime is built for. ``activations``: the layout of a
    vision runtime's activations between its conv stages ("auto", "NCHW" or "channels-last":
    base.activation_layout); other runtimes ignore it.

    Order: ``preflight(path, (dtype,))`` (the whole file verified, the weights within ``dtype``'s
    range, the architecture recognised; exit 4 for any of them, with no GPU needed) unless
    ``checked`` is that function's result for the same file and a dtype set including ``dtype``; then
    the GPU probed (NoGpuError). The builders read every tensor through ``PackedFile.load``, which
    checks it again on the bytes it returns, so nothing unchecked is densified or uploaded.
    """
    from .. import _gpu

    pf, arch = checked if checked is not None else preflight(path, (dtype,))
    _gpu.require_device(device)
    common = {"dtype": dtype, "device": device, "paths": paths, "measure": measure, "progress": progress}
    if arch.kind == "ctc-bilstm":
        return PackedBiLstm(pf, arch, frames=frames, **common)
    if issubclass(RUNTIMES[arch.kind], PackedImageModel):
        return RUNTIMES[arch.kind](pf, arch, activations=activations, **common)
    return RUNTIMES[arch.kind](pf, arch, **common)


__all__ = ["Choice", "PackedBiLstm", "PackedLstmLm", "PackedModel", "PackedResNet", "PackedVgg", "Projection",
           "dispatch", "load_model", "preflight"]
