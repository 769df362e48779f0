"""Recognise a built-in architecture from a packed file's manifest (names and shapes; no tensor data).

``detect(pf)`` returns an ``Architecture``: the layers the end-to-end runtime executes, in order,
each naming its tensors by their state-dict names. The built-in architectures are those of
``balprune example`` (``examples.py``), at any size:

* ``lstm-lm``: ``embedding.weight`` [V, E], ``lstm.{weight_ih,weight_hh,bias_ih,bias_hh}_l{n}``
  (n = 0..L-1; biases on every cell or none), ``decoder.weight`` [V, H] (+ ``decoder.bias``).
* ``ctc-bilstm``: the same LSTM tensors plus ``..._l{n}_reverse`` for every layer (input of layer 0:
  the features F, later layers 2H), ``classifier.weight`` [labels, 2H] (+ ``classifier.bias``).
* ``vgg``: torchvision VGG without batch norm: ``features.{i}.weight`` [Cout, Cin, 3, 3] (+ bias),
  ``classifier.{0,3,6}.weight`` (+ biases).
* ``resnet``: torchvision ResNet with its batch norms folded into the convs (what ``prune`` writes
  from a torchvision ResNet checkpoint, models.bnfold): stem ``conv1`` [C, 3, 7, 7] (stride 2,
  padding 3, ReLU, 3x3 max-pool stride 2), ``layer<i>.<j>`` blocks (i = 1.. consecutive, j = 0..
  consecutive) all BasicBlocks (``conv1`` 3x3, ``conv2`` 3x3) or all Bottlenecks (``conv1`` 1x1,
  ``conv2`` 3x3, ``conv3`` 1x1 with 4x the width), the first block of every layer after the first
  with stride 2 (in ``conv1`` of a BasicBlock, ``conv2`` of a Bottleneck, as torchvision does), a
  ``downsample.0`` 1x1 conv exactly where the block changes size or stride, every conv with or
  without a bias; global average pool, ``fc.weight`` [classes, C] (+ ``fc.bias``). Batch-norm
  tensors in the file mean it was not folded: refused, naming them.

The match is strict: a missing tensor, a shape that does not chain, a gap in the layers, or a tensor
the architecture does not use raises InvalidInputError (exit 4) with one line naming the file, what
was expected and what was found. Ignoring a tensor would run a different model than the file holds.

Tied weights (``aliases`` in the manifest, e.g. decoder tied to the embedding) are resolved: their
names appear in the Architecture as in the state dict; ``stored_name`` gives the name to read.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..container import short_repr
from ..errors import InvalidInputError
from ..formats.packed_file import PackedFile

#: Safetensors dtype codes the models can compute with (fp8/int tensors are not model weights here).
FLOAT_DTYPES = frozenset({"F16", "BF16", "F32", "F64"})

KINDS = ("lstm-lm", "ctc-bilstm", "vgg", "resnet")
_A = {"lstm-lm": "an lstm-lm", "ctc-bilstm": "a ctc-bilstm", "vgg": "a vgg", "resnet": "a resnet"}  # for messages

_LSTM_RE = re.compile(r"lstm\.(weight_ih|weight_hh|bias_ih|bias_hh)_l([0-9]{1,6})(_reverse)?")
_FEATURES_RE = re.compile(r"features\.([0-9]{1,6})\.(weight|bias)")
_BATCH_NORM_KEYS = ("running_mean", "running_var", "num_batches_tracked")
_RESNET_RE = re.compile(r"layer([0-9]{1,6})\.([0-9]{1,6})\.(conv[123]|downsample\.0)\.(weight|bias)")


@dataclass(frozen=True)
class LinearRef:
    """``y = W x + b``: ``weight`` [out_features, in_features], ``bias`` [out_features] or None."""

    weight: str
    bias: str | None
    in_features: int
    out_features: int


@dataclass(frozen=True)
class LstmCellRef:
    """One direction of one nn.LSTM layer; gates stacked in torch's order (i, f, g, o).

    ``weight_ih`` [4*hidden, input_size], ``weight_hh`` [4*hidden, hidden], biases [4*hidden] or None.
    """

    layer: int
    reverse: bool
    weight_ih: str
    weight_hh: str
    bias_ih: str | None
    bias_hh: str | None
    input_size: int
    hidden: int


@dataclass(frozen=True)
class ConvRef:
    """A ``kernel``x``kernel`` conv (``stride``, ``padding``), then ReLU if ``relu``, then a 2x2 max-pool
    (stride 2) if ``pool_after`` (vgg; a resnet's pooling is fixed by the architecture).

    ``weight`` [out_channels, in_channels, kernel, kernel], ``bias`` [out_channels] or None.
    """

    weight: str
    bias: str | None
    in_channels: int
    out_channels: int
    kernel: int
    padding: int
    pool_after: bool
    stride: int = 1
    relu: bool = True


@dataclass(frozen=True)
class ResBlockRef:
    """A resnet block ``layer<layer>.<index>``: ``convs`` in order (each ReLU'd but the last), then the
    residual -- ``downsample`` (a 1x1 conv with the block's stride) of the block's input, or the input
    itself -- added, then ReLU."""

    layer: int
    index: int
    convs: tuple[ConvRef, ...]
    downsample: ConvRef | None

    @property
    def out_channels(self) -> int:
        return self.convs[-1].out_channels


@dataclass(frozen=True)
class Architecture:
    """A recognised built-in model: its kind, sizes and layers in execution order.

    Fields a kind does not use keep their defaults (0, None, ()).
    """

    kind: str  # "lstm-lm" | "ctc-bilstm" | "vgg" | "resnet"
    name: str  # display: "lstm-lm", "ctc-bilstm", "vgg16" (vgg11/13/16/19 by conv count)
    embedding: str | None = None  # lstm-lm: the embedding table's name
    vocab: int = 0  # lstm-lm
    hidden: int = 0  # lstm-lm, ctc-bilstm
    features: int = 0  # ctc-bilstm: input feature size
    layers: int = 0  # LSTM layers
    cells: tuple[LstmCellRef, ...] = ()  # layer order; ctc-bilstm: forward before reverse within a layer
    convs: tuple[ConvRef, ...] = ()  # vgg, in order
    fcs: tuple[LinearRef, ...] = ()  # lstm-lm: (decoder,); ctc-bilstm: (classifier,); vgg: (fc6, fc7, fc8)
    image_size: int = 224  # vgg, resnet: the input the runtime is built for (vgg: five pools end at 7x7)
    blocks: tuple[ResBlockRef, ...] = ()  # resnet, in order (its stem is convs[0])

    def weight_names(self) -> list[str]:
        """Every matrix the model multiplies by, in execution order: LSTM ih/hh per cell, convs, fcs.

        The embedding is a table lookup, not a multiplication, so it is not listed.
        """
        names: list[str] = []
        for c in self.cells:
            names += [c.weight_ih, c.weight_hh]
        names += [c.weight for c in self.convs]
        for b in self.blocks:
            names += [c.weight for c in b.convs] + ([b.downsample.weight] if b.downsample else [])
        names += [f.weight for f in self.fcs]
        return names

    def tensor_names(self) -> list[str]:
        """Every tensor the model uses (weights, biases, embedding): exactly the state dict's keys."""
        names = [self.embedding] if self.embedding else []
        for c in self.cells:
            names += [c.weight_ih, c.weight_hh, c.bias_ih, c.bias_hh]
        for v in self.convs:
            names += [v.weight, v.bias]
        for b in self.blocks:
            for v in [*b.convs, *([b.downsample] if b.downsample else [])]:
                names += [v.weight, v.bias]
        for f in self.fcs:
            names += [f.weight, f.bias]
        return [n for n in names if n is not None]


def stored_name(pf: PackedFile, name: str) -> str:
    """The manifest entry holding state-dict tensor ``name`` (itself, or the target of a tied alias)."""
    return pf.manifest["aliases"].get(name, name)


class _Mismatch(Exception):
    """Raised inside the matchers with the detail; ``detect`` adds the file and the prefix."""


class _Shapes:
    """name -> (shape, dtype) of every tensor and alias, with checks that raise _Mismatch."""

    def __init__(self, pf: PackedFile) -> None:
        tensors = pf.manifest["tensors"]
        self.entries: dict[str, tuple[tuple[int, ...], str]] = {
            n: (tuple(e["shape"]), e["dtype"]) for n, e in tensors.items()}
        for alias, target in pf.manifest.get("aliases", {}).items():
            self.entries[alias] = self.entries[target]

    def __contains__(self, name: str) -> bool:
        return name in self.entries

    def get(self, name: str, kind: str, expected: tuple[int | None, ...]) -> tuple[int, ...]:
        """The shape of required tensor ``name``; ``expected`` gives its rank, None where any size goes."""
        if name not in self.entries:
            raise _Mismatch(f"no {name!r} for {_A[kind]}")
        shape, dtype = self.entries[name]
        if len(shape) != len(expected) or any(e is not None and e != s for e, s in zip(expected, shape)):
            want = ", ".join("?" if e is None else str(e) for e in expected)
            raise _Mismatch(f"{name} is {list(shape)}, expected [{want}]")
        if dtype not in FLOAT_DTYPES:
            raise _Mismatch(f"{name} is {dtype}, expected a floating tensor ({', '.join(sorted(FLOAT_DTYPES))})")
        if 0 in shape:  # a layer of no units or no inputs: nothing a runtime (or torch's reference) can run
            raise _Mismatch(f"{short_repr(name)} is {list(shape)}: a zero-size dimension")
        return shape

    def bias(self, name: str, kind: str, size: int, required: bool = False) -> str | None:
        """``name`` if present (checked to be [size]); None if absent and not ``required``."""
        if name not in self.entries and not required:
            return None
        self.get(name, kind, (size,))
        return name


def detect(pf: PackedFile) -> Architecture:
    """The built-in architecture of packed file ``pf``, from its manifest's names and shapes.

    Raises InvalidInputError (exit 4), one line: ``<file>: not a built-in model (lstm-lm, ctc-bilstm,
    vgg): <what was expected, what was found>`` when the file is none of them, is inconsistent, or
    holds tensors the architecture does not use.
    """
    shapes = _Shapes(pf)
    names = list(shapes.entries)
    try:
        if any(n.startswith("lstm.") for n in names):
            bidirectional = any(n.endswith("_reverse") for n in names if n.startswith("lstm."))
            if bidirectional or "classifier.weight" in shapes:
                arch = _match_lstm(shapes, "ctc-bilstm")
            else:
                arch = _match_lstm(shapes, "lstm-lm")
        elif any(n.startswith(("features.", "classifier.")) for n in names):
            arch = _match_vgg(shapes)
        elif any(n.startswith(("layer1.", "conv1.", "bn1.")) for n in names):
            arch = _match_resnet(shapes)
        else:
            shown = ", ".join(short_repr(n) for n in names[:4]) + (", ..." if len(names) > 4 else "")
            raise _Mismatch(f"expected 'lstm.*', 'features.*' or 'layer1.*' tensors, found {shown or 'no tensors'}")
        used = set(arch.tensor_names())
        unused = [n for n in names if n not in used]
        if unused:
            shown = ", ".join(short_repr(n) for n in unused[:4]) + (", ..." if len(unused) > 4 else "")
            raise _Mismatch(f"{len(unused)} tensor(s) {_A[arch.kind]} does not use: {shown}")
    except _Mismatch as e:
        raise InvalidInputError(f"{pf.path}: not a built-in model ({', '.join(KINDS)}): {e}") from None
    return arch


def _lstm_cells(shapes: _Shapes, kind: str, input_size: int | None) -> tuple[tuple[LstmCellRef, ...], int, int]:
    """The cells of ``lstm.*`` (directions per layer from ``kind``), the layer count and the hidden size.

    ``input_size`` is layer 0's input (None: taken from ``lstm.weight_ih_l0``).
    """
    found: set[int] = set()
    for n in shapes.entries:
        if n.startswith("lstm."):
            m = _LSTM_RE.fullmatch(n)
            if m is None:  # e.g. weight_hr_l0 (proj_size LSTMs): not a built-in model
                raise _Mismatch(f"{n!r} is not a tensor of a plain nn.LSTM (weight_ih/weight_hh/bias_ih/bias_hh_l<n>)")
            found.add(int(m.group(2)))
    layers = max(found) + 1
    if found != set(range(layers)):
        gap = min(set(range(layers)) - found)
        raise _Mismatch(f"LSTM layers {sorted(found)}: expected consecutive layers from 0, no tensors of layer {gap}")
    hh = shapes.get("lstm.weight_hh_l0", kind, (None, None))
    hidden = hh[1]
    if hh[0] != 4 * hidden:
        raise _Mismatch(f"lstm.weight_hh_l0 is {list(hh)}, expected [4H, H] (gates i, f, g, o)")
    # torch's nn.LSTM has one bias flag for all cells: biases everywhere or nowhere.
    with_bias = any(n.startswith(("lstm.bias_ih_l", "lstm.bias_hh_l")) for n in shapes.entries)
    directions = (False, True) if kind == "ctc-bilstm" else (False,)
    if input_size is None:
        input_size = shapes.get("lstm.weight_ih_l0", kind, (4 * hidden, None))[1]
    cells = []
    for layer in range(layers):
        size = input_size if layer == 0 else hidden * len(directions)
        for reverse in directions:
            sfx = f"_l{layer}" + ("_reverse" if reverse else "")
            shapes.get(f"lstm.weight_ih{sfx}", kind, (4 * hidden, size))
            shapes.get(f"lstm.weight_hh{sfx}", kind, (4 * hidden, hidden))
            b_ih = shapes.bias(f"lstm.bias_ih{sfx}", kind, 4 * hidden, required=with_bias)
            b_hh = shapes.bias(f"lstm.bias_hh{sfx}", kind, 4 * hidden, required=with_bias)
            cells.append(LstmCellRef(layer, reverse, f"lstm.weight_ih{sfx}", f"lstm.weight_hh{sfx}",
                                     b_ih, b_hh, size, hidden))
    return tuple(cells), layers, hidden


def _match_lstm(shapes: _Shapes, kind: str) -> Architecture:
    """lstm-lm (embedding, LSTM, decoder) or ctc-bilstm (Bi-LSTM, classifier)."""
    if kind == "lstm-lm":
        vocab, emb = shapes.get("embedding.weight", kind, (None, None))
        cells, layers, hidden = _lstm_cells(shapes, kind, emb)
        shapes.get("decoder.weight", kind, (vocab, hidden))
        fc = LinearRef("decoder.weight", shapes.bias("decoder.bias", kind, vocab), hidden, vocab)
        return Architecture(kind, kind, embedding="embedding.weight", vocab=vocab, hidden=hidden,
                            layers=layers, cells=cells, fcs=(fc,))
    cells, layers, hidden = _lstm_cells(shapes, kind, None)
    labels = shapes.get("classifier.weight", kind, (None, 2 * hidden))[0]
    fc = LinearRef("classifier.weight", shapes.bias("classifier.bias", kind, labels), 2 * hidden, labels)
    return Architecture(kind, kind, hidden=hidden, features=cells[0].input_size, layers=layers,
                        cells=cells, fcs=(fc,))


def _match_vgg(shapes: _Shapes) -> Architecture:
    """torchvision VGG (no batch norm): convs chained from 3 channels, five pools (224 -> 7), fc6..fc8."""
    kind = "vgg"
    indices: set[int] = set()
    for n in shapes.entries:
        if n.startswith("features."):
            if n.rsplit(".", 1)[-1] in _BATCH_NORM_KEYS:
                raise _Mismatch(f"{n!r} belongs to a batch-norm VGG, which is not supported (expected VGG without BN)")
            m = _FEATURES_RE.fullmatch(n)
            if m is None:
                raise _Mismatch(f"{n!r} is not a conv weight or bias (features.<i>.weight/bias)")
            indices.add(int(m.group(1)))
    if not indices:
        raise _Mismatch("no 'features.<i>.weight' conv tensors for a vgg")
    order = sorted(indices)
    if order[0] != 0:
        raise _Mismatch(f"the first conv is features.{order[0]}, expected features.0")
    convs = []
    channels = 3  # RGB
    for i, idx in enumerate(order):
        w = f"features.{idx}.weight"
        # torchvision's Sequential: conv, ReLU (+1), then MaxPool (+2) when the next conv is at +3.
        # VGG always ends its features with a pool.
        step = order[i + 1] - idx if i + 1 < len(order) else 3
        if step not in (2, 3):
            raise _Mismatch(f"features.{idx} is followed by features.{order[i + 1]}, expected the next conv at "
                            f"features.{idx + 2} (after ReLU) or features.{idx + 3} (after ReLU, max-pool)")
        cout = shapes.get(w, kind, (None, channels, 3, 3))[0]
        convs.append(ConvRef(w, shapes.bias(f"features.{idx}.bias", kind, cout), channels, cout, 3, 1, step == 3))
        channels = cout
    pools = sum(c.pool_after for c in convs)
    if pools != 5:
        raise _Mismatch(f"{pools} max-pools in the features, expected 5 (224x224 -> 7x7)")
    fcs = []
    size = channels * 7 * 7
    for idx in (0, 3, 6):  # classifier: Linear, ReLU, Dropout, Linear, ReLU, Dropout, Linear
        w = f"classifier.{idx}.weight"
        out = shapes.get(w, kind, (None, size))[0]
        fcs.append(LinearRef(w, shapes.bias(f"classifier.{idx}.bias", kind, out), size, out))
        size = out
    return Architecture(kind, f"vgg{len(convs) + 3}", convs=tuple(convs), fcs=tuple(fcs))


def _match_resnet(shapes: _Shapes) -> Architecture:
    """torchvision ResNet with folded batch norms (module doc): stem, blocks, fc."""
    kind = "resnet"
    bn = [n for n in shapes.entries if n.rsplit(".", 1)[-1] in _BATCH_NORM_KEYS
          or any(part.startswith("bn") for part in n.split(".")) or ".downsample.1." in n]
    if bn:
        shown = ", ".join(short_repr(n) for n in bn[:3]) + (", ..." if len(bn) > 3 else "")
        raise _Mismatch(f"batch-norm tensors {shown}: a resnet runs with its batch norms folded into the convs "
                        "(prune a torchvision ResNet checkpoint with balprune, which folds them)")
    stem_out = shapes.get("conv1.weight", kind, (None, 3, 7, 7))[0]
    stem = ConvRef("conv1.weight", shapes.bias("conv1.bias", kind, stem_out), 3, stem_out, 7, 3, False, stride=2)
    found: dict[int, set[int]] = {}
    for n in shapes.entries:
        m = _RESNET_RE.fullmatch(n)
        if m is not None:
            found.setdefault(int(m.group(1)), set()).add(int(m.group(2)))
    if not found:
        raise _Mismatch("no 'layer1.0.conv1.weight' for a resnet")
    layers = sorted(found)
    if layers != list(range(1, len(layers) + 1)):
        raise _Mismatch(f"layers {layers}: expected consecutive layers from layer1")
    bottleneck = "layer1.0.conv3.weight" in shapes
    blocks = []
    channels = stem_out
    for layer in layers:
        indices = sorted(found[layer])
        if indices != list(range(len(indices))):
            raise _Mismatch(f"layer{layer} blocks {indices}: expected consecutive blocks from layer{layer}.0")
        for j in indices:
            p = f"layer{layer}.{j}."
            stride = 2 if layer > 1 and j == 0 else 1
            width = shapes.get(p + "conv1.weight", kind, (None, channels, None, None))[0]
            if bottleneck:
                specs = ((width, channels, 1, 1), (width, width, 3, stride), (4 * width, width, 1, 1))
            else:
                if p + "conv3.weight" in shapes:
                    raise _Mismatch(f"{p}conv3.weight in a resnet of BasicBlocks (layer1.0 has no conv3)")
                specs = ((width, channels, 3, stride), (width, width, 3, 1))
            convs = []
            for i, (cout, cin, k, s) in enumerate(specs):
                w = f"{p}conv{i + 1}.weight"
                shapes.get(w, kind, (cout, cin, k, k))
                convs.append(ConvRef(w, shapes.bias(f"{p}conv{i + 1}.bias", kind, cout), cin, cout, k, k // 2,
                                     False, stride=s, relu=i + 1 < len(specs)))
            out = convs[-1].out_channels
            needs = stride != 1 or channels != out
            ds = None
            if (p + "downsample.0.weight" in shapes) != needs:
                raise _Mismatch(f"{p}downsample.0.weight is {'missing' if needs else 'present'}: expected one exactly "
                                f"where a block changes its size ({channels} -> {out} channels, stride {stride})")
            if needs:
                w = p + "downsample.0.weight"
                shapes.get(w, kind, (out, channels, 1, 1))
                ds = ConvRef(w, shapes.bias(p + "downsample.0.bias", kind, out), channels, out, 1, 0, False,
                             stride=stride, relu=False)
            blocks.append(ResBlockRef(layer, j, tuple(convs), ds))
            channels = out
    classes = shapes.get("fc.weight", kind, (None, channels))[0]
    fc = LinearRef("fc.weight", shapes.bias("fc.bias", kind, classes), channels, classes)
    depth = 2 + (3 if bottleneck else 2) * len(blocks)
    return Architecture(kind, f"resnet{depth}", convs=(stem,), blocks=tuple(blocks), fcs=(fc,))
