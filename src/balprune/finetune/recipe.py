"""Fine-tuning recipes: one strict TOML file holding the task, the training and the pruning.

    [task]        name = "digits" | "lstm-lm" | "vgg16", plus that task's options
    [train]       seed, batch_size, optimizer, lr, finetune_lr, momentum, weight_decay,
                  dense_steps, steps_per_stage, grad_clip, init (a state dict to start from)
    [prune]       as `balprune prune --config` (pattern, sparsity, blocks, ...)
    [schedule]    as `balprune prune --config` (kind, steps, values): Algorithm 1's GraduallyIncrease
    [[layers]]    as `balprune prune --config`

Unknown tables or keys are refused (ConfigError, exit 4) naming the file, the table and what is
allowed. The [prune] / [schedule] / [[layers]] part is exactly a prune config, so the model a
fine-tuning run exports is pruned by the rules ``balprune prune`` would apply.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from .. import safeio
from ..config import (
    PruneOptions,
    _check_keys,
    prune_options_from_config,
    read_toml,
    validate_config_data,
)
from ..errors import ConfigError
from ..tasks import TASKS, TaskSpec
from ..tasks.base import Option
from ..values import MAX_SEED

#: Most optimizer steps one phase (dense training, one fine-tuning stage) may ask for.
MAX_TRAIN_STEPS = 10_000_000

#: Largest learning rate or weight decay a recipe may set.
MAX_RATE = 1e4

TRAIN_OPTIONS: dict[str, Option] = {
    "seed": Option(0, 0, "seed of the initial weights, batches and augmentation", maximum=MAX_SEED),
    "batch_size": Option(64, 1, "training batch size", maximum=1 << 16),
    "optimizer": Option("sgd", None, "sgd (with momentum) or adam"),
    # bounds far above any useful value, below what overflows float32 inside the optimizer (exit 70 before)
    "lr": Option(0.1, 0.0, "learning rate of the dense training", maximum=MAX_RATE),
    "finetune_lr": Option(-1.0, None, "learning rate of the fine-tuning stages (default: lr)", maximum=MAX_RATE),
    "momentum": Option(0.9, 0.0, "SGD momentum", maximum=1.0),
    "weight_decay": Option(0.0, 0.0, "L2 weight decay", maximum=MAX_RATE),
    "dense_steps": Option(500, 0, "optimizer steps of the dense model before pruning", maximum=MAX_TRAIN_STEPS),
    "steps_per_stage": Option(100, 0, "fine-tuning steps after each schedule step (N of Algorithm 1)",
                              maximum=MAX_TRAIN_STEPS),
    "grad_clip": Option(0.0, 0.0, "clip the gradient norm to this (0: off)", maximum=1e30),
    "init": Option("", None, "a state dict to start from (path relative to the recipe; '' = random init)"),
}


@dataclass(frozen=True)
class TrainConfig:
    seed: int = 0
    batch_size: int = 64
    optimizer: str = "sgd"
    lr: float = 0.1
    finetune_lr: float = -1.0
    momentum: float = 0.9
    weight_decay: float = 0.0
    dense_steps: int = 500
    steps_per_stage: int = 100
    grad_clip: float = 0.0
    init: str = ""

    @property
    def stage_lr(self) -> float:
        return self.lr if self.finetune_lr < 0 else self.finetune_lr


@dataclass(frozen=True)
class Recipe:
    """A parsed recipe. ``prune_config`` is its prune-config part, ``options`` built from it."""

    path: Path
    task: TaskSpec
    task_options: dict
    train: TrainConfig
    prune_config: dict
    options: PruneOptions
    init_sha256: str = ""  # of the [train] init checkpoint, when there is one

    def dense_key(self) -> str:
        """Digest of what the dense model depends on: task, task options, training settings."""
        t = asdict(self.train)
        dense = {k: t[k] for k in ("seed", "batch_size", "optimizer", "lr", "momentum", "weight_decay",
                                   "dense_steps", "grad_clip")}
        dense["init"] = self.init_sha256
        return _digest({"task": self.task.name, "task_options": self.task_options, "train": dense})

    def key(self) -> str:
        """Digest of everything a run's result depends on (besides the data and the device)."""
        return _digest({"dense": self.dense_key(), "train": asdict(self.train), "options": self.options.to_dict()})

    def with_options(self, options: PruneOptions) -> Recipe:
        return replace(self, options=options)


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def load_recipe(path: str | Path) -> Recipe:
    """Read and validate a fine-tuning recipe (module docstring); ConfigError on any problem."""
    path = Path(path)
    data = read_toml(path, "recipe")
    where = str(path)
    validate_config_data(data, where, extra_tables=frozenset({"task", "train"}))
    task_table = data.get("task")
    if not isinstance(task_table, dict):
        raise ConfigError(f"{where}: a [task] table with name = one of {', '.join(TASKS)} is required")
    name = task_table.get("name")
    if name not in TASKS:
        raise ConfigError(f"{where} [task] name: expected one of {', '.join(TASKS)}, got {name!r}")
    spec = TASKS[name]
    task_options = spec.parse_options({k: v for k, v in task_table.items() if k != "name"}, f"{where} [task]")
    train_table = data.get("train", {})
    if not isinstance(train_table, dict):
        raise ConfigError(f"{where}: [train] must be a table")
    _check_keys(train_table, set(TRAIN_OPTIONS), f"{where} [train]")
    train = TrainConfig(**{k: opt.parse(train_table[k], f"{where} [train] {k}") if k in train_table else opt.default
                           for k, opt in TRAIN_OPTIONS.items()})
    if train.optimizer not in ("sgd", "adam"):
        raise ConfigError(f"{where} [train] optimizer: expected sgd or adam, got {train.optimizer!r}")
    if "finetune_lr" in train_table and train.finetune_lr < 0:
        raise ConfigError(f"{where} [train] finetune_lr: must be >= 0, got {train.finetune_lr!r}")
    _check_model_fits(spec, task_options, train.optimizer, train.batch_size, where)
    init_sha = ""
    if train.init:
        init = safeio.resolve_links(path.parent / train.init, f"{where} [train] init", error=ConfigError)
        if not init.exists():
            raise ConfigError(f"{where} [train] init: {init} does not exist")
        train = replace(train, init=str(init))
        init_sha = _init_sha256(init, f"{where} [train] init")
    prune_config = {k: data[k] for k in ("prune", "schedule", "layers") if k in data}
    if "prune" not in prune_config:
        raise ConfigError(f"{where}: a [prune] table (pattern, sparsity, ...) is required")
    options = prune_options_from_config(prune_config, error=ConfigError)
    return Recipe(path, spec, task_options, train, prune_config, options, init_sha)


def _check_model_fits(spec: TaskSpec, options: dict, optimizer: str, batch_size: int, where: str) -> None:
    """ConfigError (exit 4) when the model these options build cannot be trained in this machine's memory.

    Counted before any data is read or tensor allocated: fp32 weights, gradients and the
    optimizer's state (SGD's momentum: 12 bytes a parameter; Adam's two moments: 16), then one training
    batch's inputs and logits (TaskSpec.batch_bytes); the other activations come on top, so this refuses
    only what cannot possibly run.
    """
    if spec.model_params is None:
        return

    params = spec.model_params(options)
    need = (16 if optimizer == "adam" else 12) * params
    safeio.check_fits_memory(need, f"{where} [task]: the {spec.name} model has {params:,} parameters; training it",
                             hint="choose smaller sizes in [task]", error=ConfigError)
    if spec.batch_bytes is not None:
        batch = spec.batch_bytes(options, batch_size)
        safeio.check_fits_memory(need + batch, f"{where}: training the {spec.name} model ({params:,} parameters) on "
                                 f"batches of {batch_size} ({safeio.human(batch)} of inputs and logits each)",
                                 hint="choose a smaller [train] batch_size or smaller sizes in [task]", error=ConfigError)


def _init_sha256(path: Path, what: str) -> str:
    """Digest of the [train] init checkpoint: a regular file, or the regular files of a sharded folder.

    A FIFO, a device or a link to one is refused (ConfigError, exit 4) before any read, so hashing
    never hangs or reads without end; links inside a folder are not followed out of it.
    """
    from ..errors import InvalidInputError

    h = hashlib.sha256()
    try:
        if path.is_dir():
            files = []
            for f in sorted(path.rglob("*")):
                if f.is_symlink() and not safeio.resolve_links(f, what, error=ConfigError).is_relative_to(
                        safeio.resolve_links(path, what, error=ConfigError)):  # both sides resolved
                    raise ConfigError(f"{what}: {f} links outside {path}")
                if not f.is_dir():
                    files.append(safeio.check_regular(f, what))
        else:
            files = [safeio.check_regular(path, what)]
        for f in files:
            with safeio.open_regular(f, what) as fh:
                for chunk in iter(lambda: fh.read(1 << 24), b""):
                    h.update(chunk)
    except ConfigError:
        raise
    except InvalidInputError as exc:
        raise ConfigError(exc.message, hint=exc.hint) from None
    return h.hexdigest()[:16]


def recipe_with_pattern(recipe: Recipe, pattern: str, sparsity: float, *, blocks: int | None = None,
                        block_size: int | None = None, block_shape: tuple[int, int] | None = None,
                        vector_length: int | None = None) -> Recipe:
    """The recipe with its default pattern replaced (a sweep's point); rules and schedule kept.

    The recipe's [prune] pattern keys (blocks, block_size, nm, block_shape, vector_length,
    scope) apply when the pattern is unchanged or the key belongs to the new pattern.
    """
    base = dict(recipe.prune_config.get("prune", {}))
    same = base.get("pattern", "balanced") == pattern
    for k in ("blocks", "block_size", "nm", "block_shape", "vector_length", "scope"):
        if not same:
            base.pop(k, None)
    base.pop("nm", None)
    base["pattern"] = pattern
    base["sparsity"] = sparsity
    if blocks is not None:
        base.pop("block_size", None)
        base["blocks"] = blocks
    if block_size is not None:
        base.pop("blocks", None)
        base["block_size"] = block_size
    if block_shape is not None:
        base["block_shape"] = list(block_shape)
    if vector_length is not None:
        base["vector_length"] = vector_length
    cfg = {**recipe.prune_config, "prune": base}
    options = prune_options_from_config(cfg, error=ConfigError)
    return replace(recipe, prune_config=cfg, options=options)
