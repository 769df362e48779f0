"""`digits`: an MLP on the 8x8 handwritten digits shipped inside the package (1797 images, 10 classes).

The data is scikit-learn's copy of the UCI "Optical Recognition of Handwritten Digits" test set
(``balprune/data/digits.csv.gz``, BSD-3, see ``balprune/data/LICENSE-digits``); scikit-learn is
not needed. Each row: 64 pixel counts in 0..16, then the label. A fixed permutation (seed 0,
independent of the run's seed) splits it into 1257 train, 180 valid and 360 test images.

The model: 64 -> hidden -> hidden -> 10 with ReLUs, layers named fc1, fc2, fc3. The default
hidden width 64 keeps the model small enough that sparsity costs accuracy (with a wide hidden
layer every pattern keeps ~98% up to 95% sparsity, and nothing can be told apart); its rows are
64 weights long, so balanced sparsity there is set by its block length (configs/digits-balanced.toml).
"""

from __future__ import annotations

import gzip
import hashlib
from collections import OrderedDict
from importlib import resources
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..errors import InvalidInputError
from .base import Option, Task, TaskSpec

DATA_FILE = "digits.csv.gz"
#: sha256 of the shipped file (scikit-learn 1.9.1's sklearn/datasets/data/digits.csv.gz).
DATA_SHA256 = "09f66e6debdee2cd2b5ae59e0d6abbb73fc2b0e0185d2e1957e9ebb51e23aa22"
N_TRAIN, N_VALID, N_TEST = 1257, 180, 360


def data_path():
    """The shipped data file (a Traversable inside the installed package)."""
    return resources.files("balprune").joinpath("data", DATA_FILE)


def load_digits() -> tuple[torch.Tensor, torch.Tensor]:
    """(images float32 [1797, 64] scaled to [0, 1], labels int64 [1797]) from the shipped file."""
    raw = data_path().read_bytes()
    if hashlib.sha256(raw).hexdigest() != DATA_SHA256:
        raise InvalidInputError(f"{data_path()}: the shipped digits data is damaged (sha256 mismatch)",
                                hint="reinstall balprune")
    table = np.loadtxt(gzip.decompress(raw).decode("ascii").splitlines(), delimiter=",", dtype=np.int64)
    if table.shape != (1797, 65):
        raise InvalidInputError(f"{data_path()}: expected 1797 rows of 65 values, got {table.shape}")
    images = torch.from_numpy(table[:, :64].astype(np.float32) / 16.0)
    labels = torch.from_numpy(table[:, 64])
    return images, labels


class DigitsTask(Task):
    name = "digits"
    metric = "accuracy"
    higher_is_better = True
    splits = ("valid", "test")

    def __init__(self, options: dict) -> None:
        self.hidden = options["hidden"]
        images, labels = load_digits()
        order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))
        images, labels = images[order], labels[order]
        a, b = N_TRAIN, N_TRAIN + N_VALID
        self.data = {"train": (images[:a], labels[:a]), "valid": (images[a:b], labels[a:b]),
                     "test": (images[b:], labels[b:])}

    def build_model(self) -> nn.Module:
        h = self.hidden
        return nn.Sequential(OrderedDict(fc1=nn.Linear(64, h), act1=nn.ReLU(), fc2=nn.Linear(h, h), act2=nn.ReLU(),
                                         fc3=nn.Linear(h, 10)))

    def batch(self, generator: torch.Generator, batch_size: int):
        x, y = self.data["train"]
        idx = torch.randint(0, len(y), (batch_size,), generator=generator)
        return x[idx], y[idx]

    def loss(self, model, batch, device):
        x, y = batch
        return nn.functional.cross_entropy(model(x.to(device)), y.to(device))

    @torch.no_grad()
    def evaluate(self, model, split, device):
        x, y = self.data[split]
        logits = model(x.to(device))
        loss = nn.functional.cross_entropy(logits, y.to(device)).item()
        acc = (logits.argmax(-1).cpu() == y).float().mean().item()
        return {"accuracy": acc, "loss": loss}

    def describe(self) -> dict:
        return {"data": f"balprune/data/{DATA_FILE} (UCI optical digits, via scikit-learn; BSD-3)",
                "sha256": DATA_SHA256, "train": N_TRAIN, "valid": N_VALID, "test": N_TEST, "hidden": self.hidden}


def _factory(options: dict, data: Path | None) -> Task:
    return DigitsTask(options)


SPEC = TaskSpec(
    name="digits",
    description="MLP 64-H-H-10 on the 8x8 handwritten digits shipped with balprune (CPU, seconds)",
    options={"hidden": Option(64, 1, "hidden width", maximum=1 << 14)},
    data="none",
    data_help="digits ships its data inside the package; --data is not used",
    factory=_factory,
    model_params=lambda o: 64 * o["hidden"] + o["hidden"] + o["hidden"] ** 2 + o["hidden"] + 10 * o["hidden"] + 10,
)
