"""Rich rendering of fine-tuning, sweep and sensitivity results (the CLI's only formatting for them)."""

from __future__ import annotations

import math

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table
from rich.text import Text

from .render import literal, visible


def progress_bar(console) -> Progress:
    # markup=False: descriptions hold recipe labels and metric names (config text), shown as written.
    return Progress(TextColumn("{task.description}", markup=False), BarColumn(), MofNCompleteColumn(),
                    TextColumn("loss {task.fields[loss]}", markup=False),
                    TextColumn("{task.fields[metric]}", markup=False),
                    TimeElapsedColumn(), TimeRemainingColumn(), console=console, transient=True)


def _fmt(value: float | None, metric: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{100 * value:.2f}%" if metric in ("accuracy", "top5") else f"{value:.2f}"


def stage_line(e) -> str:
    what = "dense" if e.stage == 0 else f"stage {e.stage}/{e.stages} sparsity {e.sparsity:.3f}"
    return f"{what}: {e.metric_name} {_fmt(e.metric, e.metric_name)} after {e.global_step} steps"


def update_bar(bar: Progress, task, e, err, label: str | None = None) -> None:
    """Move the bar for one progress event; a finished stage also leaves a line above it."""
    head = f"{label}: " if label else ""
    what = "dense" if e.stage == 0 else f"stage {e.stage}/{e.stages} s={e.sparsity:.3f}"
    if e.phase == "eval":
        what += " evaluating"
    metric = "" if e.metric is None else f"{e.metric_name} {_fmt(e.metric, e.metric_name)}"
    bar.update(task, total=max(1, e.total_steps), completed=e.global_step, description=visible(f"{head}{what}"),
               loss="-" if e.loss is None else f"{e.loss:.4f}", metric=visible(metric))
    if e.phase == "stage":
        bar.console.print(literal(f"{head}{stage_line(e)}"))


def finetune_table(result) -> Table:
    m = result.metric
    t = Table(title=literal(f"balprune finetune {result.recipe}: {result.task} on {result.device}"),
              title_justify="left")
    cols = ["stage", "sparsity", "achieved", f"{m} after prune"] + [f"{m} {s}" for s in
                                                                     _splits(result)] + ["steps", "seconds"]
    for c in cols:
        t.add_column(literal(c), justify="left" if c == "stage" else "right")
    for s in result.stages:
        after = None if s.after_prune is None else s.after_prune[m]
        t.add_row(*map(literal, ("dense" if s.stage == 0 else str(s.stage), f"{s.sparsity:.3f}",
                                 f"{100 * s.achieved:.1f}%", _fmt(after, m),
                                 *[_fmt(s.metrics[sp][m], m) for sp in _splits(result)], str(s.steps),
                                 f"{s.seconds:.1f}")))
    return t


def _splits(result) -> list[str]:
    return list(result.stages[0].metrics) if result.stages else []


def sweep_table(result) -> Table:
    """Variants x sparsities; each cell the metric and its relative difference to unstructured."""
    m = result.metric
    same = "" if result.dense_budget_value is None else f" (trained on for the same budget: " \
                                                         f"{_fmt(result.dense_budget_value, m)})"
    t = Table(title=literal(f"balprune sweep {result.recipe}: {result.task} {m} ({result.split}); dense "
                            f"{_fmt(result.dense_value, m)}{same}; budget {result.budget['stages']} x "
                            f"{result.budget['steps_per_stage']} fine-tuning steps"), title_justify="left")
    t.add_column("pattern")
    for s in result.sparsities:
        t.add_column(f"s={s:g}", justify="right")
    has_ref = "unstructured" in result.variants
    for label in result.variants:
        cells = []
        for s in result.sparsities:
            p = result.point(label, s)
            if p is None:
                cells.append(literal("-"))
                continue
            cell = literal(_fmt(p.value, m))
            ref = result.point("unstructured", s) if has_ref else None
            if ref is not None and label != "unstructured" and ref.value:
                rel = (p.value - ref.value) / abs(ref.value) * (1 if result.higher_is_better else -1)
                color = "green" if rel >= -0.02 else "red"
                cell.append(f" ({100 * rel:+.1f}%)", style=color)
            if abs(p.achieved - s) > 0.005:
                cell.append(f" @{100 * p.achieved:.1f}%", style="dim")
            cells.append(cell)
        t.add_row(literal(label), *cells)
    if has_ref:
        t.caption = ("(x%): relative to unstructured at the same sparsity, negative = worse; "
                     "@y%: achieved sparsity where it differs from the target")
    return t


def sensitivity_table(result) -> Table:
    t = Table(title=literal(f"balprune sensitivity {result.source}: {result.measure}, tolerance {result.tolerance:g}"),
              title_justify="left")
    t.add_column("layer")
    t.add_column("shape")
    for s in result.sparsities:
        t.add_column(f"s={s:g}", justify="right")
    t.add_column("plan", justify="right")
    for layer in result.layers:
        cells = []
        for s in result.sparsities:
            v = layer.degradation[f"{s:g}"]
            style = "green" if v <= result.tolerance else "red"
            cells.append(Text(f"{v:.4f}", style=style))
        t.add_row(literal(layer.name), literal("x".join(map(str, layer.shape))), *cells,
                  "dense" if layer.chosen is None else f"{layer.chosen:g}")
    return t
