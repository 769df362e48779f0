"""Batch norm folded into the conv before it: what ``prune`` does to a torchvision ResNet checkpoint.

At inference a BatchNorm2d after a conv is an affine map per output channel,

    bn(conv(x)) = s * (W * x + b - mean) + beta,   s = gamma / sqrt(running_var + eps)

so the pair is one conv with ``W' = s[:, None, None, None] * W`` and ``b' = beta + s * (b - mean)``
(b = 0 for torchvision's bias-free convs; a conv's own bias is taken in). Folding before pruning is what a batch-1 deployment
wants: the runtime runs one conv (and its epilogue) instead of a conv and a normalisation, and the
balanced pattern is chosen on the weights that are actually multiplied. Each output channel is one
row of the [C_out, C_in*kh*kw] view and is scaled by one factor, so a row's ranking by magnitude
-- hence its balanced mask -- is the same before and after the fold.

Recognition, from names and shapes only. Only a checkpoint laid out as a whole like torchvision's
ResNet is folded (``is_torchvision_resnet``: every tensor one of ``conv1``, ``bn1``,
``layer<i>.<j>.{conv1,conv2,conv3,bn1,bn2,bn3,downsample.0,downsample.1}``, ``fc``, with some tensor of
``bn1``); in it every batch norm must fold and every conv must have one (else exit 4, naming it): names alone
cannot tell a BN that follows its conv from one that precedes it (a pre-activation block), so no
other model is touched. In it, ``batch_norm_pairs``: a conv weight ``P<conv>.weight`` [C, ...] (4-D)
with a batch norm ``P<bn>`` holding ``weight``, ``bias``, ``running_mean`` and ``running_var``, all
[C], (conv, bn) one of the pairs ``conv1``/``bn1``, ``conv2``/``bn2``, ``conv3``/``bn3``,
``downsample.0``/``downsample.1``. The fold is computed in
float64 and stored in the conv weight's dtype; the BN tensors (and ``num_batches_tracked``) leave
the checkpoint and a ``<conv>.bias`` [C] enters it. ``eps`` is not stored in a state dict:
torchvision's BatchNorm2d default, 1e-5, is used (``BN_EPS``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from ..checkpoint import Checkpoint, SourceTensor
from ..container import DTYPE_BITS, PRUNABLE_CODES
from ..errors import InvalidInputError
from ..patterns.ranking import check_finite

#: BatchNorm2d's eps in torchvision's ResNets (not part of a state dict).
BN_EPS = 1e-5

#: (conv, batch norm) module names that follow each other in torchvision's ResNet blocks and stem.
_PAIRS = (("conv1", "bn1"), ("conv2", "bn2"), ("conv3", "bn3"), ("downsample.0", "downsample.1"))
_BN_PARAMS = ("weight", "bias", "running_mean", "running_var")
_CONV_RE = re.compile(r"(.*?)(conv[123]|downsample\.0)\.weight")
_BN_KEYS = r"(weight|bias|running_mean|running_var|num_batches_tracked)"
# a conv may carry a bias (a checkpoint of a ResNet variant built with bias=True): the fold takes it in
_RESNET_RE = re.compile(
    rf"conv1\.(weight|bias)|bn1\.{_BN_KEYS}|fc\.(weight|bias)"
    rf"|layer[0-9]+\.[0-9]+\.(conv[123]\.(weight|bias)|bn[123]\.{_BN_KEYS}|downsample\.0\.(weight|bias)"
    rf"|downsample\.1\.{_BN_KEYS})")


def is_torchvision_resnet(names: list[str]) -> bool:
    """Whether every tensor name is one of torchvision ResNet's (module doc), with its stem, first block
    and classifier present and some tensor of the stem's batch norm (a ResNet already folded has none,
    and is not folded again); whether that batch norm can be folded is batch_norm_pairs' to say."""
    present = set(names)
    return {"conv1.weight", "layer1.0.conv1.weight", "fc.weight"} <= present and \
        any(n.startswith("bn1.") for n in present) and all(_RESNET_RE.fullmatch(n) for n in names)


@dataclass(frozen=True)
class FoldPair:
    """One conv and the batch norm after it: their tensor names."""

    conv_weight: str
    conv_bias: str  # existing or created by the fold
    bn: str  # prefix of the BN's tensors, ending in "."
    channels: int

    def bn_tensors(self) -> list[str]:
        return [self.bn + p for p in _BN_PARAMS]

    @property
    def bn_name(self) -> str:
        return self.bn.rstrip(".")


_FLOAT = PRUNABLE_CODES  # the float dtypes


def batch_norm_pairs(tensors: tuple[SourceTensor, ...] | list[SourceTensor]) -> list[FoldPair]:
    """The (conv, batch norm) pairs of a torchvision ResNet state dict (module doc), in tensor order."""
    by_name = {t.name: t for t in tensors}
    pairs = []
    for t in tensors:
        m = _CONV_RE.fullmatch(t.name)
        if m is None or len(t.shape) != 4:
            continue
        prefix, conv = m.group(1), m.group(2)
        bn = prefix + dict(_PAIRS)[conv] + "."
        c = t.shape[0]
        if t.dtype in _FLOAT and all(by_name.get(bn + p) is not None and by_name[bn + p].shape == (c,)
                                     and by_name[bn + p].dtype in _FLOAT for p in _BN_PARAMS):
            bias = by_name.get(prefix + conv + ".bias")
            if bias is not None and (bias.shape != (c,) or bias.dtype not in _FLOAT):
                continue
            pairs.append(FoldPair(t.name, prefix + conv + ".bias", bn, c))
    return pairs


_BN_TENSOR_RE = re.compile(rf"(.*?(?:bn[123]|downsample\.1)\.){_BN_KEYS}")


def _unpaired_batch_norms(tensors, pairs: list[FoldPair]) -> list[str]:
    """Batch-norm modules of a ResNet layout (any of their tensors present) that no pair folds: one
    without running statistics (``track_running_stats=False``) included, which has nothing to fold."""
    folded = {p.bn for p in pairs}
    out: dict[str, None] = {}  # insertion-ordered set: a list's membership test made 300k names quadratic
    for t in tensors:
        m = _BN_TENSOR_RE.fullmatch(t.name)
        if m is not None and m.group(1) not in folded:
            out[m.group(1).rstrip(".")] = None
    return list(out)


def _convs_without_batch_norm(tensors, pairs: list[FoldPair]) -> list[str]:
    """Conv weights of a ResNet layout with no batch norm after them: torchvision's ResNet has one after
    every conv, so a missing one is a near miss (a block edited by hand), not a layout to run."""
    paired = {p.conv_weight for p in pairs}
    return [t.name for t in tensors if _CONV_RE.fullmatch(t.name) and t.name not in paired]


def fold(weight: torch.Tensor, bias: torch.Tensor | None, gamma: torch.Tensor, beta: torch.Tensor,
         mean: torch.Tensor, var: torch.Tensor, eps: float = BN_EPS) -> tuple[torch.Tensor, torch.Tensor]:
    """(W', b') of ``bn(conv(x))`` as one conv (module doc), in float64, then ``weight``'s dtype.

    InvalidInputError (exit 4) for a non-finite batch-norm value, a running_var + eps that is not
    positive, or a folded value that is not finite in ``weight``'s dtype (an fp16 bias overflowing)."""
    for what, t in (("weight", gamma), ("bias", beta), ("running_mean", mean), ("running_var", var)):
        if not bool(torch.isfinite(t).all()):
            raise InvalidInputError(f"its {what} holds NaN or Inf")
    # in the stored dtype too: a float32 running_var of -eps gives var + eps = 0 there (torch's own batch norm
    # would divide by zero), while float64 sees a tiny positive number and folds it into a huge weight
    if bool((var.double() + eps <= 0).any()) or bool((var + eps <= 0).any()):
        raise InvalidInputError("its running_var + eps is not positive: the fold would divide by it")
    s = gamma.double() / torch.sqrt(var.double() + eps)
    b = torch.zeros_like(s) if bias is None else bias.double()
    w = (weight.double() * s.view(-1, *([1] * (weight.dim() - 1)))).to(weight.dtype)
    b = (beta.double() + s * (b - mean.double())).to(weight.dtype)
    if not (bool(torch.isfinite(w).all()) and bool(torch.isfinite(b).all())):
        raise InvalidInputError(f"the folded weight or bias is not finite in {str(weight.dtype).split('.')[-1]}")
    return w, b


class BatchNormFolded(Checkpoint):
    """``inner`` with every pair of ``batch_norm_pairs`` folded: the BN tensors (and their
    ``num_batches_tracked``) gone, each conv's weight folded and its ``<conv>.bias`` present, in the
    conv's place. Reads only the tensors a load needs; the file's bytes are never changed.
    ``sha256`` is the source's (the packed file names what it was made from)."""

    def __init__(self, inner: Checkpoint, pairs: list[FoldPair]) -> None:
        super().__init__(inner.display, list(inner.files))
        self._inner = inner
        self.pairs = pairs
        self._by_weight = {p.conv_weight: p for p in pairs}
        self._by_bias = {p.conv_bias: p for p in pairs}
        dropped = {n for p in pairs for n in p.bn_tensors()} | {p.bn + "num_batches_tracked" for p in pairs}
        dropped |= set(self._by_bias)  # an existing conv bias is re-emitted (folded) right after its weight
        tensors = []
        for t in inner.tensors:
            if t.name in dropped:
                continue
            tensors.append(t)
            p = self._by_weight.get(t.name)
            if p is not None:
                item = DTYPE_BITS[t.dtype] // 8
                tensors.append(SourceTensor(p.conv_bias, t.dtype, (p.channels,), p.channels * item))
        self.tensors = tuple(tensors)
        self.aliases = dict(inner.aliases)  # fold_batch_norms refuses tied tensors in a ResNet layout
        self._source_names = {t.name for t in inner.tensors}
        self._last: tuple[FoldPair, tuple[torch.Tensor, torch.Tensor]] | None = None

    def _folded(self, p: FoldPair) -> tuple[torch.Tensor, torch.Tensor]:
        # prune loads a conv's weight and then its bias: the pair is folded once for both
        if self._last is not None and self._last[0] is p:
            return self._last[1]
        w = self._inner.load(p.conv_weight)
        b = self._inner.load(p.conv_bias) if p.conv_bias in self._source_names else None
        # the conv's own NaN/Inf named where it is (the fold would report it as the batch norm's)
        check_finite(w, p.conv_weight, hint="fix the checkpoint")
        if b is not None:
            check_finite(b, p.conv_bias, hint="fix the checkpoint")
        gamma, beta, mean, var = (self._inner.load(n) for n in p.bn_tensors())
        try:
            folded = fold(w, b, gamma, beta, mean, var)
        except InvalidInputError as exc:
            raise InvalidInputError(f"{self.display}: batch norm {p.bn_name!r} (folded into "
                                    f"{p.conv_weight!r}): {exc.args[0]}") from None
        self._last = (p, folded)
        return folded

    def load(self, name: str) -> torch.Tensor:
        if name in self._by_weight:
            return self._folded(self._by_weight[name])[0]
        if name in self._by_bias:
            return self._folded(self._by_bias[name])[1]
        return self._inner.load(name)

    def raw(self, name: str):
        if name in self._by_weight or name in self._by_bias:
            return super().raw(name)
        return self._inner.raw(name)

    def sha256(self) -> str:
        return self._inner.sha256()


def fold_batch_norms(ckpt: Checkpoint) -> tuple[Checkpoint, str | None]:
    """``ckpt`` with its torchvision-ResNet batch norms folded, and the note that says so (None and
    ``ckpt`` itself when it is not such a checkpoint). Only float convs are folded."""
    if not is_torchvision_resnet([t.name for t in ckpt.tensors]):
        return ckpt, None
    if ckpt.aliases:  # torchvision's ResNet ties nothing; a shared conv or BN would fold twice or not at all
        a, v = next(iter(ckpt.aliases.items()))
        raise InvalidInputError(f"{ckpt.display}: tied (shared) tensors in a batch-norm fold: {a!r} -> {v!r}",
                                hint="store the convs and batch norms as separate tensors")
    pairs = batch_norm_pairs(ckpt.tensors)
    unpaired = _unpaired_batch_norms(ckpt.tensors, pairs)
    if unpaired:  # a ResNet with one batch norm left unfolded would be recognised as neither
        raise InvalidInputError(f"{ckpt.display}: batch norm {unpaired[0]!r} cannot be folded into the conv before it "
                                "(its weight, bias, running_mean and running_var must be float [C_out] of that conv)"
                                + (f"; {len(unpaired) - 1} more" if len(unpaired) > 1 else ""))
    bare = _convs_without_batch_norm(ckpt.tensors, pairs)
    if bare:
        raise InvalidInputError(f"{ckpt.display}: conv {bare[0]!r} has no batch norm after it; a torchvision ResNet "
                                "has one after every conv" + (f" ({len(bare) - 1} more)" if len(bare) > 1 else ""),
                                hint="give the checkpoint with every batch norm, or one with them all folded")
    if not pairs:
        return ckpt, None
    return BatchNormFolded(ckpt, pairs), (
        f"note: batch norm folded into {len(pairs)} conv(s) before pruning (torchvision ResNet layout, eps "
        f"{BN_EPS:g}): the packed file holds each conv's folded weight and bias and no batch-norm tensors")

