"""The strict parsers every user-typed value goes through: sparsities, bounded integers, HxW, N:M.

The command line and TOML files (balprune.config), and the frozen pattern and schedule classes'
own validation (balprune.patterns.kinds, balprune.prune.schedule), read values here, so all of
them accept exactly the same spellings. A bad value raises the ``error`` given (the project's
UsageError on the command line, ConfigError in a file); never ``assert``. This module depends on
balprune.errors only, so the pattern classes can validate without importing balprune.config.
"""

from __future__ import annotations

import math
import re

from .errors import UsageError

_DECIMAL = re.compile(r"^(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][-+]?[0-9]+)?$")  # ASCII digits only: float() reads others
_INTEGER = re.compile(r"^[+-]?[0-9]+$")  # ASCII digits only (\d would take Arabic-Indic digits)


def as_float(v: int | float) -> float:
    """``float(v)``, except that an integer too large for a float (JSON and TOML hold any size) is +-inf
    rather than an OverflowError: every caller refuses a non-finite number already."""
    try:
        return float(v)
    except OverflowError:
        return math.inf if v > 0 else -math.inf


def finite_number(v: object) -> bool:
    """``v`` is a JSON/TOML number (an int or float, not a bool) with a finite value (as_float: an integer of
    any size is judged by its float, inf past the float range)."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(as_float(v))


def number_repr(v: object) -> str:
    """``repr(v)`` for an error line, an integer of more than 20 digits as its digit count (a file's 400-digit
    number is not worth a line of its own)."""
    if isinstance(v, int) and not isinstance(v, bool) and abs(v) >= 10**20:
        return f"an integer of {len(str(abs(v)))} digits"
    return repr(v)


def parse_sparsity(text: object, *, what: str = "--sparsity", error=UsageError) -> float:
    """A sparsity in [0, 1) from a plain decimal ('0.9', '.5', '9e-1'); nothing else.

    Refused: negatives, 1 and above, nan, inf, percentages, underscores, empty strings. 0 is
    allowed (the caller warns: nothing is pruned).
    """
    if isinstance(text, bool):
        raise error(f"{what}: expected a number in [0, 1), got {text!r}")
    if isinstance(text, (int, float)):
        value = as_float(text)
        if not math.isfinite(value):
            raise error(f"{what}: expected a number in [0, 1), got {number_repr(text)}")
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

#: Calibration (``prune --criterion wanda|sparsegpt``) and evaluation (``eval``): most windows and tokens
#: per window. Memory is checked against the model's shapes before anything is allocated; these only
#: refuse absurd values.
MAX_CALIBRATION_SAMPLES = 1 << 16
MAX_SEQ_LEN = 1 << 20

#: The largest value an integer option or file key accepts, by the name its parser is given
#: (``what``): generous for honest use, small enough that no value asks for an allocation or a
#: run no machine could finish. Every other integer is bounded by ``MAX_INT``.
INT_LIMITS: dict[str, int] = {
    "--steps": MAX_SCHEDULE_STEPS, "steps": MAX_SCHEDULE_STEPS, "schedule steps": MAX_SCHEDULE_STEPS,
    "--seed": MAX_SEED, "--samples": MAX_CALIBRATION_SAMPLES, "--seq-len": MAX_SEQ_LEN,
    # bench: a batch is one GEMM's column count, iterations are timed launches, a device an index
    "--batch": 1 << 16, "--iters": 1 << 20, "--frames": 1 << 16, "--device": 1 << 10,
}

#: ``generate --max-new-tokens``: most new tokens one command generates.
MAX_NEW_TOKENS = 1 << 16

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
