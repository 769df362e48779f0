"""GPT-2-style Conv1D weights: which tensors of a checkpoint are stored [in, out].

transformers' ``Conv1D`` (GPT-2, OpenAI GPT, ImageGPT) keeps its weight as [in_features,
out_features] and computes ``x @ W + b``: the transpose of ``nn.Linear``'s [out, in]. Balanced
sparsity balances the inputs of each output unit, i.e. the rows of the [out, in] matrix, so such a
weight must be pruned as its transpose (prune.plan.plan_tensor(..., transposed=True)); pruning its
stored rows would balance each input's fan-out instead, silently.

Recognition (``conv1d_weights``), from the tensor names and, where the folder has one, config.json's
``model_type``: a 2-D tensor named ``...<module>.<conv>.weight`` with (module, conv) one of
``CONV1D_MODULES`` (``attn.c_attn``, ``attn.c_proj``, ``mlp.c_fc``, ``mlp.c_proj`` and the
cross-attention ones) is a Conv1D weight

- when config.json says ``model_type`` is one of ``CONV1D_MODEL_TYPES``; its bias, when stored, must
  then be [out] = [shape[1]] (InvalidInputError, exit 4, otherwise: the file is not what config.json says);
- without a config.json, when its block's ``attn.c_attn.weight`` is [h, 3h]: the fused q/k/v output on
  the second axis is Conv1D's signature (a Linear-based port such as nanoGPT stores it [3h, h], and its
  tensors are left as they are);
- never when config.json names another model type.
"""

from __future__ import annotations

from collections.abc import Iterable

from ..checkpoint import SourceTensor
from ..errors import InvalidInputError

#: config.json model types whose attention and MLP projections are transformers' Conv1D.
CONV1D_MODEL_TYPES = frozenset({"gpt2", "openai-gpt", "imagegpt"})

#: (module, projection) name pairs of Conv1D layers in those models.
CONV1D_MODULES = frozenset({
    ("attn", "c_attn"), ("attn", "c_proj"), ("mlp", "c_fc"), ("mlp", "c_proj"),
    ("crossattention", "c_attn"), ("crossattention", "q_attn"), ("crossattention", "c_proj"),
})


def _block(name: str) -> str | None:
    """The block prefix (``h.3.``) of a Conv1D-named weight, or None when the name is not one."""
    parts = name.split(".")
    if len(parts) >= 3 and parts[-1] == "weight" and (parts[-3], parts[-2]) in CONV1D_MODULES:
        return ".".join(parts[:-3]) + ("." if len(parts) > 3 else "")
    return None


def recognition_type(config: dict | None) -> str | None:
    """The ``model_type`` conv1d_weights recognises by: config.json's own -- except for a composite model
    (an encoder-decoder) whose ``encoder`` or ``decoder`` sub-config is a Conv1D model type, where names
    and shapes decide (None), as without a config.json: its GPT-2 part is Conv1D, its other part not."""
    if config is None:
        return None
    subs = [config.get(k) for k in ("encoder", "decoder")]
    if config.get("model_type") not in CONV1D_MODEL_TYPES and any(
            isinstance(c, dict) and c.get("model_type") in CONV1D_MODEL_TYPES for c in subs):
        return None
    return config.get("model_type")


def conv1d_weights(tensors: Iterable[SourceTensor], model_type: str | None) -> frozenset[str]:
    """Names of the tensors stored [in, out] as transformers' Conv1D (module doc); ``model_type`` is
    ``recognition_type`` of config.json (None: no config.json beside the checkpoint, or a composite
    model with a GPT-2 part)."""
    tensors = list(tensors)
    if model_type is not None and model_type not in CONV1D_MODEL_TYPES:
        return frozenset()
    by_name = {t.name: t for t in tensors}
    found = []
    for t in tensors:
        block = _block(t.name)
        if block is None or len(t.shape) != 2:
            continue
        if model_type is None:
            qkv = by_name.get(block + "attn.c_attn.weight")
            if qkv is None or len(qkv.shape) != 2 or qkv.shape[1] != 3 * qkv.shape[0]:
                continue
        else:
            bias = by_name.get(t.name[: -len("weight")] + "bias")
            if bias is not None and bias.shape != (t.shape[1],):
                raise InvalidInputError(
                    f"tensor {t.name!r} is {list(t.shape)} but its bias is {list(bias.shape)}: config.json's "
                    f"model_type {model_type!r} stores Conv1D weights [in, out] with a bias of [out]")
        found.append(t.name)
    return frozenset(found)
