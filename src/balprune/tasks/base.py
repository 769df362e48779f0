"""What a built-in fine-tuning task provides, and the strict options every task is configured by.

A task owns its data (loaded once, on the CPU, never downloaded), builds its model, draws the
training batch of a given step from a generator the caller seeds (so a run is a pure function of
its seed and can resume mid-run with identical results), computes the loss and evaluates.
"""

from __future__ import annotations

import abc
import hashlib
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..errors import ConfigError
from ..values import as_float, number_repr


@dataclass(frozen=True)
class Option:
    """One task option: its default, and the smallest and largest values allowed (numbers).

    ``maximum`` bounds what a recipe can ask for (sizes, counts, steps) so no value requests an
    allocation or a run no machine could finish; numbers must also be finite.
    """

    default: object
    minimum: float | None = None
    help: str = ""
    maximum: float | None = None

    def parse(self, value: object, where: str) -> object:
        kind, raw = type(self.default), value
        if kind is bool:
            ok = isinstance(value, bool)
        elif kind is int:
            ok = isinstance(value, int) and not isinstance(value, bool)
        elif kind is float:
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
            value = as_float(value) if ok else value
        else:
            ok = isinstance(value, kind)
        if not ok:
            raise ConfigError(f"{where}: expected {kind.__name__}, got {value!r}")
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{where}: expected a finite number, got {number_repr(raw)}")
        if self.minimum is not None and value < self.minimum:  # type: ignore[operator]
            raise ConfigError(f"{where}: must be >= {self.minimum:g}, got {value!r}")
        if self.maximum is not None and value > self.maximum:  # type: ignore[operator]
            raise ConfigError(f"{where}: must be at most {self.maximum!r}, got {value!r}")
        return value


class Task(abc.ABC):
    """A built-in task. ``metric`` is the headline figure; ``higher_is_better`` orients it."""

    name: str = ""
    metric: str = ""
    higher_is_better: bool = True
    #: Evaluation splits, the headline one last.
    splits: tuple[str, ...] = ("valid", "test")

    @abc.abstractmethod
    def build_model(self) -> nn.Module:
        """A fresh model; the caller seeds torch's generator first, so it is deterministic."""

    @abc.abstractmethod
    def batch(self, generator: torch.Generator, batch_size: int):
        """The training batch drawn from ``generator`` (CPU tensors)."""

    @abc.abstractmethod
    def loss(self, model: nn.Module, batch, device: torch.device) -> torch.Tensor:
        """Mean training loss of ``batch`` (moved to ``device``)."""

    @abc.abstractmethod
    def evaluate(self, model: nn.Module, split: str, device: torch.device) -> dict[str, float]:
        """Metrics of ``split``: always the headline ``metric``, maybe more (loss, top-5)."""

    @abc.abstractmethod
    def describe(self) -> dict:
        """JSON-ready facts about the data (source, sizes), recorded with the metrics."""

    def data_id(self) -> str:
        """A digest of the data, so a resumed run refuses data that changed underneath it."""
        return hashlib.sha256(repr(sorted(self.describe().items())).encode()).hexdigest()[:16]

    def hf_files(self):
        """The Hugging Face record (formats.hf_record.HfFiles: config.json, tokenizer.json) that the
        packed file of this task's model carries, so ``unpack --hf-folder`` gives the model back as a
        folder ``from_pretrained`` loads; None for a task whose models have no HF form (the default)."""
        return None


@dataclass(frozen=True)
class TaskSpec:
    """A registered task: its options, whether it reads --data, and its factory."""

    name: str
    description: str
    options: dict[str, Option]
    data: str  # "none" (refuses --data), "optional", "required"
    data_help: str
    factory: Callable[[dict, Path | None], Task]
    #: Parameters of the model these options build (an upper bound where the data decides, e.g.
    #: the vocabulary): checked against memory before any data is read or model built.
    model_params: Callable[[dict], int] | None = None
    #: Bytes one training batch of ``batch_size`` samples certainly takes with these options (a lower bound:
    #: its inputs and the output logits in float32), checked with the parameters before anything runs.
    batch_bytes: Callable[[dict, int], int] | None = None

    def parse_options(self, table: dict, where: str) -> dict:
        unknown = sorted(set(table) - set(self.options))
        if unknown:
            raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)} for task {self.name!r}; "
                              f"allowed: {', '.join(sorted(self.options)) or 'none'}")
        return {k: opt.parse(table[k], f"{where} {k}") if k in table else opt.default
                for k, opt in self.options.items()}


def evaluation_batches(n: int, batch_size: int):
    """(start, stop) pairs covering range(n) in order."""
    for start in range(0, n, batch_size):
        yield start, min(n, start + batch_size)
