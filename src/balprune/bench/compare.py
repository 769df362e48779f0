"""Comparing two benchmark reports: what a CI regression job runs (``balprune compare``).

A CI verdict must never pass by checking nothing: kernels are resolved against what the reports hold
(``resolve_kernels``: a name neither report holds is a usage error), and reports from different devices
are refused unless the caller allows it (``device_change``). Reports are type-checked on reading
(bench.report.load_report).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import InvalidInputError, UsageError
from .report import BenchReport

#: balprune's own kernels: its layer kernels and, in model reports, the whole model ("balprune").
DEFAULT_KERNELS = ("balanced", "bsr", "balprune")


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


def held_kernels(*reports: BenchReport) -> list[str]:
    """The kernel names the reports' measurements hold, sorted."""
    return sorted({m.kernel for r in reports for m in r.measurements})


def resolve_kernels(base: BenchReport, new: BenchReport, named: tuple[str, ...] = ()) -> tuple[str, ...]:
    """The kernels to compare. The baseline decides what can be compared: ``named`` (``--kernel``) must
    each be held by the base report (UsageError, exit 2, naming the kernels it holds otherwise: a typo,
    or a kernel only the new report has, must not make CI check nothing); with none named, those of
    DEFAULT_KERNELS the base holds (UsageError when it holds none of them; InvalidInputError, exit 4,
    when the base holds no measurement at all)."""
    held = held_kernels(base)
    if not held:
        raise InvalidInputError("nothing to compare: the base report holds no measurement")
    if named:
        unknown = [k for k in dict.fromkeys(named) if k not in held]
        if unknown:
            only_new = [k for k in unknown if k in held_kernels(new)]
            where = "only in the new report, with no baseline" if len(only_new) == len(unknown) else "not in the base report"
            raise UsageError(f"--kernel {', '.join(map(repr, unknown))}: {where}; the base report holds: {', '.join(held)}")
        return tuple(dict.fromkeys(named))
    ours = tuple(k for k in DEFAULT_KERNELS if k in held)
    if not ours:
        raise UsageError(f"the base report holds none of balprune's kernels ({', '.join(DEFAULT_KERNELS)}); "
                         f"it holds: {', '.join(held)}", hint="name the kernels to compare with --kernel")
    return ours


def compared(changes: list[Change]) -> int:
    """How many changes compared two timings or found a regression (everything but "new")."""
    return sum(c.status != "new" for c in changes)


def device_name(report: BenchReport) -> str:
    """The device a report was measured on, as people read it: name and compute capability."""
    cc = report.device.get("compute_capability")
    return f"{report.device.get('name')}" + ("" if cc is None else f" (compute capability {cc})")


def device_change(base: BenchReport, new: BenchReport) -> str | None:
    """None when both reports come from the same device (name and compute capability), else what changed
    ("base X, new Y"): timings of two devices are not comparable, so ``compare`` refuses them unless told."""
    ident = [(r.device.get("name"), r.device.get("compute_capability")) for r in (base, new)]
    if ident[0] == ident[1]:
        return None
    return f"base {device_name(base)}, new {device_name(new)}"


def compare_reports(base: BenchReport, new: BenchReport, *, max_slowdown: float = 0.10,
                    kernels: tuple[str, ...] = DEFAULT_KERNELS) -> list[Change]:
    """One Change per measurement of the chosen kernels, keyed by (layer, dtype, batch, mode, graph, kernel).

    The default kernels are balprune's own (DEFAULT_KERNELS). Callers that take kernel names from a
    user resolve them first (``resolve_kernels``); the reports are unique per key (load_report).

    slower: new median > base median * (1 + max_slowdown). missing: in base, absent from new.
    incorrect: new failed its correctness gate. new: absent from base, or not timed there (it failed
    its gate: no baseline to compare with). A regression is any slower, missing or incorrect.
    base_us / new_us are None where there is no timing (absent, or failed its gate).
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
        elif b is None or not b.correct:
            status = "new"
        elif n.median_us > b.median_us * (1 + max_slowdown):
            status = "slower"
        elif n.median_us < b.median_us / (1 + max_slowdown):
            status = "faster"
        else:
            status = "ok"
        out.append(Change(*key, b.median_us if b is not None and b.correct else None,
                          n.median_us if n is not None and n.correct else None, status))
    return out


def regressions(changes: list[Change]) -> list[Change]:
    return [c for c in changes if c.status in ("slower", "missing", "incorrect")]
