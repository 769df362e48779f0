"""Configuration files and command-line values -> frozen prune options: layer rules, PruneOptions.

Reads TOML recipes (strict keys and types) and the command line's pattern and schedule values,
and builds the objects their owners define: patterns (balprune.patterns.kinds, built through
balprune.patterns.registry), schedules (balprune.prune.schedule). Every value a user can type
arrives through the strict parsers of balprune.values, from the CLI or from a TOML file, so the
two accept exactly the same spellings. Invalid values raise the project's UsageError (CLI) or
ConfigError (TOML); never ``assert``.
"""

from __future__ import annotations

import fnmatch
import functools
import re
from dataclasses import dataclass, field
from pathlib import Path

from .container import short_repr
from .errors import ConfigError, UsageError
from .formats.layouts import INDEX_CHOICES
from .formats.spec import MAX_TEXT
from .patterns.kinds import Pattern, PatternKind, pattern_to_dict
from .patterns.registry import CLI_SPELLING, OPTION_TOML_TYPES, PATTERN_KEY_OWNER, PATTERNS
from .prune.criteria import Criterion
from .prune.schedule import Schedule, ScheduleKind
from .values import MAX_CALIBRATION_SAMPLES, MAX_SEQ_LEN, parse_positive_int, parse_sparsity


@dataclass(frozen=True)
class LayerRule:
    """A per-layer override: the first rule whose glob matches a tensor name wins."""

    match: str
    skip: bool = False
    pattern: Pattern | None = None

    def matches(self, name: str) -> bool:
        return glob_matcher(self.match)(name) is not None


@functools.cache
def glob_matcher(pattern: str):
    """The compiled match function of a glob (fnmatchcase semantics). Compiled once per pattern: fnmatch's
    own cache holds 32768 patterns, so a recipe with more rules recompiled each one per tensor."""
    return re.compile(fnmatch.translate(pattern)).match


#: Calibration devices (``--device``). The default is the CPU: the same bytes on every machine.
CALIBRATION_DEVICES = ("cpu", "cuda")


@dataclass(frozen=True)
class CalibrationOptions:
    """Where an activation-aware criterion (wanda, sparsegpt) gets its inputs: ``samples`` windows of
    ``seq_len`` tokens drawn (seeded by ``seed``) from the token ids or text of ``data``, tokenized with
    ``tokenizer`` (a folder holding tokenizer.json, or the file; None: the model folder's own), run
    through the model on ``device``."""

    data: Path
    tokenizer: Path | None = None
    samples: int = 128
    seq_len: int = 512
    device: str = "cpu"
    seed: int = 0

    def __post_init__(self) -> None:
        parse_positive_int(self.samples, what="samples", error=ConfigError, maximum=MAX_CALIBRATION_SAMPLES)
        parse_positive_int(self.seq_len, what="seq_len", error=ConfigError, maximum=MAX_SEQ_LEN)
        parse_positive_int(self.seed, what="seed", error=ConfigError, minimum=0)
        if self.device not in CALIBRATION_DEVICES:
            raise ConfigError(f"device must be {' or '.join(CALIBRATION_DEVICES)}, got {short_repr(self.device)}")

    def to_dict(self) -> dict[str, object]:
        """What the packed file's manifest records (the data file by name)."""
        return {"data": Path(self.data).name, "samples": self.samples, "seq_len": self.seq_len, "seed": self.seed,
                "device": self.device}


@dataclass(frozen=True)
class PruneOptions:
    """Everything one prune run needs besides its input and output paths.

    ``criterion`` chooses which weights are kept (prune.criteria); an activation-aware one needs
    ``calibration`` (and, at run time, a model the calibration can run: llm.calibrate).
    """

    pattern: Pattern
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    rules: tuple[LayerRule, ...] = ()
    schedule: Schedule = field(default_factory=Schedule)
    strict: bool = False
    #: how balanced tensors store their positions (formats.layouts.INDEX_CHOICES); recorded per
    #: tensor in the manifest (index_encoding), not in the options (so offsets-only runs write the
    #: same v1 bytes as before the option existed)
    index: str = "auto"
    criterion: Criterion = Criterion.MAGNITUDE
    calibration: CalibrationOptions | None = None

    def __post_init__(self) -> None:
        if self.criterion.calibrated and self.calibration is None:
            raise ConfigError(f"criterion {self.criterion.value} needs calibration data")
        if not self.criterion.calibrated and self.calibration is not None:
            raise ConfigError("calibration data is used by the wanda and sparsegpt criteria only")

    def to_dict(self) -> dict[str, object]:
        # The criterion is recorded only when it is not magnitude, so magnitude runs keep their bytes.
        calibrated = ({"criterion": self.criterion.value, "calibration": self.calibration.to_dict()}
                      if self.calibration is not None else {})
        return {**calibrated,
            **pattern_to_dict(self.pattern),
            "include": list(self.include),
            "exclude": list(self.exclude),
            "rules": [
                {"match": r.match, "skip": r.skip, **(pattern_to_dict(r.pattern) if r.pattern else {})}
                for r in self.rules
            ],
            "schedule": {"kind": self.schedule.kind.value, "steps": self.schedule.steps,
                         "values": list(self.schedule.values)},
            "strict": self.strict,
        }


# --------------------------------------------------------------------------- TOML

#: The pattern keys of a [prune] table, a [[layers]] rule and the command line's overrides:
#: sparsity and every pattern's own keys (patterns.registry). The order is the order a [prune]
#: table's keys are checked against its pattern in (which misplaced key an error names first);
#: tests/test_registry.py checks it lists exactly sparsity and the registry's keys.
_PATTERN_KEYS = ("sparsity", "blocks", "block_size", "block_shape", "vector_length", "nm", "scope")

#: The calibration keys of a [prune] table (``balprune prune`` only; with criterion wanda or sparsegpt).
_CALIBRATION_KEYS = ("calibration", "tokenizer", "samples", "seq_len", "device")
_PRUNE_KEYS = {"pattern", *_PATTERN_KEYS, "include", "exclude", "strict", "index", "criterion", *_CALIBRATION_KEYS}
_LAYER_KEYS = {"match", "skip", "pattern", *_PATTERN_KEYS}
_SCHEDULE_KEYS = {"kind", "steps", "values"}


#: The TOML type each key of the [prune] / [schedule] / [[layers]] tables must have. The option
#: parsers also read command-line strings ("0.9"), so a file's "0.5" would pass them: the file's own
#: types are checked here, where TOML's types are still known.
_KEY_TYPES: dict[str, tuple[type, ...]] = {
    "sparsity": (int, float), "steps": (int,), "pattern": (str,), "kind": (str,), "match": (str,),
    "skip": (bool,), "strict": (bool,), "index": (str,), "include": (list,), "exclude": (list,), "values": (list,),
    "criterion": (str,), "calibration": (str,), "tokenizer": (str,), "samples": (int,), "seq_len": (int,),
    "device": (str,),
    **OPTION_TOML_TYPES,
}
_TOML_TYPE = {int: "an integer", float: "a number", str: "a string", bool: "true or false", list: "an array"}
#: The TOML type of each item of an array key (the sparsity parser reads "0.1" too, as for sparsity above).
_ITEM_TYPES: dict[str, tuple[type, ...]] = {"values": (int, float)}


def _check_keys(table: dict, allowed: set[str], where: str) -> None:
    unknown = sorted(set(table) - allowed)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)}; allowed: {', '.join(sorted(allowed))}")
    for key, value in table.items():
        kinds = _KEY_TYPES.get(key)
        if kinds is None:
            continue
        if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds):
            want = "a number" if kinds == (int, float) else " or ".join(_TOML_TYPE[k] for k in kinds)
            raise ConfigError(f"{where}: {key} must be {want}, got {type(value).__name__} {value!r}"[:300])
        items = _ITEM_TYPES.get(key)
        bad = next((v for v in value if isinstance(v, bool) or not isinstance(v, items)), None) if items else None
        if bad is not None:
            raise ConfigError(f"{where} {key}: expected numbers, got {type(bad).__name__} {bad!r}"[:300])


# Pattern-specific option keys (patterns.registry's PATTERN_KEY_OWNER, CLI_SPELLING): a key given
# for another pattern is refused (a usage error on the command line, a config error in a file),
# never ignored: `--pattern block --blocks 16` would otherwise prune with 8x8 tiles without a word.


def pattern_kind(value: object, *, error=UsageError) -> PatternKind:
    """'balanced' | 'unstructured' | 'block' | 'vector' -> PatternKind; ``error`` otherwise."""
    try:
        return PatternKind(value)
    except ValueError:
        *first, last = (k.value for k in PatternKind)
        raise error(f"pattern: expected {', '.join(first)} or {last}, got {value!r}") from None


def check_keys_fit(kind: PatternKind, values: dict[str, object], *, error=UsageError, where: str = "",
                   spelling: dict[str, str] | None = None, source: str = "") -> None:
    """``error`` naming the first key of ``values`` (not None) that belongs to a pattern other than ``kind``."""
    for key, value in values.items():
        owner = PATTERN_KEY_OWNER.get(key)
        if value is not None and owner is not None and owner is not kind:
            name = (spelling or {}).get(key, key)
            raise error(f"{where}{name} applies to the {owner.value} pattern only; the pattern is {kind.value}"
                        f"{source}")


def check_cli_pattern_options(pattern: str | None, overrides: dict[str, object],
                              config_pattern: object = None) -> PatternKind:
    """The pattern a command will use, after checking the pattern options given on its command line fit it.

    ``pattern`` is --pattern (None: ``config_pattern``, the config's [prune] pattern, else
    balanced). A CLI option of another pattern is a UsageError (exit 2) naming the option and the
    pattern; the CLI calls this before opening any file when the pattern is known without one.
    """
    if pattern is not None:
        kind, source = pattern_kind(pattern), " (--pattern)"
    elif config_pattern is not None:
        kind, source = pattern_kind(config_pattern, error=ConfigError), " (the config's [prune] pattern)"
    else:
        kind, source = PatternKind.BALANCED, " (the default; choose another with --pattern)"
    check_keys_fit(kind, {k: overrides.get(k) for k in PATTERN_KEY_OWNER}, spelling=CLI_SPELLING, source=source)
    given = [CLI_SPELLING.get(k, f"--{k}") for k in ("nm", "sparsity", "blocks", "block_size")
             if overrides.get(k) is not None]
    if "--nm" in given and len(given) > 1:
        raise UsageError(f"--nm sets sparsity and block length itself; drop {', '.join(given[1:])}")
    if "--blocks" in given and "--block-size" in given:
        raise UsageError("--blocks and --block-size are exclusive: give one")
    return kind


def build_pattern(
    kind: str | None,
    *,
    sparsity: object,
    blocks: object = None,
    block_size: object = None,
    block_shape: object = None,
    nm: object = None,
    scope: object = None,
    vector_length: object = None,
    error=UsageError,
    base: Pattern | None = None,
    where: str = "",
) -> Pattern:
    """One pattern from loose values (CLI or TOML), layered over ``base`` where values are None.

    A value that belongs to another pattern (``blocks`` for ``block``, ...) is an ``error``
    (prefixed by ``where``), never silently ignored.
    """
    kind_value = kind if kind is not None else (base.kind.value if base else "balanced")
    pk = pattern_kind(kind_value, error=error)
    values = {"blocks": blocks, "block_size": block_size, "nm": nm, "block_shape": block_shape,
              "vector_length": vector_length, "scope": scope}
    check_keys_fit(pk, values, error=error, where=where)
    spec = PATTERNS[pk]
    return spec.build(sparsity, {o.key: values[o.key] for o in spec.options}, base, error)


def load_config(path: Path) -> dict:
    """Read a TOML recipe: {'prune': {...}, 'schedule': {...}, 'layers': [...]}; strict keys."""
    return validate_config_data(read_toml(path), str(path))


#: Largest TOML config, recipe or plan read (a sensitivity plan of a 10,000-layer model is ~1 MiB).
MAX_CONFIG_BYTES = 64 << 20


def read_toml(path: Path, what: str = "config") -> dict:
    """A TOML file as a dict; ConfigError (exit 4) naming the file when it cannot be read or parsed.

    Read through safeio: only a regular file (a FIFO or device is refused before any read), at
    most ``MAX_CONFIG_BYTES``, strict UTF-8, nesting bounded (never a RecursionError).
    """
    from . import safeio
    from .errors import InvalidInputError

    try:
        text = safeio.read_text(path, what, max_bytes=MAX_CONFIG_BYTES)
        return safeio.loads_toml(text, f"{what} {path}")
    except ConfigError:
        raise
    except InvalidInputError as exc:
        raise ConfigError(exc.message, hint=exc.hint) from None


def validate_config_data(data: dict, where: str, extra_tables: frozenset[str] = frozenset()) -> dict:
    """Check the [prune], [schedule] and [[layers]] tables of a loaded recipe; strict keys.

    ``extra_tables`` are further top-level tables the caller checks itself (fine-tuning recipes).
    """
    _check_keys(data, {"prune", "schedule", "layers"} | set(extra_tables), where)
    path = where
    prune = data.get("prune", {})
    if not isinstance(prune, dict):
        raise ConfigError(f"{path}: [prune] must be a table")
    _check_keys(prune, _PRUNE_KEYS, f"{path} [prune]")
    schedule = data.get("schedule", {})
    if not isinstance(schedule, dict):
        raise ConfigError(f"{path}: [schedule] must be a table")
    _check_keys(schedule, _SCHEDULE_KEYS, f"{path} [schedule]")
    layers = data.get("layers", [])
    if not isinstance(layers, list) or not all(isinstance(x, dict) for x in layers):
        raise ConfigError(f"{path}: layers must be an array of tables ([[layers]])")
    for i, layer in enumerate(layers):
        _check_keys(layer, _LAYER_KEYS, f"{path} [[layers]] #{i + 1}")
        if "match" not in layer or not isinstance(layer["match"], str):
            raise ConfigError(f"{path} [[layers]] #{i + 1}: 'match' (a glob string) is required")
    return data


def build_schedule(kind: object = None, steps: object = None, values: object = None, *, error=UsageError) -> Schedule:
    try:
        sk = ScheduleKind(kind) if kind is not None else ScheduleKind.CUBIC
    except ValueError:
        raise error(f"schedule: expected cubic, linear or list, got {kind!r}") from None
    if values is not None:
        if not isinstance(values, (list, tuple)):
            raise error("schedule values: expected a list of sparsities")
        vals = tuple(parse_sparsity(v, what="schedule value", error=error) for v in values)
        return Schedule(ScheduleKind.LIST, steps=len(vals), values=vals)
    n = parse_positive_int(steps, what="steps", error=error) if steps is not None else 1
    if sk is ScheduleKind.LIST:
        raise error("schedule: kind 'list' needs values")
    return Schedule(sk, steps=n)


def rules_from_config(layers: list[dict], base: Pattern) -> tuple[LayerRule, ...]:
    rules = []
    for layer in layers:
        skip = layer.get("skip", False)
        if not isinstance(skip, bool):
            raise ConfigError(f"layer rule {layer['match']!r}: skip must be true or false")
        over = {k: layer.get(k) for k in _PATTERN_KEYS}
        if skip:
            rules.append(LayerRule(layer["match"], skip=True))
            continue
        pattern = build_pattern(layer.get("pattern"), error=ConfigError, base=base,
                                where=f"layer rule {layer['match']!r}: ", **over)
        rules.append(LayerRule(layer["match"], pattern=pattern))
    return tuple(rules)


def prune_options_from_config(
    data: dict,
    *,
    overrides: dict[str, object] | None = None,
    pattern: str | None = None,
    schedule_kind: object = None,
    steps: object = None,
    include: tuple[str, ...] = (),
    exclude: tuple[str, ...] = (),
    strict: bool = False,
    index: str | None = None,
    calibration: dict[str, object] | None = None,
    config_dir: Path | None = None,
    error=ConfigError,
) -> PruneOptions:
    """PruneOptions from a loaded recipe (``load_config``), with command-line style overrides.

    ``overrides`` holds pattern values (keys of ``_PATTERN_KEYS``; None = not given) that win over
    the recipe's [prune] table; a given blocks / block_size / nm replaces all three of the
    recipe's. The CLI's ``prune`` and the fine-tuning API build their options here, so a recipe
    means the same thing to both.

    Keys of another pattern are never ignored: in ``overrides`` (the command line) they are a
    UsageError (exit 2); in the recipe's [prune] table or a [[layers]] rule they are an ``error``
    (the file contradicts itself). One exception: ``pattern`` (--pattern) replacing the recipe's
    own pattern drops the [prune] keys written for that other pattern, so one recipe serves
    several patterns; [[layers]] rules are still checked against the pattern they end up with.

    ``calibration`` holds the command line's criterion and calibration values (keys ``criterion`` and
    those of ``_CALIBRATION_KEYS``, None = not given; they win over the [prune] table's); only
    ``balprune prune`` passes it, and without it a [prune] table asking for another criterion than
    magnitude is refused (fine-tuning and sensitivity rank by magnitude). The [prune] table's paths are
    relative to ``config_dir`` (the config's folder).
    """
    base = data.get("prune", {})
    cli = {k: (overrides or {}).get(k) for k in _PATTERN_KEYS}
    kind = check_cli_pattern_options(pattern, cli, base.get("pattern"))
    own = {k: base.get(k) for k in _PATTERN_KEYS}
    if pattern is not None and kind.value != base.get("pattern", "balanced"):
        # --pattern replaces the config's pattern, and with it the keys written for that pattern.
        own = {k: v for k, v in own.items() if PATTERN_KEY_OWNER.get(k) in (None, kind)}
    else:
        check_keys_fit(kind, own, error=error, where="[prune] ")
    merged = {k: (cli[k] if cli[k] is not None else own.get(k)) for k in _PATTERN_KEYS}
    if cli["blocks"] is not None or cli["block_size"] is not None or cli["nm"] is not None:
        for k in ("blocks", "block_size", "nm"):
            merged[k] = cli[k]
    if merged["nm"] is None and merged["sparsity"] is None:
        raise error("sparsity is required (--sparsity, --nm N:M, or sparsity in the config's [prune] table)")
    p = build_pattern(kind.value, error=error, **merged)
    sched_cfg = data.get("schedule", {})
    sched = build_schedule(schedule_kind if schedule_kind is not None else sched_cfg.get("kind"),
                           steps if steps is not None else sched_cfg.get("steps"),
                           sched_cfg.get("values"), error=error)
    sched.sparsities(p.sparsity)  # a list schedule must end at the target
    for key, value in (("include", base.get("include", ())), ("exclude", base.get("exclude", ()))):
        if not isinstance(value, (list, tuple)) or not all(isinstance(g, str) for g in value):
            raise error(f"[prune] {key}: expected a list of glob strings")
    inc = tuple(include) or tuple(base.get("include", ()))
    exc = tuple(exclude) or tuple(base.get("exclude", ()))
    for key, globs, cli in (("include", inc, bool(include)), ("exclude", exc, bool(exclude))):
        for g in globs:  # before any work: the packed file records them, its reader takes at most MAX_TEXT
            if len(g) > MAX_TEXT:
                raise error(f"{'--' if cli else '[prune] '}{key}: a glob of {len(g)} characters, over the "
                            f"{MAX_TEXT}-character limit of a recorded option")
    strict_cfg = base.get("strict", False)
    if not isinstance(strict_cfg, bool):
        raise error("[prune] strict: expected true or false")
    index_choice = index if index is not None else base.get("index", "auto")
    if index_choice not in INDEX_CHOICES:
        where = "--index" if index is not None else "[prune] index"
        raise (UsageError if index is not None else error)(
            f"{where} must be one of {', '.join(INDEX_CHOICES)}, got {short_repr(index_choice)}")
    criterion, calib = _criterion_options(base, calibration, config_dir, error)
    rules = rules_from_config(data.get("layers", []), p)
    if index_choice != "auto" and not any(q is not None and q.kind is PatternKind.BALANCED for q in (p, *(r.pattern for r in rules))):
        # an index encoding is a balanced tensor's: asked for with no balanced tensor, it would do nothing
        where = "--index" if index is not None else "[prune] index"
        raise (UsageError if index is not None else error)(
            f"{where} {index_choice}: index encodings apply to the balanced pattern only, not {p.kind.value}")
    if criterion.calibrated and any(q.ranks_globally for q in (p, *(r.pattern for r in rules if r.pattern))):
        raise error(f"criterion {criterion.value} ranks each tensor by its own inputs: it cannot be used with "
                    "the global unstructured scope")
    return PruneOptions(p, include=inc, exclude=exc, rules=rules, schedule=sched, strict=strict or strict_cfg,
                        index=index_choice, criterion=criterion, calibration=calib)


def _criterion_options(base: dict, cli: dict[str, object] | None, config_dir: Path | None,
                       error) -> tuple[Criterion, CalibrationOptions | None]:
    """The criterion and calibration options from the command line (``cli``) over the [prune] table."""
    def pick(key: str) -> tuple[object, str, type]:
        """(value, how to name it in a message, the error class a bad value raises)."""
        given = (cli or {}).get(key)
        if given is not None:
            return given, "--" + key.replace("_", "-"), UsageError
        return base.get(key), f"[prune] {key}", error

    value, where, err = pick("criterion")
    try:
        criterion = Criterion(value if value is not None else "magnitude")
    except ValueError:
        raise err(f"{where} must be {', '.join(c.value for c in Criterion)}, got {short_repr(value)}") from None
    picked = {key: pick(key) for key in _CALIBRATION_KEYS}
    if not criterion.calibrated:
        # --criterion magnitude replacing the config's criterion drops the config's calibration keys (as
        # --pattern drops the keys of the config's pattern): one recipe serves every criterion.
        dropped = where.startswith("--")
        for v, name, e in picked.values():
            if dropped and not name.startswith("--"):
                continue
            if v is not None:
                raise e(f"{name} applies to --criterion wanda or sparsegpt; the criterion is magnitude")
        return criterion, None
    if cli is None:
        raise error(f"[prune] criterion {criterion.value}: only `balprune prune` calibrates; fine-tuning and "
                    "sensitivity rank weights by magnitude", hint="drop the criterion and calibration keys")

    def path(key: str) -> Path | None:
        v, name, _ = picked[key]
        if v is None:
            return None
        # The command line's paths are as typed; a config's are relative to the config's folder.
        return Path(v) if name.startswith("--") or config_dir is None else Path(config_dir) / str(v)

    data = path("calibration")
    if data is None:
        raise UsageError(f"--criterion {criterion.value} needs calibration data: --calibration FILE (token ids "
                         "as .npy or decimal text, or text with a tokenizer)")
    numbers = {}
    for key, bound in (("samples", MAX_CALIBRATION_SAMPLES), ("seq_len", MAX_SEQ_LEN)):
        v, name, e = picked[key]
        if v is not None:
            numbers[key] = parse_positive_int(v, what=name, error=e, maximum=bound)
    device, name, e = picked["device"]
    if device is not None and device not in CALIBRATION_DEVICES:
        raise e(f"{name} must be {' or '.join(CALIBRATION_DEVICES)}, got {short_repr(device)}")
    extra = {"device": device} if device is not None else {}
    return criterion, CalibrationOptions(data, tokenizer=path("tokenizer"), **numbers, **extra)
