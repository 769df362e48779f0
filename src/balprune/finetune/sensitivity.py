"""Per-layer sensitivity: prune one layer at a time across sparsities, and a per-layer sparsity plan.

Two measures:

- metric (a recipe): the task's headline metric on its validation split with only that layer
  pruned one-shot (no fine-tuning), as the relative degradation from the dense model
  ((dense - value) / |dense| for accuracy, (value - dense) / |dense| for perplexity);
- proxy (a checkpoint, no data): the layer's relative output error on random inputs,
  ||(W - W_s) X||_F / ||W X||_F with X ~ N(0, 1) of shape [K, samples] (seeded per layer), W the
  [R, K] matrix view of the weight and W_s its pruned copy.

The plan gives each layer the highest sparsity of the grid whose degradation stays within the
tolerance (none: the layer stays dense) and is written as a prune config (TOML): ``include``
lists the analysed layers and one ``[[layers]]`` rule per layer sets its sparsity (or skips it).
``balprune prune --config plan.toml`` and the fine-tuning recipes' tables accept it; the file is
re-read and checked before it appears.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from .. import __version__
from ..config import PruneOptions, load_config, prune_options_from_config
from ..container import AtomicOutput
from ..errors import InvalidInputError, OutputError
from ..patterns.kinds import (
    BalancedPattern,
    BlockPattern,
    Pattern,
    UnstructuredPattern,
    VectorPattern,
    pattern_to_dict,
)
from ..patterns.ranking import check_finite
from ..prune.masks import one_shot_mask

SCHEMA = "balprune.sensitivity/1"

#: progress(done, total, what)
Progress = Callable[[int, int, str], None]


@dataclass
class LayerSensitivity:
    name: str
    shape: list[int]
    degradation: dict[str, float]  # sparsity (as text, e.g. "0.9") -> relative degradation / error
    values: dict[str, float] = field(default_factory=dict)  # metric mode: the metric itself
    chosen: float | None = None  # the plan's sparsity; None: stays dense


@dataclass
class SensitivityResult:
    source: str
    mode: str  # "metric" or "proxy"
    measure: str
    pattern: dict
    sparsities: list[float]
    tolerance: float
    baseline: float | None  # metric mode: the dense model's metric
    layers: list[LayerSensitivity]

    def to_dict(self) -> dict:
        return {"schema": SCHEMA, "tool_version": __version__, **asdict(self)}


def _key(s: float) -> str:
    return f"{s:g}"


def _with_sparsity(p: Pattern, s: float) -> Pattern:
    return replace(p, sparsity=s)


def _choose(layers: list[LayerSensitivity], sparsities: list[float], tolerance: float) -> None:
    for layer in layers:
        ok = [s for s in sparsities if layer.degradation[_key(s)] <= tolerance]
        layer.chosen = max(ok) if ok else None


def relative_output_error(matrix: torch.Tensor, mask: torch.Tensor, x: torch.Tensor) -> float:
    """||(W - W*mask) X|| / ||W X|| in float64 for the [R, K] matrix W and X [K, n]."""
    w = matrix.to(torch.float64)
    ref = w @ x
    err = torch.where(mask, torch.zeros((), dtype=torch.float64), w) @ x
    denom = float(ref.norm())
    return float(err.norm()) / denom if denom > 0 else 0.0


def sensitivity_from_checkpoint(path: Path, options: PruneOptions, sparsities: list[float], *, samples: int = 64,
                                seed: int = 0, tolerance: float = 0.3, key: str | None = None,
                                progress: Progress | None = None, outputs=()) -> SensitivityResult:
    """Proxy sensitivity of every tensor ``options`` targets in the checkpoint at ``path``.

    ``outputs``: (label, path) pairs of the files the caller will write, checked against every file
    of the checkpoint (the shards of a folder included) before any tensor is read (iopaths.check_io).
    """
    from ..checkpoint import open_checkpoint
    from ..iopaths import check_io
    from ..models.bnfold import fold_batch_norms
    from ..prune.engine import plan_checkpoint

    ckpt = open_checkpoint(path, key=key)
    check_io(inputs=[("checkpoint file", f) for f in ckpt.files], outputs=outputs)
    ckpt, _ = fold_batch_norms(ckpt)  # the weights prune would prune (a ResNet's BN folded into its convs)
    plans = [p for p in plan_checkpoint(ckpt, options) if p.pruned]
    if not plans:
        raise InvalidInputError(f"{path}: no tensor is a pruning target under these options")
    from ..safeio import check_fits_memory

    for plan in plans:  # before any work: x [K, samples], W x and (W - W_s) x [rows, samples], W in float64
        rows = plan.source.shape[-1] if plan.transposed else plan.source.shape[0]
        cols = plan.source.numel // max(rows, 1)
        check_fits_memory(8 * (cols * samples + 2 * rows * samples + 2 * rows * cols),
                          f"tensor {plan.source.name!r} with --samples {samples}")
    layers = []
    total = len(plans) * len(sparsities)
    done = 0
    for i, plan in enumerate(plans):
        name = plan.source.name
        w = ckpt.load(name)
        check_finite(w, name)
        # the matrix prune balances: [out, in] (a GPT-2 Conv1D weight [in, out] as its transpose)
        matrix = w.t() if plan.transposed else w.reshape(w.shape[0], -1)
        # (reduced below 2^63: a seed near the top of its range would overflow the generator's 64-bit seed)
        g = torch.Generator().manual_seed((seed * 1_000_003 + i) % (1 << 63))
        x = torch.randn(matrix.shape[1], samples, generator=g, dtype=torch.float64)
        layer = LayerSensitivity(name, list(w.shape), {})
        for s in sparsities:
            mask = one_shot_mask(matrix, _with_sparsity(plan.pattern, s))
            layer.degradation[_key(s)] = relative_output_error(matrix, mask, x)
            done += 1
            if progress:
                progress(done, total, name)
        layers.append(layer)
    _choose(layers, sparsities, tolerance)
    return SensitivityResult(str(path), "proxy", f"relative output error on {samples} random inputs",
                             _pattern(options.pattern), list(sparsities), tolerance, None, layers)


def sensitivity_from_recipe(recipe, sparsities: list[float], *, data: Path | None = None, device: str | None = None,
                            tolerance: float = 0.02, dense: Path | None = None,
                            progress: Progress | None = None) -> SensitivityResult:
    """Metric sensitivity of the recipe's targets on its task (validation split).

    The dense model is ``dense`` (a dense checkpoint of this recipe: a sweep's ``dense.pt`` or
    ``train_dense``'s file) or, without it, trained here by the recipe's [train] settings.
    """
    from ..tasks import make_task
    from .pruner import Pruner
    from .run import DENSE_HINT, Session, load_checkpoint, resolve_device

    dev = resolve_device(device)
    task = make_task(recipe.task, recipe.task_options, data)
    session = Session(recipe, task, dev)
    pruner = Pruner(session.model, recipe.options, mask_gradients=False)
    if dense is not None:
        state = load_checkpoint(Path(dense), hint=DENSE_HINT)
        if state.get("dense_key") != recipe.dense_key() or state.get("data_id") != task.data_id() or state["stage"] != 0:
            raise InvalidInputError(f"{dense}: not the dense model of this recipe (task, data and [train] must match)")
        session.model.load_state_dict(state["model"])
    else:
        session.set_lr(recipe.train.lr)
        session.train(0, recipe.train.dense_steps, lambda g, loss: None)
    split = task.splits[0]
    sign = 1.0 if task.higher_is_better else -1.0

    def metric() -> float:
        return session.evaluate((split,))[split][task.metric]

    baseline = metric()
    targets = pruner.targets()
    if not targets:
        raise InvalidInputError(f"{recipe.path}: no tensor is a pruning target under the recipe's [prune] table")
    layers = []
    total = len(targets) * len(sparsities)
    done = 0
    for name, (w, pattern) in targets.items():
        saved = w.detach().clone()
        matrix = saved.reshape(saved.shape[0], -1).cpu()
        layer = LayerSensitivity(name, list(w.shape), {})
        for s in sparsities:
            mask = one_shot_mask(matrix, _with_sparsity(pattern, s)).reshape(w.shape).to(w.device)
            with torch.no_grad():
                w.copy_(saved * mask)
            value = metric()
            layer.values[_key(s)] = value
            layer.degradation[_key(s)] = sign * (baseline - value) / abs(baseline) if baseline else math.inf
            done += 1
            if progress:
                progress(done, total, name)
        with torch.no_grad():
            w.copy_(saved)
        layers.append(layer)
    _choose(layers, sparsities, tolerance)
    return SensitivityResult(str(recipe.path), "metric", f"relative {task.metric} degradation on {split}",
                             _pattern(recipe.options.pattern), list(sparsities), tolerance, baseline, layers)


def _pattern(p: Pattern) -> dict:
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in pattern_to_dict(p).items()}


# --------------------------------------------------------------------------- the plan


_TOML_ESCAPES = {'"': '\\"', "\\": "\\\\", "\b": "\\b", "\t": "\\t", "\n": "\\n", "\f": "\\f", "\r": "\\r"}


def toml_string(s: str) -> str:
    """``s`` as a TOML basic string that reads back as exactly ``s``, on one line.

    Quotes and backslashes are escaped; every character that is not printable (controls, DEL,
    line and paragraph separators, format characters) becomes a \\uXXXX / \\UXXXXXXXX escape, so
    no name can end the string, the line or the table, and nothing invisible or terminal-active
    lands in the file. ValueError for a lone surrogate, which no TOML (UTF-8) file can hold.
    """
    out = ['"']
    for ch in s:
        o = ord(ch)
        if ch in _TOML_ESCAPES:
            out.append(_TOML_ESCAPES[ch])
        elif 0xD800 <= o <= 0xDFFF:
            raise ValueError(f"lone surrogate U+{o:04X} cannot be written to a TOML file")
        elif ch.isprintable():
            out.append(ch)
        else:
            out.append(f"\\u{o:04X}" if o <= 0xFFFF else f"\\U{o:08X}")
    out.append('"')
    return "".join(out)


def _comment_str(s: str) -> str:
    """A path for a comment line: quoted and escaped (one line, nothing terminal-active), whatever its bytes."""
    try:
        return toml_string(s)
    except ValueError:  # a path with undecodable bytes (surrogate-escaped): ascii() escapes them
        return ascii(s)


def _unwritable(name: str) -> bool:
    try:
        toml_string(name)
    except ValueError:
        return True
    return False


def _glob_escape(name: str) -> str:
    return "".join(f"[{c}]" if c in "*?[" else c for c in name)


def _pattern_lines(p: Pattern) -> list[str]:
    lines = [f"pattern = {toml_string(p.kind.value)}"]
    if isinstance(p, BalancedPattern):
        lines.append(f"blocks = {p.blocks}" if p.blocks is not None else f"block_size = {p.block_size}")
    elif isinstance(p, BlockPattern):
        lines.append(f'block_shape = "{p.block_shape[0]}x{p.block_shape[1]}"')
    elif isinstance(p, VectorPattern):
        lines.append(f"vector_length = {p.length}")
    elif isinstance(p, UnstructuredPattern):
        lines.append(f"scope = {toml_string(p.scope.value)}")
    return lines


def plan_text(result: SensitivityResult, pattern: Pattern) -> str:
    """The plan as TOML text (module docstring)."""
    chosen = [layer.chosen for layer in result.layers if layer.chosen is not None]
    default = min(chosen) if chosen else min(result.sparsities)
    grid = ", ".join(_key(s) for s in result.sparsities)
    lines = [
        f"# balprune sensitivity plan (balprune {__version__}) for {_comment_str(result.source)}",
        f"# measure: {result.measure}; tolerance {result.tolerance:g}",
        f"# each layer: the highest sparsity of [{grid}] within the tolerance; skip = true when none is",
        "# use: balprune prune CKPT --config THIS_FILE",
        "[prune]",
        *_pattern_lines(pattern),
        f"sparsity = {default!r}",
        "include = [" + ", ".join(toml_string(_glob_escape(layer.name)) for layer in result.layers) + "]",
    ]
    for layer in result.layers:
        d = ", ".join(f"{k}: {v:.4g}" for k, v in layer.degradation.items())
        lines += ["", "[[layers]]", f"# {d}", f"match = {toml_string(_glob_escape(layer.name))}"]
        lines.append(f"sparsity = {layer.chosen!r}" if layer.chosen is not None else "skip = true")
    return "\n".join(lines) + "\n"


def write_plan(result: SensitivityResult, pattern: Pattern, path: Path, *, force: bool = False) -> None:
    """Write the plan TOML atomically, after re-reading it as `balprune prune --config` would.

    Every string (the source path, tensor names as exact globs) goes through ``toml_string``; the
    re-read must give back exactly the globs, the rules and the sparsities written, or nothing
    appears. A name TOML cannot hold (a lone surrogate) is an InvalidInputError naming it.
    """
    from ..iopaths import check_io

    check_io(inputs=[("source", result.source)], outputs=[("plan", path)])
    try:
        text = plan_text(result, pattern)
    except ValueError:
        bad = next(layer.name for layer in result.layers if _unwritable(layer.name))
        raise InvalidInputError(f"tensor {ascii(bad)}: its name cannot be written to a TOML plan",
                                hint="exclude it (--config with exclude) or rename it") from None
    globs = [_glob_escape(layer.name) for layer in result.layers]
    expected = {layer.name: layer.chosen for layer in result.layers}

    def check(tmp: Path) -> None:
        data = load_config(tmp)
        opts = prune_options_from_config(data)
        got = {}
        for layer in result.layers:
            rule = next((r for r in opts.rules if r.matches(layer.name)), None)
            got[layer.name] = None if rule is None or rule.skip else rule.pattern.sparsity
        if (got != expected or opts.pattern.kind.value != result.pattern["pattern"]
                or list(opts.include) != globs or [r.match for r in opts.rules] != globs
                or set(data) != {"prune", "layers"}):
            raise OutputError(f"{path}: the plan read back differs from the plan written")

    with AtomicOutput(Path(path), force=force) as out:
        out.file.write(text.encode("utf-8"))
        out.commit(check)
