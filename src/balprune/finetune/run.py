"""Algorithm 1 end to end on a built-in task: train dense, then prune a step, fine-tune, evaluate, repeat.

A run lives in one folder:

    checkpoint.pt                   after every stage (model, optimizer, pruner masks, history),
                                    replaced atomically; --resume continues from it
    metrics.json                    per-stage metrics (schema balprune.finetune/1), replaced atomically
    model.<pattern>.safetensors     the packed model, written once the last stage is done

Stage 0 trains the dense model (``dense_steps``); stage i >= 1 applies schedule step i (nested
masks, exactly k_t per block for balanced), evaluates the damage, fine-tunes ``steps_per_stage``
steps with the masks held (balprune.finetune.Pruner) and evaluates again.

Every training step draws its batch (and seeds dropout and augmentation) from a generator seeded
with (seed, global step), so the run is a function of its recipe and seed: resuming after an
interruption gives exactly the weights and metrics of an uninterrupted run on the same device.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .. import __version__
from ..container import AtomicOutput
from ..errors import InvalidInputError, NoGpuError, OutputError, UsageError
from ..iopaths import check_io
from ..tasks import Task, make_task
from ..values import finite_number
from .pruner import Pruner
from .recipe import Recipe

CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.json"
CHECKPOINT_SCHEMA = "balprune.finetune-checkpoint/1"
METRICS_SCHEMA = "balprune.finetune/1"


@dataclass(frozen=True)
class ProgressEvent:
    """What the run is doing, for a progress display (the library never prints)."""

    phase: str  # "train", "eval" or "stage" (a stage just finished)
    stage: int  # 0 = dense training, 1..stages = schedule steps
    stages: int
    step: int  # steps done in this stage
    stage_steps: int
    global_step: int
    total_steps: int
    sparsity: float
    loss: float | None
    metric_name: str
    metric: float | None  # the headline metric of the last evaluation


ProgressFn = Callable[[ProgressEvent], None]


@dataclass
class StageResult:
    stage: int
    sparsity: float  # the default pattern's sparsity at this step (0 for the dense stage)
    achieved: float  # zeros / elements over every pruned tensor
    steps: int
    global_step: int  # optimizer steps done when the stage ended
    after_prune: dict[str, float] | None  # headline split, right after re-masking (before fine-tuning)
    metrics: dict[str, dict[str, float]]  # split -> metrics, after fine-tuning
    seconds: float


@dataclass
class FinetuneResult:
    recipe: str
    key: str
    task: str
    task_data: dict
    metric: str
    higher_is_better: bool
    headline_split: str
    pattern: dict
    device: str
    stages: list[StageResult] = field(default_factory=list)
    packed: str | None = None
    packed_bytes: int | None = None
    dense_bytes: int | None = None
    done: bool = False

    def value(self, stage: StageResult | None = None) -> float:
        """The headline metric of ``stage`` (default: the last)."""
        s = stage if stage is not None else self.stages[-1]
        return s.metrics[self.headline_split][self.metric]

    @property
    def dense_value(self) -> float:
        return self.value(self.stages[0])

    def to_dict(self) -> dict:
        return {"schema": METRICS_SCHEMA, "tool_version": __version__, **asdict(self)}


def resolve_device(name: str | None) -> torch.device:
    """'cpu', 'cuda', 'cuda:N' or None/'auto' (CUDA when present, else CPU); NoGpuError without CUDA."""
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name == "cuda" or (name.startswith("cuda:") and name[5:].isdigit()):
        if not torch.cuda.is_available():
            raise NoGpuError(f"--device {name}: no CUDA device is available", hint="use --device cpu")
        return torch.device(name)
    raise UsageError(f"--device: expected cpu, cuda or cuda:N, got {name!r}")


def step_seed(seed: int, global_step: int) -> int:
    """The seed of one training step's batch, dropout and augmentation."""
    return (seed * 1_000_003 + global_step) % (2**63 - 1)


class Session:
    """A task's model and optimizer on a device, trained step by step (module docstring)."""

    def __init__(self, recipe: Recipe, task: Task, device: torch.device) -> None:
        self.recipe, self.task, self.device = recipe, task, device
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(recipe.train.seed)
            self.model = task.build_model()
        if recipe.train.init:
            load_init(self.model, Path(recipe.train.init))
        self.model.to(device)
        t = recipe.train
        if t.optimizer == "adam":
            self.optimizer = torch.optim.Adam(self.model.parameters(), lr=t.lr, weight_decay=t.weight_decay)
        else:
            self.optimizer = torch.optim.SGD(self.model.parameters(), lr=t.lr, momentum=t.momentum,
                                             weight_decay=t.weight_decay)

    def set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def train(self, first_step: int, steps: int, on_step: Callable[[int, float], None]) -> None:
        t = self.recipe.train
        self.model.train()
        for g in range(first_step, first_step + steps):
            seed = step_seed(t.seed, g)
            generator = torch.Generator().manual_seed(seed)
            torch.manual_seed(seed)  # dropout, augmentation
            batch = self.task.batch(generator, t.batch_size)
            loss = self.task.loss(self.model, batch, self.device)
            if not torch.isfinite(loss):
                raise InvalidInputError(f"training diverged at step {g} (loss {loss.item()})",
                                        hint="lower lr / finetune_lr or set grad_clip in the recipe's [train]")
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if t.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), t.grad_clip)
            self.optimizer.step()  # the pruner's post-step hook re-applies the masks
            on_step(g, loss.item())

    def evaluate(self, splits: tuple[str, ...] | None = None) -> dict[str, dict[str, float]]:
        self.model.eval()
        try:
            return {s: self.task.evaluate(self.model, s, self.device) for s in (splits or self.task.splits)}
        finally:
            self.model.train()


def load_init(model: torch.nn.Module, path: Path) -> None:
    """Load a state dict (any format ``balprune prune`` reads, loaded safely) into ``model``, strictly."""
    from ..checkpoint import open_checkpoint

    ckpt = open_checkpoint(path)
    names = {t.name for t in ckpt.tensors} | set(ckpt.aliases)
    want = set(model.state_dict())
    if names != want:
        missing, extra = sorted(want - names), sorted(names - want)
        raise InvalidInputError(f"[train] init {path}: does not fit the task's model (missing {missing[:3]}, "
                                f"unexpected {extra[:3]})")
    state = {n: ckpt.load(ckpt.aliases.get(n, n)) for n in want}
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise InvalidInputError(f"[train] init {path}: {str(exc).splitlines()[0]}") from None


def check_export_strict(task: Task, recipe: Recipe) -> None:
    """What exporting the task's model under a [prune] strict = true recipe would refuse, refused now.

    The export prunes by the same plans (names, dtypes and shapes only), so a shortfall or a
    non-float matrix it would refuse after the last stage is an InvalidInputError before the first.
    """
    from ..checkpoint import SourceTensor
    from ..container import dtype_code
    from ..prune.engine import check_shortfalls
    from ..prune.plan import plan_tensor
    from .pruner import clean_state_dict

    with torch.random.fork_rng(devices=[]):  # the run's own model is seeded in Session; leave the RNG alone
        model = task.build_model()
    plans = [plan_tensor(SourceTensor(name, dtype_code(t.dtype, name=name), tuple(t.shape),
                                      t.numel() * t.element_size()), recipe.options)
             for name, t in clean_state_dict(model).items()]
    check_shortfalls(plans, recipe.options)


def achieved_sparsity(pruner: Pruner) -> float:
    masks = pruner.masks
    total = sum(m.numel() for m in masks.values())
    return 0.0 if not total else 1.0 - sum(int(m.sum()) for m in masks.values()) / total


# --------------------------------------------------------------------------- files


def write_json(path: Path, obj: dict) -> None:
    """Write a JSON file atomically (complete or absent)."""
    with AtomicOutput(path, force=True) as out:
        out.file.write((json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())
        out.commit(lambda tmp: json.loads(Path(tmp).read_text()))


def save_checkpoint(path: Path, state: dict) -> None:
    """torch.save ``state`` atomically (save.save_torch_atomic); it holds only tensors and plain values."""
    from ..save import save_torch_atomic

    save_torch_atomic(state, path, force=True)


#: What to do about an unusable checkpoint: a run's own is replaced by starting over; a --dense one is the
#: user's input and is never to be deleted.
RUN_HINT = "delete it, or pass --force to start over"
DENSE_HINT = "pass the dense.pt that a sweep of this recipe wrote"


def load_checkpoint(path: Path, *, hint: str = RUN_HINT) -> dict:
    """A run's checkpoint.pt (or a sweep's dense.pt), read as every user torch file is
    (checkpoint.load_torch_file: regular files only, storage claims checked, weights_only, signals
    passed through); InvalidInputError (exit 4) for anything that is not one of balprune's."""
    from ..checkpoint import load_torch_file

    try:
        state = load_torch_file(path)
    except InvalidInputError as exc:
        raise InvalidInputError(f"{path}: not a readable fine-tuning checkpoint ({exc.one_line()})",
                                hint=hint) from None
    if not isinstance(state, dict) or state.get("schema") != CHECKPOINT_SCHEMA:
        raise InvalidInputError(f"{path}: not a balprune fine-tuning checkpoint")
    for name, kinds in _STATE_TYPES.items():
        value = state.get(name)
        ok = isinstance(value, kinds) and not isinstance(value, bool)
        if ok and isinstance(value, int) and value < 0:
            ok = False
        if not ok:
            raise InvalidInputError(f"{path}: the checkpoint's field {name!r} is missing or of the wrong type "
                                    f"({type(value).__name__})", hint=hint)
    return state


#: The fields a fine-tuning checkpoint must hold, with their types (ints >= 0); what _restore and the
#: resume logic read. A damaged or hand-edited checkpoint is refused here (exit 4), not mid-run (exit 70).
_STATE_TYPES: dict[str, type | tuple[type, ...]] = {
    "stage": int, "global_step": int, "history": str, "model": dict, "optimizer": dict, "pruner": dict,
    "key": (str, type(None)), "dense_key": str, "data_id": str}


_STAGE_FIELDS = set(StageResult.__dataclass_fields__)


def _history(state: dict) -> list[StageResult]:
    """The checkpoint's stage history (a JSON list of StageResult objects), every entry's keys checked."""
    from ..safeio import loads_json

    items = loads_json(state["history"], "checkpoint history")
    if not isinstance(items, list) or not all(is_stage_record(s) for s in items):
        raise InvalidInputError(f"checkpoint history: expected a list of stage records with the fields "
                                f"{', '.join(sorted(_STAGE_FIELDS))} (ints, finite numbers, metric objects)")
    return [StageResult(**s) for s in items]


def is_stage_record(s: object) -> bool:
    """Whether ``s`` is one StageResult as JSON (a checkpoint's history, a run's metrics.json ``stages``): exactly
    its fields, each of its type (ints, finite numbers, metric objects)."""
    return isinstance(s, dict) and set(s) == _STAGE_FIELDS and _stage_typed(s)


def _number(v: object) -> bool:
    return finite_number(v)


def _metric_map(v: object) -> bool:
    return isinstance(v, dict) and all(isinstance(k, str) and (_number(x) or x is None) for k, x in v.items())


def _stage_typed(s: dict) -> bool:
    """One history record's field types (StageResult): what the tables and metrics.json print."""
    return (all(isinstance(s[k], int) and not isinstance(s[k], bool) for k in ("stage", "steps", "global_step"))
            and all(_number(s[k]) for k in ("sparsity", "achieved", "seconds"))
            and (s["after_prune"] is None or _metric_map(s["after_prune"]))
            and isinstance(s["metrics"], dict)
            and all(isinstance(k, str) and _metric_map(v) for k, v in s["metrics"].items()))


def _checkpoint_state(session: Session, pruner: Pruner, recipe: Recipe, task: Task, stage: int, global_step: int,
                      history: list[StageResult], key: str | None) -> dict:
    return {
        "schema": CHECKPOINT_SCHEMA, "key": key, "dense_key": recipe.dense_key(), "data_id": task.data_id(),
        "stage": stage, "global_step": global_step,
        "model": {k: v.detach().cpu() for k, v in session.model.state_dict().items()},
        "optimizer": session.optimizer.state_dict(), "pruner": pruner.state_dict(),
        "history": json.dumps([asdict(h) for h in history]),
    }


def _restore(session: Session, pruner: Pruner, state: dict, *, with_pruner: bool = True) -> None:
    """Load a checkpoint's model, optimizer (and pruner) state; InvalidInputError (exit 4) when they do
    not fit this recipe's model (a checkpoint edited by hand: the recipe key matched)."""
    try:
        session.model.load_state_dict(state["model"])
        session.optimizer.load_state_dict(state["optimizer"])
        if with_pruner:
            pruner.load_state_dict(state["pruner"])
    except (RuntimeError, KeyError, ValueError, TypeError) as exc:
        raise InvalidInputError(f"the checkpoint's state does not fit this recipe's model: {type(exc).__name__}: "
                                f"{str(exc).splitlines()[0][:200] if str(exc) else ''}",
                                hint="delete it, or pass --force to start over") from None


def packed_name(recipe: Recipe) -> str:
    return f"model.{recipe.options.pattern.kind.value}.safetensors"


def make_out_folder(out: Path) -> Path:
    """The --out folder, created if missing (its parent must exist); OutputError if it is a file."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise OutputError(f"--out {out} is a file, not a folder")
    if not out.exists():
        if not out.parent.is_dir():
            raise OutputError(f"output folder {out.parent} does not exist")
        try:
            out.mkdir()
        except OSError as exc:
            raise OutputError(f"cannot create {out}: {exc.strerror or exc}") from None
    return out


def run_io(recipe: Recipe, out: Path, *, data: Path | None = None, dense_checkpoint: Path | None = None) -> dict:
    """check_io's arguments for a run of ``recipe`` in ``out``: its inputs (the recipe, its [train] init,
    the data, a dense checkpoint to start from) and every file the run writes or, with --force, deletes."""
    out = Path(out)
    # The packed model is written (export) or, like every packed model of an earlier run whatever its
    # pattern, deleted by --force: all of them count as outputs.
    outputs = [("--out", out / CHECKPOINT), ("--out", out / METRICS), ("--out", out / packed_name(recipe))]
    if out.is_dir():
        outputs += [("--out", p) for p in sorted(out.glob("model.*.safetensors")) if p.name != packed_name(recipe)]
    inputs = [("recipe", recipe.path), ("[train] init", recipe.train.init or None), ("--data", data),
              ("dense checkpoint", dense_checkpoint)]
    return {"inputs": inputs, "outputs": outputs}


def prepare_run_folder(out: Path, *, resume: bool, force: bool) -> None:
    """Create the run folder (its parent must exist); refuse to mix with an earlier run unless told."""
    out = make_out_folder(out)
    if not os.access(out, os.W_OK):
        raise OutputError(f"cannot write in {out}")
    ours = [out / CHECKPOINT, out / METRICS, *sorted(out.glob("model.*.safetensors"))]
    existing = [p for p in ours if p.exists()]
    if existing and force:
        for p in existing:
            p.unlink()
    elif existing and not resume:
        raise OutputError(f"{out} already holds a run ({existing[0].name})",
                          hint="pass --resume to continue it or --force to start over")


# --------------------------------------------------------------------------- the run


def run_finetune(recipe: Recipe, out: Path, *, data: Path | None = None, resume: bool = False, force: bool = False,
                 device: str | None = None, progress: ProgressFn | None = None, export: bool = True,
                 dense_checkpoint: Path | None = None, task: Task | None = None) -> FinetuneResult:
    """Run ``recipe`` in the folder ``out`` (module docstring) and return its metrics.

    ``dense_checkpoint`` (a sweep's shared dense model, ``train_dense``) replaces stage 0 when
    the run has no checkpoint of its own. ``task`` reuses an already loaded task.
    """
    out = Path(out)
    check_io(**run_io(recipe, out, data=data, dense_checkpoint=dense_checkpoint))
    dev = resolve_device(device)
    packed = packed_name(recipe)
    task = task if task is not None else make_task(recipe.task, recipe.task_options, data)
    if export and recipe.options.strict:
        check_export_strict(task, recipe)  # what the export's strict check would refuse, before hours of training
    session = Session(recipe, task, dev)  # (loads [train] init: a refused one leaves no run folder behind)
    prepare_run_folder(out, resume=resume, force=force)
    t = recipe.train
    pruner = Pruner(session.model, recipe.options, optimizer=session.optimizer)
    n = pruner.steps
    key = recipe.key()
    result = FinetuneResult(str(recipe.path), key, task.name, task.describe(), task.metric, task.higher_is_better,
                            task.splits[-1], _pattern_dict(recipe), str(dev))
    history: list[StageResult] = []
    stage, global_step = -1, 0
    ckpt_path = out / CHECKPOINT
    if resume and ckpt_path.exists():
        state = load_checkpoint(ckpt_path)
        if state.get("key") != key:
            raise InvalidInputError(f"{ckpt_path} was written by a different recipe (or recipe version)",
                                    hint="use the recipe it was started with, or --force to start over")
        if state.get("data_id") != task.data_id():
            raise InvalidInputError(f"{ckpt_path}: the data differs from the data the run started with",
                                    hint="pass the same --data, or --force to start over")
        _restore(session, pruner, state)
        stage, global_step, history = state["stage"], state["global_step"], _history(state)
    elif dense_checkpoint is not None:
        state = load_checkpoint(Path(dense_checkpoint), hint=DENSE_HINT)
        if state.get("dense_key") != recipe.dense_key() or state.get("data_id") != task.data_id() or state["stage"] != 0:
            raise InvalidInputError(f"{dense_checkpoint}: a dense model of a different task, data or training")
        _restore(session, pruner, state, with_pruner=False)
        stage, global_step, history = 0, state["global_step"], _history(state)
        save_checkpoint(ckpt_path, _checkpoint_state(session, pruner, recipe, task, 0, global_step, history, key))

    total = t.dense_steps + n * t.steps_per_stage
    last_metric = [history[-1].metrics[task.splits[-1]][task.metric] if history else None]

    def emit(phase, st, step, stage_steps, g, loss=None):
        if progress is not None:
            progress(ProgressEvent(phase, st, n, step, stage_steps, g, total, pruner.sparsity, loss, task.metric,
                                   last_metric[0]))

    def write_metrics():
        result.stages = list(history)
        write_json(out / METRICS, result.to_dict())

    while stage < n:
        stage += 1
        started = time.perf_counter()
        after = None
        if stage == 0:
            steps, lr = t.dense_steps, t.lr
        else:
            steps, lr = t.steps_per_stage, t.stage_lr
            pruner.advance()
            emit("eval", stage, 0, steps, global_step)
            after = session.evaluate((task.splits[-1],))[task.splits[-1]]
        session.set_lr(lr)
        first = global_step
        session.train(first, steps, lambda g, loss, st=stage, s=steps, f=first: emit("train", st, g - f + 1, s, g + 1, loss))
        global_step = first + steps
        emit("eval", stage, steps, steps, global_step)
        metrics = session.evaluate()
        last_metric[0] = metrics[task.splits[-1]][task.metric]
        history.append(StageResult(stage, pruner.sparsity, achieved_sparsity(pruner), steps, global_step, after,
                                   metrics, round(time.perf_counter() - started, 3)))
        save_checkpoint(ckpt_path, _checkpoint_state(session, pruner, recipe, task, stage, global_step, history, key))
        write_metrics()
        emit("stage", stage, steps, steps, global_step)

    if export:
        report = pruner.export(out / packed, force=True, hf=task.hf_files())
        result.packed, result.packed_bytes, result.dense_bytes = str(out / packed), report.packed_bytes, report.dense_bytes
    result.done = True
    write_metrics()
    return result


def train_dense(recipe: Recipe, path: Path, *, task: Task, device: str | None = None,
                progress: ProgressFn | None = None) -> list[StageResult]:
    """Train and evaluate the dense model of ``recipe`` (stage 0 of ``run_finetune``) into ``path``.

    Reused when ``path`` already holds this recipe's dense model. A sweep trains it once and
    starts every pattern and sparsity from it (``run_finetune(dense_checkpoint=path)``), which
    gives exactly the result of running each recipe alone.
    """
    path = Path(path)
    if path.exists():
        state = load_checkpoint(path)
        if state.get("dense_key") == recipe.dense_key() and state.get("data_id") == task.data_id():
            return _history(state)
    dev = resolve_device(device)
    t = recipe.train
    session = Session(recipe, task, dev)
    pruner = Pruner(session.model, recipe.options, optimizer=session.optimizer)
    started = time.perf_counter()
    session.set_lr(t.lr)

    def on_step(g, loss):
        if progress is not None:
            progress(ProgressEvent("train", 0, pruner.steps, g + 1, t.dense_steps, g + 1, t.dense_steps, 0.0, loss,
                                   task.metric, None))

    session.train(0, t.dense_steps, on_step)
    metrics = session.evaluate()
    history = [StageResult(0, 0.0, 0.0, t.dense_steps, t.dense_steps, None, metrics,
                           round(time.perf_counter() - started, 3))]
    save_checkpoint(path, _checkpoint_state(session, pruner, recipe, task, 0, t.dense_steps, history, None))
    return history


def _pattern_dict(recipe: Recipe) -> dict:
    from ..patterns.kinds import pattern_to_dict

    d = pattern_to_dict(recipe.options.pattern)
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in d.items()}


def relative_change(value: float, reference: float) -> float:
    """(value - reference) / |reference|; nan when the reference is 0."""
    return math.nan if reference == 0 else (value - reference) / abs(reference)
