"""Layer-by-layer calibration of a Llama-family folder: activation-aware pruning of its decoder linears.

``prune_layers`` runs calibration windows (``calibration_windows``: token ids from llm.text) through the
model one decoder layer at a time, as SparseGPT does:

1. the embedding of the windows (the embedding as the output file will hold it: magnitude-pruned when
   its plan prunes it, so every layer sees the inputs the pruned model will give it);
2. for each decoder layer, in model order: its weights are read from the safetensors files (only
   this layer's, in float32 on the device); the windows' hidden states go through it once with its
   dense weights while forward pre-hooks collect each linear's input statistics (prune.criteria's
   InputStats: q/k/v share one, gate/up share one; o and down have their own); every linear the
   plan prunes is pruned by the criterion (prune.criteria) and handed to the caller at once; then
   the hidden states go through the layer again WITH the pruned weights and become the next layer's
   inputs.

Memory on the device: one layer's weights, the hidden states of all windows (samples x seq_len x
hidden float32), one batch of the layer's temporaries and the statistics (sparsegpt: a K x K float64
matrix per input); checked before the first layer (``device_bytes``). Batches are cut by a rule of the
shapes alone and statistics are summed in float64 in batch order, so identical inputs give identical
bytes. Tensors outside the decoder layers (embedding, lm_head, norms) are left to the engine's own
plan (magnitude or dense, as without calibration).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Mapping
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn

from .. import safeio
from ..config import PruneOptions
from ..errors import GpuRuntimeError, InvalidInputError, UsageError
from ..patterns.ranking import check_finite
from ..prune.criteria import Criterion, InputStats, prune_matrix
from ..prune.plan import TensorPlan
from .family import LlmConfig, expected_tensors
from .reference import DecoderLayer, causal_mask, rope_cos_sin
from .text import read_token_ids, token_windows

#: Temporaries of one batch of windows through a layer stay under this: the batch size is a function of
#: the shapes alone (never of the free memory), so every machine cuts the same batches.
BATCH_BYTES = 256 << 20

#: (module path inside a decoder layer, the input its statistics come from), in model order.
LINEARS = (
    ("self_attn.q_proj", "attn_in"), ("self_attn.k_proj", "attn_in"), ("self_attn.v_proj", "attn_in"),
    ("self_attn.o_proj", "attn_out"),
    ("mlp.gate_proj", "mlp_in"), ("mlp.up_proj", "mlp_in"),
    ("mlp.down_proj", "mlp_act"),
)
#: The module whose inputs define each statistics group.
_GROUP_MODULE = {"attn_in": "self_attn.q_proj", "attn_out": "self_attn.o_proj", "mlp_in": "mlp.gate_proj",
                 "mlp_act": "mlp.down_proj"}

#: progress(layers done, layers in all): called after each decoder layer.
LayerProgress = Callable[[int, int], None]


#: What a calibrated prune of an LLM folder targets when neither --include nor a config's include or
#: [[layers]] rules choose: the decoder layers' weights (their linears; the 1-D norms are never default
#: targets). That is Wanda's and SparseGPT's scope: the embedding and the head stay dense, since pruning
#: them by magnitude costs more perplexity than the calibrated layers save.
DEFAULT_INCLUDE = ("model.layers.*",)


def with_default_targets(options: PruneOptions) -> tuple[PruneOptions, str | None]:
    """``options`` with DEFAULT_INCLUDE when they choose no targets themselves, and the note that says so."""
    if options.include or options.rules:
        return options, None
    return replace(options, include=DEFAULT_INCLUDE), (
        "note: targets: the decoder layers' linears (--include 'model.layers.*', the default with --criterion "
        "wanda|sparsegpt); the embedding and the head stay dense unless --include names them")


def linear_name(layer: int, module: str) -> str:
    """The HF tensor name of a decoder linear's weight (``model.layers.3.mlp.up_proj.weight``)."""
    return f"model.layers.{layer}.{module}.weight"


def calibration_windows(cfg: LlmConfig, folder: Path, data: Path, *, tokenizer: Path | None, samples: int,
                        seq_len: int, seed: int) -> torch.Tensor:
    """[samples, seq_len] int64 token windows of the calibration file ``data`` (llm.text reads it: .npy,
    ids text, or text tokenized with ``tokenizer``, else the folder's own tokenizer.json when it has one),
    their starts drawn by a generator seeded with ``seed`` (config.CalibrationOptions.seed).

    UsageError (exit 2) for a seq_len beyond the model's positions; InvalidInputError (exit 4) for bad
    data (ids outside the vocabulary, too few tokens, ...).
    """
    if seq_len > cfg.max_position_embeddings:
        raise UsageError(f"--seq-len {seq_len} is over the model's max_position_embeddings "
                         f"({cfg.max_position_embeddings})")
    if tokenizer is None and os.path.lexists(Path(folder) / "tokenizer.json"):  # a bad link: read, refused (exit 4)
        tokenizer = Path(folder)
    ids = read_token_ids(data, tokenizer=tokenizer, vocab_size=cfg.vocab_size)
    return token_windows(ids, samples=samples, seq_len=seq_len, seed=seed, what=f"calibration data {data}")


def batch_size(cfg: LlmConfig, samples: int, seq_len: int) -> int:
    """Windows per batch through a layer: the most whose temporaries fit BATCH_BYTES (at least one)."""
    return max(1, min(samples, BATCH_BYTES // _batch_bytes_per_window(cfg, seq_len)))


def _batch_bytes_per_window(cfg: LlmConfig, seq_len: int) -> int:
    # float32 activations of one window: q/k/v (repeated for GQA), attention scores and probabilities,
    # the MLP's three intermediates, and the float64 copy the statistics make of the widest input.
    width = 4 * cfg.hidden_size + 3 * cfg.q_dim + 2 * cfg.kv_dim + 3 * cfg.intermediate_size
    stats = 2 * max(cfg.hidden_size, cfg.q_dim, cfg.intermediate_size)
    return 4 * seq_len * (width + stats) + 4 * 3 * cfg.num_attention_heads * seq_len * seq_len


def device_bytes(cfg: LlmConfig, samples: int, seq_len: int, criterion: Criterion,
                 device: torch.device | str = "cpu") -> int:
    """Peak bytes of ``prune_layers`` on ``device`` (an upper estimate, from the shapes alone)."""
    h, q, kv, inter = cfg.hidden_size, cfg.q_dim, cfg.kv_dim, cfg.intermediate_size
    layer = 4 * (2 * h * q + 2 * h * kv + 3 * h * inter + 2 * h + 2 * q + 2 * kv)
    hidden = 4 * samples * seq_len * h
    batch = batch_size(cfg, samples, seq_len) * _batch_bytes_per_window(cfg, seq_len)
    widths = (h, q, h, inter)  # the four statistics groups' inputs
    stats = sum(8 * k * (k + 1) if criterion.needs_gram else 8 * k for k in widths)
    largest = max(h * inter, h * q)  # the widest linear being pruned: its working copies
    if criterion.needs_gram:  # sparsegpt works on the device
        prune = 4 * 4 * largest + 4 * 8 * inter * inter
    elif torch.device(device).type == "cpu":  # wanda's scores, mask and result, made on the CPU
        prune = 4 * 4 * largest
    else:  # on a GPU only the pruned weight's new float32 copy meets the old one there
        prune = 4 * largest
    return layer + hidden + batch + stats + prune


def _load_layer(cfg: LlmConfig, ckpt, index: int, device: torch.device) -> tuple[DecoderLayer, dict[str, torch.dtype]]:
    """Decoder layer ``index`` with its weights read from the checkpoint (each tensor once), float32 on
    ``device``, and the stored dtype of each of its tensors (a pruned weight goes back in that dtype)."""
    prefix = f"model.layers.{index}."
    with torch.device("meta"):
        layer = DecoderLayer(cfg)
    dtypes = {}
    for name in expected_tensors(cfg):
        if name.startswith(prefix):
            t = ckpt.load(name)
            check_finite(t, name)
            dtypes[name] = t.dtype
            module, _, attr = name[len(prefix):].rpartition(".")
            setattr(layer.get_submodule(module), attr,
                    nn.Parameter(t.to(device=device, dtype=torch.float32), requires_grad=False))
    return layer.eval(), dtypes


def _embedded(cfg: LlmConfig, ckpt, plans: Mapping[str, TensorPlan], windows: torch.Tensor,
              device: torch.device) -> torch.Tensor:
    """[S, T, hidden] float32 on ``device``: the windows through the embedding the output will hold."""
    name = "model.embed_tokens.weight"
    emb = ckpt.load(name)
    check_finite(emb, name)
    plan = plans.get(name)
    if plan is not None and plan.pruned:
        emb = prune_matrix(Criterion.MAGNITUDE, emb, plan.pattern, keep=plan.keep).weight
    return emb[windows].to(device=device, dtype=torch.float32)


def _batches(samples: int, size: int) -> list[slice]:
    return [slice(i, min(i + size, samples)) for i in range(0, samples, size)]


@torch.no_grad()
def prune_layers(cfg: LlmConfig, ckpt, plans: Mapping[str, TensorPlan], windows: torch.Tensor,
                 criterion: Criterion, *, device: torch.device | str = "cpu",
                 progress: LayerProgress | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (tensor name, pruned weight) for every decoder linear its plan prunes, layer by layer.

    ``ckpt`` is the folder's checkpoint (family.open_llm checked its layout against ``cfg``); ``plans``
    maps tensor names to the engine's plans (pattern and keep count of each target); ``windows`` is
    [S, T] int64. Each weight is dense-with-zeros in its source dtype and shape, on the CPU (the engine
    packs and writes it before the next one comes). See the module docstring for the order of work.
    """
    if not criterion.calibrated:
        raise ValueError("prune_layers needs an activation-aware criterion (wanda or sparsegpt)")
    if windows.dtype != torch.int64 or windows.dim() != 2 or windows.numel() == 0:
        raise ValueError(f"windows must be a non-empty [S, T] int64 tensor, got {windows.dtype} {list(windows.shape)}")
    device = torch.device(device)
    samples, seq_len = windows.shape
    safeio.check_fits_device(device_bytes(cfg, samples, seq_len, criterion, device), device,
                             f"calibrating on {samples} windows of {seq_len} tokens",
                             hint="fewer --samples or a shorter --seq-len" + (", or --device cuda" if device.type == "cpu" else ""))
    try:
        yield from _prune_layers(cfg, ckpt, plans, windows, criterion, device, progress)
    except torch.cuda.OutOfMemoryError as exc:
        torch.cuda.empty_cache()
        raise GpuRuntimeError(f"the GPU ran out of memory while calibrating ({str(exc).splitlines()[0][:200]})",
                              hint="fewer --samples or a shorter --seq-len") from None


def _prune_layers(cfg, ckpt, plans, windows, criterion, device, progress):
    samples, seq_len = windows.shape
    h = _embedded(cfg, ckpt, plans, windows, device)
    cos, sin = rope_cos_sin(cfg, torch.arange(seq_len, device=device), torch.float32)
    mask = causal_mask(seq_len, cfg.sliding_window, device)
    batches = _batches(samples, batch_size(cfg, samples, seq_len))
    layers = cfg.num_hidden_layers
    for index in range(layers):
        layer, dtypes = _load_layer(cfg, ckpt, index, device)
        targets = [(module, group) for module, group in LINEARS
                   if (plan := plans.get(linear_name(index, module))) is not None and plan.pruned]
        if targets:
            stats = _collect(layer, h, cos, sin, mask, batches, {g for _, g in targets}, criterion)
            for module, group in targets:
                name = linear_name(index, module)
                plan = plans[name]
                # The layer's float32 copy holds the stored values exactly and both criteria compute in
                # float32, so rounding the result to the stored dtype gives what pruning the stored tensor
                # gives, without reading it again (float64 does not fit float32 and wanda keeps values: read
                # again). wanda chooses its mask on the CPU (prune.masks), so it scores there too and its
                # working copies take no device memory; sparsegpt's updates need the device.
                where = device if criterion.needs_gram else torch.device("cpu")
                weight = (ckpt.load(name) if dtypes[name] == torch.float64
                          else layer.get_submodule(module).weight).to(where)
                pruned = prune_matrix(criterion, weight, plan.pattern, stats[group], keep=plan.keep).weight
                del weight
                pruned = pruned.to(device="cpu", dtype=dtypes[name])
                yield name, pruned
                layer.get_submodule(module).weight = nn.Parameter(pruned.to(device=device, dtype=torch.float32),
                                                                  requires_grad=False)
            del stats
        finite = torch.ones((), dtype=torch.bool, device=device)
        for b in batches:  # the next layer's inputs: this layer's outputs with its pruned weights
            out = layer(h[b], cos, sin, mask)
            finite &= torch.isfinite(out).all()  # per batch, no sync: a check of all of h would copy it as bools
            h[b] = out
            del out
        if not bool(finite):
            raise InvalidInputError(f"calibration: the outputs of decoder layer {index} hold NaN or Inf",
                                    hint="check the model's weights (a pruned layer that diverges) and the data")
        del layer
        if progress is not None:
            progress(index + 1, layers)


def _collect(layer: DecoderLayer, h: torch.Tensor, cos, sin, mask, batches: list[slice], groups: set[str],
             criterion: Criterion) -> dict[str, InputStats]:
    """The statistics of each wanted group's inputs over every window, from one pass with dense weights."""
    stats: dict[str, InputStats] = {}
    hooks = []
    for group in sorted(groups):
        module = layer.get_submodule(_GROUP_MODULE[group])
        s = InputStats(module.in_features, gram=criterion.needs_gram, device=h.device)
        stats[group] = s
        hooks.append(module.register_forward_pre_hook(lambda _m, args, s=s: s.add(args[0])))
    try:
        for b in batches:
            layer(h[b], cos, sin, mask)
    finally:
        for hook in hooks:
            hook.remove()
    return stats
