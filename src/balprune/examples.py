"""Checkpoints of the paper's workloads with random weights (nothing can be downloaded).

Every builder returns a state dict from a seeded generator, so the same name and seed give the
same tensors on every machine.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn


class LstmLanguageModel(nn.Module):
    """The paper's PTB language model: embedding, 2-layer LSTM (hidden 1500), output projection."""

    def __init__(self, vocab: int = 10000, hidden: int = 1500, layers: int = 2) -> None:
        super().__init__()
        self.embedding = nn.Embedding(vocab, hidden)
        self.lstm = nn.LSTM(hidden, hidden, num_layers=layers)
        self.decoder = nn.Linear(hidden, vocab)

    def forward(self, tokens: torch.Tensor, state=None):
        out, state = self.lstm(self.embedding(tokens), state)
        return self.decoder(out), state


class BiLstmAcousticModel(nn.Module):
    """A CTC acoustic model like the paper's TIMIT workload: Bi-LSTM (hidden 1024) on 39-d features."""

    def __init__(self, features: int = 39, hidden: int = 1024, layers: int = 2, labels: int = 62) -> None:
        super().__init__()
        self.lstm = nn.LSTM(features, hidden, num_layers=layers, bidirectional=True)
        self.classifier = nn.Linear(2 * hidden, labels)

    def forward(self, frames: torch.Tensor):
        out, _ = self.lstm(frames)
        return self.classifier(out)


def _vgg16() -> nn.Module:
    from .vision import torchvision

    return torchvision().models.vgg16(weights=None)


def _resnet(depth: int) -> Callable[[], nn.Module]:
    """torchvision ResNet-``depth`` with its batch-norm affine parameters and running statistics drawn
    (from the seeded generator, like every weight) instead of torchvision's 1/0 initial values, so that
    folding them into the convs (models.bnfold) is not an identity: gamma in [0.5, 1.5), beta and the
    mean N(0, 0.1), the variance in [0.5, 1.5)."""

    def build() -> nn.Module:
        from .vision import torchvision

        model = getattr(torchvision().models, f"resnet{depth}")(weights=None)
        with torch.no_grad():
            for m in model.modules():
                if isinstance(m, nn.BatchNorm2d):
                    m.weight.uniform_(0.5, 1.5)
                    m.bias.normal_(0.0, 0.1)
                    m.running_mean.normal_(0.0, 0.1)
                    m.running_var.uniform_(0.5, 1.5)
        return model

    return build


def _tiny_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(512, 256), nn.ReLU(), nn.Linear(256, 10),
    )


EXAMPLES: dict[str, tuple[str, Callable[[], nn.Module]]] = {
    "vgg16": ("torchvision VGG-16 (ImageNet, 138M parameters)", _vgg16),
    "lstm-lm": ("2-layer LSTM language model, hidden 1500, vocabulary 10000 (PTB-sized)", LstmLanguageModel),
    "ctc-bilstm": ("2-layer Bi-LSTM acoustic model, hidden 1024 (TIMIT-like, CTC)", BiLstmAcousticModel),
    "resnet18": ("torchvision ResNet-18 (ImageNet, 11.7M parameters; batch norm folded by prune)", _resnet(18)),
    "resnet50": ("torchvision ResNet-50 (ImageNet, 25.6M parameters; batch norm folded by prune)", _resnet(50)),
    "tiny-cnn": ("a small CNN (two 3x3 convs, two linears): seconds to prune, for trying things", _tiny_cnn),
}


def example_state_dict(name: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """The state dict of example ``name`` with weights drawn from ``torch.manual_seed(seed)``."""
    _, build = EXAMPLES[name]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build()
    return {k: v.detach().contiguous() for k, v in model.state_dict().items()}
