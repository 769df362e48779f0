"""Option parsing shared by the commands: strict parsers as Click callbacks.

Every parser raises UsageError on a bad value; ``usage`` turns it into typer.BadParameter, so a
bad option is a usage error (exit 2) before any file is opened. (Output paths are checked by
container.check_output_path, before any long run.)
"""

from __future__ import annotations

import re

import typer

from ..errors import UsageError
from ..values import parse_block_shape, parse_positive_int, parse_sparsity

_FLOAT = re.compile(r"^(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][-+]?[0-9]+)?$")  # ASCII digits only


def usage(fn):
    """Wrap a strict parser as a Click callback raising typer.BadParameter (exit 2)."""

    def callback(value):
        if value is None:
            return None
        try:
            return fn(value)
        except UsageError as exc:
            raise typer.BadParameter(exc.message) from None

    return callback


def csv_items(text: str, what: str) -> list[str]:
    items = [s.strip() for s in str(text).split(",")]
    if not items or any(not s for s in items):
        raise UsageError(f"{what}: expected a comma-separated list, got {text!r}")
    if len(set(items)) != len(items):
        raise UsageError(f"{what}: a value is listed twice in {text!r}")
    return items


#: The most values a sparsity list takes: each is a full pruning (and for sweeps a training) run.
MAX_SPARSITIES = 64


def parse_sparsity_list(text: str, what: str = "--sparsities") -> list[float]:
    """'0.5,0.8,0.9' -> [0.5, 0.8, 0.9] (sorted); each in (0, 1), at most MAX_SPARSITIES of them."""
    items = csv_items(text, what)
    if len(items) > MAX_SPARSITIES:
        raise UsageError(f"{what}: {len(items)} values; at most {MAX_SPARSITIES} (each is a pruning run of its own)")
    values = [parse_sparsity(s, what=what) for s in items]
    if any(v == 0 for v in values):
        raise UsageError(f"{what}: 0 prunes nothing (the dense model is measured anyway)")
    if len(set(values)) != len(values):
        raise UsageError(f"{what}: a value is listed twice in {text!r}")
    return sorted(values)


def parse_int_list(text: str, what: str) -> list[int]:
    return [parse_positive_int(s, what=what) for s in csv_items(text, what)]


def parse_shape_list(text: str, what: str = "--block-shapes") -> list[tuple[int, int]]:
    return [parse_block_shape(s, what=what) for s in csv_items(text, what)]


def parse_tolerance(text: str) -> float:
    s = str(text).strip()
    if not _FLOAT.match(s):
        raise UsageError(f"--tolerance: expected a non-negative decimal such as 0.02, got {text!r}")
    return float(s)


