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

from .base import PackedModel
from .lstm import PackedBiLstm, PackedLstmLm
from .stages import LAYER_GATE, Choice, Projection, dispatch
from .vgg import PackedVgg


def load_model(path: str | Path, *, dtype: str = "float16", device: int = 0, paths: str = "auto",
               measure: bool = True, frames: int = 50, progress=None) -> PackedModel:
    """Build the runtime of the packed model at ``path`` (see module doc).

    ``dtype``: float32, float16 or bfloat16: weights are cast from the file's dtype (the mask and
    indices as stored), activations are that dtype, accumulation fp32. ``paths``: "auto"
    (fastest correct per layer), "sparse" (balprune's kernel wherever the layer has one) or
    "dense". ``measure=False`` skips timing (auto then takes the sparse path where there is one).
    ``frames``: the utterance length a ctc-bilstm runtime is built for. NoGpuError before the
    file is read without a GPU; InvalidInputError when it is not a built-in architecture.
    """
    from ...formats.packed_file import read_packed
    from ...models import detect
    from .. import _gpu

    _gpu.require_device(device)
    pf = read_packed(path)
    arch = detect(pf)
    common = {"dtype": dtype, "device": device, "paths": paths, "measure": measure, "progress": progress}
    if arch.kind == "lstm-lm":
        return PackedLstmLm(pf, arch, **common)
    if arch.kind == "ctc-bilstm":
        return PackedBiLstm(pf, arch, frames=frames, **common)
    return PackedVgg(pf, arch, **common)


__all__ = ["LAYER_GATE", "Choice", "PackedBiLstm", "PackedLstmLm", "PackedModel", "PackedVgg", "Projection",
           "dispatch", "load_model"]
