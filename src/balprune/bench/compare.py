"""Comparing two benchmark reports: what a CI regression job runs (``balprune compare``)."""

from __future__ import annotations

from dataclasses import dataclass

from .report import BenchReport


@dataclass(frozen=True)
class Change:
    layer: str
    dtype: str
    batch: int
    mode: str
    graph: bool
    kernel: str
    base_us: float | None
    new_us: float | None
    status: str  # "ok" | "slower" | "faster" | "missing" | "incorrect" | "new"

    @property
    def ratio(self) -> float | None:
        if self.base_us is None or self.new_us is None:
            return None
        return self.new_us / self.base_us


def compare_reports(base: BenchReport, new: BenchReport, *, max_slowdown: float = 0.10,
                    kernels: tuple[str, ...] = ("balanced", "bsr", "balprune")) -> list[Change]:
    """One Change per measurement of the chosen kernels, keyed by (layer, dtype, batch, mode, graph, kernel).

    The default kernels are balprune's own: its layer kernels and, in model reports, the whole model.

    slower: new median > base median * (1 + max_slowdown). missing: in base, absent from new.
    incorrect: new failed its correctness gate. A regression is any slower, missing or incorrect.
    """
    base_by = {m.key: m for m in base.measurements if m.kernel in kernels}
    new_by = {m.key: m for m in new.measurements if m.kernel in kernels}
    out = []
    for key in sorted(set(base_by) | set(new_by)):
        b, n = base_by.get(key), new_by.get(key)
        if n is None:
            status = "missing"
        elif not n.correct:
            status = "incorrect"
        elif b is None:
            status = "new"
        elif n.median_us > b.median_us * (1 + max_slowdown):
            status = "slower"
        elif n.median_us < b.median_us / (1 + max_slowdown):
            status = "faster"
        else:
            status = "ok"
        out.append(Change(*key, b.median_us if b else None, n.median_us if n else None, status))
    return out


def regressions(changes: list[Change]) -> list[Change]:
    return [c for c in changes if c.status in ("slower", "missing", "incorrect")]
