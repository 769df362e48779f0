"""The paper's accuracy figure: metric against sparsity for several patterns, same budget for every run.

The dense model is trained once (``dense.pt``) and every (pattern, sparsity) run starts from it
with the recipe's schedule, fine-tuning steps and learning rates: exactly what ``balprune
finetune`` would do with the recipe's pattern and sparsity replaced. A sweep folder:

    dense.pt                     the shared dense model (stage 0 checkpoint)
    runs/dense-same-budget/      the dense model trained on through the same stages, nothing pruned
    runs/<variant>-s<S>/         one run's metrics.json (its checkpoint while it runs)
    sweep.json                   every point (schema balprune.sweep/1), replaced atomically
    sweep.png                    the plot (optional, matplotlib)

Variants: ``balanced`` once per --blocks / --block-sizes value (the balance range of the sensitivity table),
``block`` once per tile shape, ``vector`` once per vector length, ``unstructured`` once.
"""

from __future__ import annotations

import math
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .. import __version__
from ..errors import InvalidInputError, OutputError, UsageError
from ..iopaths import check_io
from ..tasks import make_task
from .recipe import Recipe, recipe_with_pattern
from .run import (
    METRICS,
    ProgressEvent,
    is_stage_record,
    load_init,
    make_out_folder,
    resolve_device,
    run_finetune,
    train_dense,
    write_json,
)

SCHEMA = "balprune.sweep/1"
PATTERNS = ("balanced", "unstructured", "block", "vector")


@dataclass(frozen=True)
class Variant:
    label: str
    pattern: str
    blocks: int | None = None
    block_size: int | None = None
    block_shape: tuple[int, int] | None = None
    vector_length: int | None = None

    @property
    def slug(self) -> str:
        return self.label.replace(" ", "-").replace("=", "")


@dataclass
class SweepPoint:
    label: str
    pattern: dict
    sparsity: float  # target
    achieved: float  # zeros / elements over the pruned tensors
    value: float  # the headline metric after the last fine-tuning stage
    after_prune: float | None  # the headline metric right after the last re-masking
    metrics: dict
    seconds: float


@dataclass
class SweepResult:
    recipe: str
    task: str
    metric: str
    higher_is_better: bool
    split: str
    dense_value: float  # the dense model every run starts from
    budget: dict
    device: str
    variants: list[str]
    sparsities: list[float]
    points: list[SweepPoint] = field(default_factory=list)
    #: the dense model trained on for the same fine-tuning budget, nothing pruned: the fair reference
    #: for the points (which trained that much longer than the dense model they started from)
    dense_budget_value: float | None = None

    def point(self, label: str, sparsity: float) -> SweepPoint | None:
        for p in self.points:
            if p.label == label and math.isclose(p.sparsity, sparsity):
                return p
        return None

    def to_dict(self) -> dict:
        return {"schema": SCHEMA, "tool_version": __version__, **asdict(self)}


def variants_for(recipe: Recipe, patterns: list[str], blocks: list[int] | None = None,
                 block_shapes: list[tuple[int, int]] | None = None,
                 vector_lengths: list[int] | None = None, block_sizes: list[int] | None = None) -> list[Variant]:
    """The sweep's lines, in the order given (see module docstring).

    Balanced: one line per ``blocks`` (B blocks per row) and per ``block_sizes`` (block length L,
    the paper's balance range); with neither, the recipe's own geometry (default 32 blocks).
    """
    from ..patterns.kinds import BalancedPattern

    base = recipe.prune_config.get("prune", {})
    out: list[Variant] = []
    for p in patterns:
        if p not in PATTERNS:
            raise UsageError(f"--patterns: expected some of {', '.join(PATTERNS)}, got {p!r}")
        if p == "balanced":
            if blocks or block_sizes:
                out += [Variant(f"balanced B={b}", p, blocks=b) for b in blocks or ()]
                out += [Variant(f"balanced L={b}", p, block_size=b) for b in block_sizes or ()]
            elif isinstance(recipe.options.pattern, BalancedPattern):
                own = recipe.options.pattern
                out.append(Variant(f"balanced B={own.blocks}", p, blocks=own.blocks) if own.blocks is not None
                           else Variant(f"balanced L={own.block_size}", p, block_size=own.block_size))
            else:
                out.append(Variant("balanced B=32", p, blocks=32))
        elif p == "block":
            shapes = block_shapes or [tuple(base["block_shape"]) if base.get("pattern") == "block" and "block_shape" in base
                                      else (8, 8)]
            out += [Variant(f"block {h}x{w}", p, block_shape=(h, w)) for h, w in shapes]
        elif p == "vector":
            lengths = vector_lengths or [base.get("vector_length", 8) if base.get("pattern") == "vector" else 8]
            out += [Variant(f"vector 1x{v}", p, vector_length=v) for v in lengths]
        else:
            out.append(Variant("unstructured", p))
    labels = [v.label for v in out]
    if len(set(labels)) != len(labels):
        raise UsageError("--patterns / --blocks / --block-shapes: a variant is listed twice")
    return out


def run_sweep(recipe: Recipe, out: Path, variants: list[Variant], sparsities: list[float], *, data: Path | None = None,
              device: str | None = None, resume: bool = False, force: bool = False, plot: bool = True,
              progress: Callable[[str, ProgressEvent], None] | None = None) -> SweepResult:
    """Run every (variant, sparsity) point in ``out`` (module docstring); returns the result."""
    if not sparsities:
        raise UsageError("--sparsities: give at least one sparsity")
    check_io(**sweep_io(recipe, out, data=data, plot=plot))
    if plot:
        from .plot import require_matplotlib

        require_matplotlib()
    # Every point's recipe and the task's data must be valid before any folder or hours of training.
    recipes = {(v, s): _point_recipe(recipe, v, s) for v in variants for s in sparsities}
    dev = resolve_device(device)
    task = make_task(recipe.task, recipe.task_options, data)
    if recipe.train.init:  # a [train] init the runs would refuse, refused before any folder is made
        load_init(task.build_model(), Path(recipe.train.init))
    out = make_out_folder(out)
    runs = out / "runs"
    if (out / "sweep.json").exists() or (runs.exists() and any(runs.iterdir())):
        if force:
            shutil.rmtree(runs, ignore_errors=True)
            for name in ("sweep.json", "sweep.png"):
                (out / name).unlink(missing_ok=True)
        elif not resume:
            raise OutputError(f"{out} already holds a sweep", hint="pass --resume to continue it or --force to start over")
    runs.mkdir(exist_ok=True)
    dense_history = train_dense(recipe, out / "dense.pt", task=task, device=device,
                                progress=None if progress is None else (lambda e: progress("dense", e)))
    split = task.splits[-1]
    t = recipe.train
    result = SweepResult(str(recipe.path), task.name, task.metric, task.higher_is_better, split,
                         dense_history[0].metrics[split][task.metric],
                         {"dense_steps": t.dense_steps, "steps_per_stage": t.steps_per_stage,
                          "schedule": recipe.options.schedule.kind.value, "stages": recipe.options.schedule.steps,
                          "lr": t.lr, "finetune_lr": t.stage_lr, "batch_size": t.batch_size, "seed": t.seed},
                         str(dev), [v.label for v in variants], list(sparsities))
    dense_run = _dense_budget_recipe(recipe)
    done = _finished(runs / "dense-same-budget", dense_run.key(), split, task.metric)
    if done is None:
        res = run_finetune(dense_run, runs / "dense-same-budget", resume=True, device=device, export=False,
                           dense_checkpoint=out / "dense.pt", task=task,
                           progress=None if progress is None else (lambda e: progress("dense, same budget", e)))
        (runs / "dense-same-budget" / "checkpoint.pt").unlink(missing_ok=True)
        done = res.to_dict()
    result.dense_budget_value = done["stages"][-1]["metrics"][split][task.metric]
    for v in variants:
        for s in sparsities:
            run_dir = runs / f"{v.slug}-s{s:g}"
            done = _finished(run_dir, recipes[(v, s)].key(), split, task.metric)
            if done is None:
                label = f"{v.label} s={s:g}"
                res = run_finetune(recipes[(v, s)], run_dir, resume=True, device=device, export=False,
                                   dense_checkpoint=out / "dense.pt", task=task,
                                   progress=None if progress is None else (lambda e, lb=label: progress(lb, e)))
                (run_dir / "checkpoint.pt").unlink(missing_ok=True)  # metrics.json records the finished run
                done = res.to_dict()
            last = done["stages"][-1]
            after = last["after_prune"][task.metric] if last["after_prune"] else None
            result.points.append(SweepPoint(v.label, done["pattern"], s, last["achieved"],
                                            last["metrics"][split][task.metric], after, last["metrics"],
                                            sum(st["seconds"] for st in done["stages"][1:])))
            write_json(out / "sweep.json", result.to_dict())
    write_json(out / "sweep.json", result.to_dict())
    if plot:
        from .plot import plot_sweep

        plot_sweep(result, out / "sweep.png")
    return result


def sweep_io(recipe: Recipe, out: Path, *, data: Path | None = None, plot: bool = True) -> dict:
    """check_io's arguments for a sweep of ``recipe`` in ``out``: its inputs, the files it writes, and
    ``runs/``, which it fills (and empties with --force): no input may lie there."""
    out = Path(out)
    outputs = [("--out", out / "dense.pt"), ("--out", out / "sweep.json")]
    if plot:
        outputs.append(("--out", out / "sweep.png"))
    return {"inputs": [("recipe", recipe.path), ("[train] init", recipe.train.init or None), ("--data", data)],
            "outputs": outputs, "trees": [("--out", out / "runs")]}


def _dense_budget_recipe(recipe: Recipe) -> Recipe:
    """The recipe with nothing pruned (sparsity 0, no layer rules): the same stages of training."""
    from dataclasses import replace

    from ..patterns.kinds import UnstructuredPattern

    return recipe.with_options(replace(recipe.options, pattern=UnstructuredPattern(0.0), rules=(), include=(),
                                       exclude=()))


def _point_recipe(recipe: Recipe, v: Variant, s: float) -> Recipe:
    return recipe_with_pattern(recipe, v.pattern, s, blocks=v.blocks, block_size=v.block_size,
                               block_shape=v.block_shape, vector_length=v.vector_length)


def _usable(d: dict, split: str, metric: str) -> bool:
    """Whether a finished run's metrics hold what the sweep reads: its pattern, and stage records
    (run.is_stage_record) whose last one has the headline metric (and, where the stage re-masked, the
    metric right after it)."""
    stages = d.get("stages")
    if not isinstance(d.get("pattern"), dict) or not isinstance(stages, list) or not stages \
            or not all(is_stage_record(st) for st in stages):
        return False
    last = stages[-1]
    return (last["metrics"].get(split, {}).get(metric) is not None
            and (not last["after_prune"] or last["after_prune"].get(metric) is not None))


def _finished(run_dir: Path, key: str, split: str, metric: str) -> dict | None:
    """The metrics of a finished run of this point's recipe; None when it has not finished, or when its
    metrics file lacks a field the sweep reads (damaged: the point runs again)."""
    from ..safeio import loads_json, read_text

    path = run_dir / METRICS
    if not path.exists():
        return None
    try:  # a damaged (or hostile) metrics file means "not finished": the point runs again
        d = loads_json(read_text(path, "metrics file"), str(path))
    except InvalidInputError:
        return None
    if not isinstance(d, dict) or not d.get("done"):
        return None
    if d.get("key") != key:
        raise InvalidInputError(f"{run_dir} holds a run of a different recipe",
                                hint="use the recipe the sweep was started with, or --force to start over")
    return d if _usable(d, split, metric) else None
