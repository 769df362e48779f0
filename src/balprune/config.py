"""Frozen, validated configuration: sparsity patterns, schedules, layer rules and prune options.

Every value a user can type arrives through one of the strict parsers here, from the CLI or from
a TOML file, so the two accept exactly the same spellings. Invalid values raise the project's
UsageError (CLI) or ConfigError (TOML); never ``assert``.
"""

from __future__ import annotations

import enum
import fnmatch
import functools
import math
import re
from dataclasses import dataclass, field, replace
from fractions import Fraction
from pathlib import Path
from typing import Union

from .errors import ConfigError, UsageError

_DECIMAL = re.compile(r"^(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][-+]?[0-9]+)?$")  # ASCII digits only: float() reads others
_INTEGER = re.compile(r"^[+-]?[0-9]+$")  # ASCII digits only (\d would take Arabic-Indic digits)


def parse_sparsity(text: object, *, what: str = "--sparsity", error=UsageError) -> float:
    """A sparsity in [0, 1) from a plain decimal ('0.9', '.5', '9e-1'); nothing else.

    Refused: negatives, 1 and above, nan, inf, percentages, underscores, empty strings. 0 is
    allowed (the caller warns: nothing is pruned).
    """
    if isinstance(text, bool):
        raise error(f"{what}: expected a number in [0, 1), got {text!r}")
    if isinstance(text, (int, float)):
        value = float(text)
        if not math.isfinite(value):
            raise error(f"{what}: expected a number in [0, 1), got {text!r}")
    else:
        s = str(text).strip()
        if not _DECIMAL.match(s):
            raise error(f"{what}: expected a decimal number in [0, 1) such as 0.9, got {str(text)!r}")
        value = float(s)
    if not 0.0 <= value < 1.0:
        why = " (1.0 would remove every weight)" if "sparsit" in what else ""
        raise error(f"{what}: must be in [0, 1){why}, got {value:g}")
    return value


#: Most schedule steps (Algorithm 1's GraduallyIncrease) a run may ask for: each step prunes every
#: target again (and, when fine-tuning, trains between steps); the paper uses tens.
MAX_SCHEDULE_STEPS = 10_000

#: Seeds are torch generator seeds: [0, 2**63).
MAX_SEED = 2**63 - 1

#: The largest value an integer option or file key accepts, by the name its parser is given
#: (``what``): generous for honest use, small enough that no value asks for an allocation or a
#: run no machine could finish. Every other integer is bounded by ``MAX_INT``.
INT_LIMITS: dict[str, int] = {
    "--steps": MAX_SCHEDULE_STEPS, "steps": MAX_SCHEDULE_STEPS, "schedule steps": MAX_SCHEDULE_STEPS,
    "--seed": MAX_SEED, "--samples": 1 << 16,
    # bench: a batch is one GEMM's column count, iterations are timed launches, a device an index
    "--batch": 1 << 16, "--iters": 1 << 20, "--frames": 1 << 16, "--device": 1 << 10,
}

#: The bound of any integer value (a signed 64-bit integer, what torch and the file format hold).
MAX_INT = 2**63 - 1


def parse_positive_int(text: object, *, what: str, error=UsageError, minimum: int = 1,
                       maximum: int | None = None) -> int:
    """A plain integer in [``minimum``, ``maximum``] ('32'); refuses '2.5', '1_0', '1e9', '', booleans.

    ``maximum`` defaults to ``INT_LIMITS[what]``, else ``MAX_INT``; the error names the bound.
    """
    if maximum is None:
        maximum = INT_LIMITS.get(what, MAX_INT)
    if isinstance(text, bool):
        raise error(f"{what}: expected an integer, got {text!r}")
    if isinstance(text, int):
        value = text
    else:
        s = str(text).strip()
        if not _INTEGER.match(s):
            raise error(f"{what}: expected an integer, got {str(text)[:40]!r}")
        if len(s.lstrip("+-").lstrip("0")) > 19:  # beyond any bound (and int() of 4301+ digits raises)
            raise error(f"{what}: must be at most {maximum}, got a {len(s)}-digit number")
        value = int(s)
    if value < minimum:
        raise error(f"{what}: must be >= {minimum}, got {value}")
    if value > maximum:
        raise error(f"{what}: must be at most {maximum}, got {value}")
    return value


def parse_block_shape(text: object, *, what: str = "--block-shape", error=UsageError) -> tuple[int, int]:
    """'8x8' (or a [8, 8] list from TOML) -> (8, 8)."""
    if isinstance(text, (list, tuple)) and len(text) == 2:
        parts = list(text)
    else:
        parts = str(text).lower().split("x")
        if len(parts) != 2:
            raise error(f"{what}: expected HxW such as 8x8, got {str(text)!r}")
    h = parse_positive_int(parts[0], what=what, error=error)
    w = parse_positive_int(parts[1], what=what, error=error)
    return (h, w)


def parse_nm(text: str, *, what: str = "--nm", error=UsageError) -> tuple[int, int]:
    """'2:4' -> (2, 4): keep N of every M consecutive weights (balanced with block length M)."""
    parts = str(text).split(":")
    if len(parts) != 2:
        raise error(f"{what}: expected N:M such as 2:4, got {text!r}")
    n = parse_positive_int(parts[0], what=what, error=error)
    m = parse_positive_int(parts[1], what=what, error=error, minimum=2)
    if n >= m:
        raise error(f"{what}: N must be smaller than M, got {text!r}")
    return (n, m)


def keep_count(sparsity: float, length: int) -> int:
    """Entries kept out of ``length`` at ``sparsity``: the documented rounding rule.

    k = floor((1 - s) * length + 1/2), computed exactly from the shortest decimal form of ``s``
    (so 0.9 means nine tenths, not the binary float nearest to it), clamped to [1, length].
    Halves round up. Every pattern uses this rule: per block (balanced), per tensor
    (unstructured), per tile count (block).
    """
    exact = (1 - Fraction(repr(float(sparsity)))) * length + Fraction(1, 2)
    return max(1, min(length, math.floor(exact)))


class PatternKind(str, enum.Enum):
    BALANCED = "balanced"
    UNSTRUCTURED = "unstructured"
    BLOCK = "block"
    VECTOR = "vector"


class UnstructuredScope(str, enum.Enum):
    TENSOR = "tensor"
    GLOBAL = "global"


@dataclass(frozen=True)
class BalancedPattern:
    """Balanced sparsity: each row split into blocks; every block keeps the same k entries.

    Exactly one of ``blocks`` (B per row; block length L = ceil(K / B)) and ``block_size``
    (L directly; B = ceil(K / L)) is set. N:M is ``block_size=M, sparsity=1 - N/M``.
    """

    sparsity: float
    blocks: int | None = 32
    block_size: int | None = None

    def __post_init__(self) -> None:
        parse_sparsity(self.sparsity, what="sparsity", error=ConfigError)
        if (self.blocks is None) == (self.block_size is None):
            raise ConfigError("balanced pattern: set exactly one of blocks and block_size")
        for name in ("blocks", "block_size"):
            v = getattr(self, name)
            if v is not None:
                parse_positive_int(v, what=name, error=ConfigError)

    @property
    def kind(self) -> PatternKind:
        return PatternKind.BALANCED


@dataclass(frozen=True)
class UnstructuredPattern:
    """Unstructured magnitude pruning, per tensor or with one global threshold."""

    sparsity: float
    scope: UnstructuredScope = UnstructuredScope.TENSOR

    def __post_init__(self) -> None:
        parse_sparsity(self.sparsity, what="sparsity", error=ConfigError)

    @property
    def kind(self) -> PatternKind:
        return PatternKind.UNSTRUCTURED


@dataclass(frozen=True)
class BlockPattern:
    """Block sparsity: bh x bw tiles kept or dropped whole, ranked by tile L2 norm."""

    sparsity: float
    block_shape: tuple[int, int] = (8, 8)

    def __post_init__(self) -> None:
        parse_sparsity(self.sparsity, what="sparsity", error=ConfigError)
        parse_block_shape(self.block_shape, what="block_shape", error=ConfigError)

    @property
    def kind(self) -> PatternKind:
        return PatternKind.BLOCK


@dataclass(frozen=True)
class VectorPattern:
    """Vector sparsity: 1-D vectors of ``length`` consecutive weights of a row, kept or dropped whole.

    The coarse-grained baseline of the paper's accuracy figures (after Mao et al. 2017): a row
    [K] is cut into ceil(K / length) vectors, ranked by their L2 norm across the whole matrix.
    It is block sparsity with 1 x ``length`` tiles, and is packed as such (BSR, FORMAT.md).
    """

    sparsity: float
    length: int = 8

    def __post_init__(self) -> None:
        parse_sparsity(self.sparsity, what="sparsity", error=ConfigError)
        parse_positive_int(self.length, what="vector_length", error=ConfigError)

    @property
    def kind(self) -> PatternKind:
        return PatternKind.VECTOR

    @property
    def block_shape(self) -> tuple[int, int]:
        """The tile shape that packs this pattern: (1, length)."""
        return (1, self.length)


Pattern = Union[BalancedPattern, UnstructuredPattern, BlockPattern, VectorPattern]


def pattern_to_dict(p: Pattern) -> dict[str, object]:
    """A JSON-ready description of a pattern (recorded in the packed file's manifest)."""
    out: dict[str, object] = {"pattern": p.kind.value, "sparsity": p.sparsity}
    if isinstance(p, BalancedPattern):
        out["blocks" if p.blocks is not None else "block_size"] = p.blocks if p.blocks is not None else p.block_size
    elif isinstance(p, UnstructuredPattern):
        out["scope"] = p.scope.value
    elif isinstance(p, VectorPattern):
        out["vector_length"] = p.length
    else:
        out["block_shape"] = list(p.block_shape)
    return out


class ScheduleKind(str, enum.Enum):
    CUBIC = "cubic"
    LINEAR = "linear"
    LIST = "list"


@dataclass(frozen=True)
class Schedule:
    """GraduallyIncrease of Algorithm 1: the sparsities of the steps, ending at the target.

    cubic: s_t = s_f * (1 - (1 - t/n)^3) (Zhu & Gupta 2017), t = 1..n; linear: s_t = s_f * t/n;
    list: the given values, which must be non-decreasing and end at the target.
    """

    kind: ScheduleKind = ScheduleKind.CUBIC
    steps: int = 1
    values: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        parse_positive_int(self.steps, what="schedule steps", error=ConfigError)
        if self.kind is ScheduleKind.LIST:
            if not self.values:
                raise ConfigError("schedule kind 'list' needs values")
            for v in self.values:
                parse_sparsity(v, what="schedule value", error=ConfigError)
            if any(b < a for a, b in zip(self.values, self.values[1:])):
                raise ConfigError("schedule values must be non-decreasing")

    def sparsities(self, target: float) -> list[float]:
        if self.kind is ScheduleKind.LIST:
            if not math.isclose(self.values[-1], target):
                raise ConfigError(f"schedule values end at {self.values[-1]}, target sparsity is {target}")
            return list(self.values[:-1]) + [target]
        n = self.steps
        if self.kind is ScheduleKind.LINEAR:
            out = [target * t / n for t in range(1, n + 1)]
        else:
            out = [target * (1 - (1 - t / n) ** 3) for t in range(1, n + 1)]
        out[-1] = target
        return [round(s, 12) for s in out]


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


@dataclass(frozen=True)
class PruneOptions:
    """Everything one prune run needs besides its input and output paths."""

    pattern: Pattern
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    rules: tuple[LayerRule, ...] = ()
    schedule: Schedule = field(default_factory=Schedule)
    strict: bool = False

    def to_dict(self) -> dict[str, object]:
        return {
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

_PRUNE_KEYS = {"pattern", "sparsity", "blocks", "block_size", "block_shape", "vector_length", "nm", "scope",
               "include", "exclude", "strict"}
_LAYER_KEYS = {"match", "skip", "pattern", "sparsity", "blocks", "block_size", "block_shape", "vector_length", "nm",
               "scope"}
_SCHEDULE_KEYS = {"kind", "steps", "values"}


#: The TOML type each key of the [prune] / [schedule] / [[layers]] tables must have. The option
#: parsers also read command-line strings ("0.9"), so a file's "0.5" would pass them: the file's own
#: types are checked here, where TOML's types are still known.
_KEY_TYPES: dict[str, tuple[type, ...]] = {
    "sparsity": (int, float), "blocks": (int,), "block_size": (int,), "vector_length": (int,), "steps": (int,),
    "pattern": (str,), "block_shape": (str,), "nm": (str,), "scope": (str,), "kind": (str,), "match": (str,),
    "skip": (bool,), "strict": (bool,), "include": (list,), "exclude": (list,), "values": (list,),
}
_TOML_TYPE = {int: "an integer", float: "a number", str: "a string", bool: "true or false", list: "an array"}


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


#: Pattern-specific option keys and the one pattern each applies to. A key given for another
#: pattern is refused (a usage error on the command line, a config error in a file), never
#: ignored: `--pattern block --blocks 16` would otherwise prune with 8x8 tiles without a word.
PATTERN_KEY_OWNER: dict[str, PatternKind] = {
    "blocks": PatternKind.BALANCED, "block_size": PatternKind.BALANCED, "nm": PatternKind.BALANCED,
    "block_shape": PatternKind.BLOCK, "vector_length": PatternKind.VECTOR, "scope": PatternKind.UNSTRUCTURED,
}

#: How the command line spells each key.
CLI_SPELLING: dict[str, str] = {"blocks": "--blocks", "block_size": "--block-size", "nm": "--nm",
                                "block_shape": "--block-shape", "vector_length": "--vector-length", "scope": "--scope"}


def pattern_kind(value: object, *, error=UsageError) -> PatternKind:
    """'balanced' | 'unstructured' | 'block' | 'vector' -> PatternKind; ``error`` otherwise."""
    try:
        return PatternKind(value)
    except ValueError:
        raise error(f"pattern: expected balanced, unstructured, block or vector, got {value!r}") from None


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
    check_keys_fit(pk, {"blocks": blocks, "block_size": block_size, "nm": nm, "block_shape": block_shape,
                        "vector_length": vector_length, "scope": scope}, error=error, where=where)
    if nm is not None:
        if sparsity is not None or blocks is not None or block_size is not None:
            raise error("nm: N:M sets sparsity and block size itself; drop sparsity/blocks/block-size")
        n, m = parse_nm(nm, error=error)
        return BalancedPattern(sparsity=float(Fraction(m - n, m)), blocks=None, block_size=m)
    if sparsity is None:
        if base is None:
            raise error("sparsity: required")
        s = base.sparsity
    else:
        s = parse_sparsity(sparsity, what="sparsity", error=error)
    if pk is PatternKind.BALANCED:
        if blocks is not None and block_size is not None:
            raise error("blocks and block-size are exclusive: give one")
        if blocks is not None:
            return BalancedPattern(s, blocks=parse_positive_int(blocks, what="blocks", error=error))
        if block_size is not None:
            return BalancedPattern(s, blocks=None, block_size=parse_positive_int(block_size, what="block-size", error=error))
        if isinstance(base, BalancedPattern):
            return replace(base, sparsity=s)
        return BalancedPattern(s)
    if pk is PatternKind.UNSTRUCTURED:
        if scope is not None:
            try:
                sc = UnstructuredScope(scope)
            except ValueError:
                raise error(f"scope: expected tensor or global, got {scope!r}") from None
        else:
            sc = base.scope if isinstance(base, UnstructuredPattern) else UnstructuredScope.TENSOR
        return UnstructuredPattern(s, scope=sc)
    if pk is PatternKind.VECTOR:
        if vector_length is not None:
            length = parse_positive_int(vector_length, what="vector-length", error=error)
        else:
            length = base.length if isinstance(base, VectorPattern) else 8
        return VectorPattern(s, length=length)
    if block_shape is not None:
        shape = parse_block_shape(block_shape, error=error)
    else:
        shape = base.block_shape if isinstance(base, BlockPattern) else (8, 8)
    return BlockPattern(s, block_shape=shape)


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
        over = {k: layer.get(k) for k in ("sparsity", "blocks", "block_size", "block_shape", "vector_length", "nm",
                                          "scope")}
        if skip:
            rules.append(LayerRule(layer["match"], skip=True))
            continue
        pattern = build_pattern(layer.get("pattern"), error=ConfigError, base=base,
                                where=f"layer rule {layer['match']!r}: ", **over)
        rules.append(LayerRule(layer["match"], pattern=pattern))
    return tuple(rules)


_PATTERN_KEYS = ("sparsity", "blocks", "block_size", "block_shape", "vector_length", "nm", "scope")


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
    strict_cfg = base.get("strict", False)
    if not isinstance(strict_cfg, bool):
        raise error("[prune] strict: expected true or false")
    return PruneOptions(p, include=inc, exclude=exc, rules=rules_from_config(data.get("layers", []), p),
                        schedule=sched, strict=strict or strict_cfg)
