"""Built-in fine-tuning tasks with real data loaders; none downloads anything.

``TASKS`` maps a recipe's ``[task] name`` to its spec: ``digits`` (data shipped in the package),
``lstm-lm`` (PTB-format text, or the Python standard library's sources), ``llama-lm`` (a small
Llama-family LM with its own BPE tokenizer, on the same text or WikiText files), ``vgg16`` (an
ImageFolder). ``make_task(name, options, data)`` builds one.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import UsageError
from . import digits, llama_lm, lstm_lm, vgg16
from .base import Option, Task, TaskSpec

TASKS: dict[str, TaskSpec] = {s.name: s for s in (digits.SPEC, lstm_lm.SPEC, llama_lm.SPEC, vgg16.SPEC)}


def make_task(spec: TaskSpec, options: dict, data: Path | None) -> Task:
    """Build task ``spec`` with parsed ``options``; UsageError when --data is given or missing wrongly."""
    if spec.data == "none" and data is not None:
        raise UsageError(f"--data: {spec.data_help}")
    if spec.data == "required" and data is None:
        raise UsageError(f"--data is required for task {spec.name!r}: {spec.data_help}")
    return spec.factory(options, None if data is None else Path(data))


__all__ = ["TASKS", "Option", "Task", "TaskSpec", "make_task"]
