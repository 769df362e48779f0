"""The benchmark report: dataclasses with unit-suffixed fields, and their versioned JSON.

Schema ``balprune.bench/1``::

    {"schema": "balprune.bench/1", "file": str, "device": {...}, "read_bandwidth_gbps": float,
     "measurements": [{"layer": str, "shape": [rows, cols], "dtype": str, "batch": int,
                       "mode": "cold"|"hot", "graph": bool, "kernel": str,
                       "median_us": float, "p10_us": float, "p90_us": float,
                       "bytes": int, "gbps": float, "bandwidth_pct": float,
                       "max_rel_error": float|null, "correct": bool, "note": str}]}

A measurement's identity is (layer, batch, mode, graph, kernel); ``compare`` matches on it.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..errors import InvalidInputError

SCHEMA = "balprune.bench/1"


@dataclass(frozen=True)
class Measurement:
    layer: str
    shape: tuple[int, int]
    dtype: str
    batch: int
    mode: str  # "cold" | "hot"
    graph: bool
    kernel: str  # "balanced", "dense", "csr", "bsr", ...
    median_us: float
    p10_us: float
    p90_us: float
    bytes: int
    gbps: float
    bandwidth_pct: float
    max_rel_error: float | None = None
    correct: bool = True
    note: str = ""

    @property
    def key(self) -> tuple[str, int, str, bool, str]:
        return (self.layer, self.batch, self.mode, self.graph, self.kernel)


@dataclass
class BenchReport:
    file: str
    device: dict
    read_bandwidth_gbps: float
    measurements: list[Measurement] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"schema": SCHEMA, "file": self.file, "device": self.device,
                "read_bandwidth_gbps": self.read_bandwidth_gbps,
                "measurements": [{**asdict(m), "shape": list(m.shape)} for m in self.measurements]}

    def write(self, path: Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")


_FIELDS = {f for f in Measurement.__dataclass_fields__}


def load_report(path: Path) -> BenchReport:
    """Read a report, checking the schema strictly; InvalidInputError naming the problem."""
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise InvalidInputError(f"{path}: no such file") from None
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise InvalidInputError(f"{path}: not a JSON benchmark report ({exc})") from None
    if not isinstance(data, dict) or data.get("schema") != SCHEMA:
        raise InvalidInputError(f"{path}: schema is {data.get('schema') if isinstance(data, dict) else None!r}, "
                                f"expected {SCHEMA!r}")
    ms = data.get("measurements")
    if not isinstance(ms, list):
        raise InvalidInputError(f"{path}: 'measurements' must be a list")
    out = []
    for i, m in enumerate(ms):
        if not isinstance(m, dict) or set(m) != _FIELDS:
            raise InvalidInputError(f"{path}: measurement #{i} must have exactly the fields {sorted(_FIELDS)}")
        try:
            out.append(Measurement(**{**m, "shape": tuple(m["shape"])}))
        except TypeError as exc:
            raise InvalidInputError(f"{path}: measurement #{i}: {exc}") from None
        med = m["median_us"]
        if isinstance(med, bool) or not isinstance(med, (int, float)) or not med > 0:
            raise InvalidInputError(f"{path}: measurement #{i}: median_us must be a positive number")
    return BenchReport(str(data.get("file", "")), dict(data.get("device") or {}),
                       float(data.get("read_bandwidth_gbps") or 0.0), out)
