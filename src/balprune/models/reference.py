"""The dense masked model in torch: the correctness reference and the dense peer the benchmark times.

``reference_module(pf, arch)`` is the architecture's plain torch module with every tensor taken from
the packed file's dense view (pruned weights are zeros), so it computes exactly the model the file
holds. ``sample_inputs`` gives seeded inputs (the same on every machine) and ``reference_outputs``
runs the module on them the way the runtime runs a request (the LSTM LM one token at a time).

How the GPU runtime is checked: its outputs on ``sample_inputs`` are compared with
``reference_outputs`` of the **float32** reference module on the same file, by ``relative_error``
(``||y - ref|| / ||ref||`` over all outputs, norms in float64), which must be at most
``TOLERANCE[runtime dtype]``. Why these bounds:

* Both sides accumulate in float32 (the runtime's kernels sum fp32 products, torch's fp32 GEMM and
  LSTM too), so at float32 only the summation order differs: ~1e-6 relative per layer. 1e-4 leaves
  room for that to grow through deep stacks and recurrences and still catches any real bug (a
  wrong index, gate or bias moves the output by O(1)).
* A float16/bfloat16 runtime stores weights (when the file is fp32) and the activations between
  layers in 16 bits: every layer boundary rounds by up to u = 2^-11 (fp16) or 2^-8 (bf16) relative,
  and the errors compound through a dozen-plus layers or an LSTM's steps. 2e-2 (~40 u) and 8e-2
  (~20 u) bound that with margin.
* The error is norm-wise over the whole output, not per element: per-element relative error is
  unbounded on outputs near zero even for a correct runtime.

``relative_error`` and ``TOLERANCE`` are runtime.measure's ``relative_error`` and
``MODEL_TOLERANCE``, re-exported here beside the reference they are used with.
"""

from __future__ import annotations

import torch
from torch import nn

from .. import examples
from ..formats.packed_file import PackedFile
from ..runtime.measure import MODEL_TOLERANCE, exact_float32, relative_error  # noqa: F401 - re-exported (models.relative_error)
from .arch import Architecture, ConvRef, LinearRef, ResBlockRef, stored_name

#: Bound on relative_error(runtime output, float32 reference output), per runtime dtype (see above).
#: The table and relative_error are runtime.measure's (the one owner of gates and errors).
TOLERANCE: dict[str, float] = MODEL_TOLERANCE

#: Token steps of the LSTM LM's sample input.
LM_STEPS = 4


def _linear(ref: LinearRef) -> nn.Linear:
    return nn.Linear(ref.in_features, ref.out_features, bias=ref.bias is not None)


def _conv(ref: ConvRef) -> nn.Conv2d:
    return nn.Conv2d(ref.in_channels, ref.out_channels, ref.kernel, stride=ref.stride, padding=ref.padding,
                     bias=ref.bias is not None)


class _ResBlock(nn.Module):
    """A folded torchvision block: conv1 (ReLU) conv2 [(ReLU) conv3] + residual, ReLU. Attribute names
    are the state dict's (``conv1``, ``downsample.0``)."""

    def __init__(self, ref: ResBlockRef) -> None:
        super().__init__()
        self.n = len(ref.convs)
        for i, c in enumerate(ref.convs):
            setattr(self, f"conv{i + 1}", _conv(c))
        self.downsample = nn.Sequential(_conv(ref.downsample)) if ref.downsample else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x
        for i in range(1, self.n + 1):
            y = getattr(self, f"conv{i}")(y)
            if i < self.n:
                y = torch.relu(y)
        return torch.relu(y + (x if self.downsample is None else self.downsample(x)))


class FoldedResNet(nn.Module):
    """torchvision's ResNet forward with its batch norms folded into the convs (models.bnfold): stem conv,
    ReLU, 3x3 max-pool (stride 2, padding 1), the blocks, global average pool, fc."""

    def __init__(self, arch: Architecture) -> None:
        super().__init__()
        self.conv1 = _conv(arch.convs[0])
        for layer in sorted({b.layer for b in arch.blocks}):
            setattr(self, f"layer{layer}", nn.Sequential(*[_ResBlock(b) for b in arch.blocks if b.layer == layer]))
        self.layers = sorted({b.layer for b in arch.blocks})
        self.fc = _linear(arch.fcs[0])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = nn.functional.max_pool2d(torch.relu(self.conv1(x)), 3, stride=2, padding=1)
        for layer in self.layers:
            x = getattr(self, f"layer{layer}")(x)
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


def _build(arch: Architecture) -> nn.Module:
    """The untrained module of ``arch`` (call under ``torch.device("meta")``: no memory, no init)."""
    if arch.kind == "resnet":
        return FoldedResNet(arch)
    if arch.kind == "vgg":
        from ..vision import torchvision

        vgg = torchvision().models.vgg
        VGG, make_layers = vgg.VGG, vgg.make_layers

        cfg: list[int | str] = []
        for c in arch.convs:
            cfg += [c.out_channels, "M"] if c.pool_after else [c.out_channels]
        fc6, fc7, fc8 = arch.fcs
        m = VGG(make_layers(cfg), num_classes=fc8.out_features, init_weights=False)
        for c in arch.convs:  # make_layers always adds conv biases; a file may have none
            if c.bias is None:
                idx = int(c.weight.split(".")[1])
                m.features[idx] = nn.Conv2d(c.in_channels, c.out_channels, c.kernel, padding=c.padding, bias=False)
        # torchvision's classifier is fixed at 512*7*7 -> 4096 -> 4096; the file's sizes are general.
        m.classifier = nn.Sequential(_linear(fc6), nn.ReLU(True), nn.Dropout(), _linear(fc7), nn.ReLU(True),
                                     nn.Dropout(), _linear(fc8))
        return m
    c0 = arch.cells[0]
    # torch's nn.LSTM has one bias flag for every cell (detect checks biases are everywhere or nowhere).
    bias = c0.bias_ih is not None
    if arch.kind == "lstm-lm":
        m = examples.LstmLanguageModel(arch.vocab, arch.hidden, arch.layers)
        # The example ties the embedding width to H; a file may have any width E (layer 0's input).
        m.embedding = nn.Embedding(arch.vocab, c0.input_size)
        m.lstm = nn.LSTM(c0.input_size, arch.hidden, num_layers=arch.layers, bias=bias)
        m.decoder = _linear(arch.fcs[0])
        return m
    fc = arch.fcs[0]
    m = examples.BiLstmAcousticModel(arch.features, arch.hidden, arch.layers, fc.out_features)
    m.lstm = nn.LSTM(arch.features, arch.hidden, num_layers=arch.layers, bidirectional=True, bias=bias)
    m.classifier = _linear(fc)
    return m


def reference_module(pf: PackedFile, arch: Architecture, *, dtype: torch.dtype = torch.float32,
                     device: str | torch.device = "cpu") -> nn.Module:
    """The torch module of ``arch`` holding ``pf``'s dense (masked) tensors, cast to ``dtype`` on ``device``.

    Every key of the module's state dict is loaded (strict) from ``pf.dense``; tied names share one
    tensor. The module is in eval mode (dropout off) with requires_grad off.
    """
    with torch.device("meta"):
        module = _build(arch)
    loaded: dict[str, torch.Tensor] = {}
    state = {}
    for name in arch.tensor_names():
        src = stored_name(pf, name)
        if src not in loaded:
            loaded[src] = pf.dense(src).to(device=device, dtype=dtype)
        state[name] = loaded[src]
    # assign=True adopts the loaded tensors instead of copying into meta ones (which hold no memory).
    module.load_state_dict(state, strict=True, assign=True)
    # .to() runs nn.LSTM's _apply, which rebuilds its flat weight list over the assigned tensors.
    module.to(device=device, dtype=dtype)
    module.eval()
    module.requires_grad_(False)
    return module


def sample_inputs(arch: Architecture, *, seed: int = 0, frames: int = 50, steps: int = LM_STEPS,
                  device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Seeded inputs for ``arch`` (a CPU generator: the same values on every machine), on ``device``.

    lstm-lm: ``{"tokens": int64 [steps]}`` ids < vocab; ctc-bilstm: ``{"frames": float32 [frames,
    features]}``; vgg, resnet: ``{"image": float32 [3, image_size, image_size]}`` (standard normal values).
    """
    g = torch.Generator().manual_seed(seed)
    if arch.kind == "lstm-lm":
        out = {"tokens": torch.randint(0, arch.vocab, (steps,), generator=g, dtype=torch.int64)}
    elif arch.kind == "ctc-bilstm":
        out = {"frames": torch.randn(frames, arch.features, generator=g)}
    else:
        out = {"image": torch.randn(3, arch.image_size, arch.image_size, generator=g)}
    return {k: v.to(device) for k, v in out.items()}


def reference_outputs(module: nn.Module, arch: Architecture, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """``module``'s outputs on ``inputs``, computed in its dtype on its device, returned float32 on CPU.

    lstm-lm: the logits of each token run one step at a time from a zero state (as a decoder serves
    requests), [steps, vocab]; ctc-bilstm: [frames, labels]; vgg, resnet: [classes].
    """
    p = next(module.parameters())
    with torch.inference_mode(), exact_float32():  # float32 without TF32: the gate's 1e-4 assumes it
        if arch.kind == "lstm-lm":
            tokens = inputs["tokens"].to(p.device)
            state = None  # nn.LSTM's zero state
            steps = []
            for t in range(tokens.shape[0]):
                logits, state = module(tokens[t:t + 1], state)
                steps.append(logits)
            y = torch.cat(steps)
        elif arch.kind == "ctc-bilstm":
            y = module(inputs["frames"].to(p.device, p.dtype))
        else:
            y = module(inputs["image"].to(p.device, p.dtype)[None])[0]
    return y.float().cpu()
