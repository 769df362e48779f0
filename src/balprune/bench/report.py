"""The benchmark report: dataclasses with unit-suffixed fields, and their versioned JSON.

Schema ``balprune.bench/2``::

    {"schema": "balprune.bench/2", "file": str, "device": {...}, "read_bandwidth_gbps": float,
     "measurements": [{"layer": str, "shape": [rows, cols], "dtype": str, "batch": int,
                       "mode": "cold"|"hot", "graph": bool, "kernel": str,
                       "median_us": float, "p10_us": float, "p90_us": float,
                       "bytes": int, "gbps": float, "bandwidth_pct": float,
                       "max_rel_error": float|null, "correct": bool, "note": str}],
     "unavailable": [{"layer": str, "batch": int, "kernel": str, "reason": str}],
     "selection": [{"layer", "batch", "mode", "graph", "path", "path_us", "subject", "reason", "ideal_us"}],
     "meta": {...}}

``kernel`` is one of bench.peers' names (balanced, bsr, dense, csr, torch_bsr, torch_2:4, stream), or
for a model report's "model" rows balprune / torch.
``selection`` is derived from the measurements (bench.run.selection): the runtime's path per row.
A measurement's identity is (layer, dtype, batch, mode, graph, kernel); ``compare`` matches on it.
A model report (``bench --model``) also has layer "model" rows (kernel "balprune" or "torch": one
unit of work end to end) and ``meta["model"]`` (bench.model says what it holds).
Version 1 (no "unavailable"/"selection", same measurements) is still read.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..errors import InvalidInputError

SCHEMA = "balprune.bench/2"
READABLE = ("balprune.bench/1", SCHEMA)


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
    def key(self) -> tuple[str, str, int, str, bool, str]:
        return (self.layer, self.dtype, self.batch, self.mode, self.graph, self.kernel)


@dataclass
class BenchReport:
    file: str
    device: dict
    read_bandwidth_gbps: float
    measurements: list[Measurement] = field(default_factory=list)
    unavailable: list[dict] = field(default_factory=list)  # peers that cannot run here, with the reason
    meta: dict = field(default_factory=dict)  # what produced it (e.g. the sweep's matrix and sparsities)

    def to_dict(self) -> dict:
        from .run import selection

        return {"schema": SCHEMA, "file": self.file, "device": self.device,
                "read_bandwidth_gbps": self.read_bandwidth_gbps,
                "measurements": [{**asdict(m), "shape": list(m.shape)} for m in self.measurements],
                "unavailable": list(self.unavailable), "selection": selection(self), "meta": dict(self.meta)}

    def write(self, path: Path) -> None:
        """Write the JSON report atomically (replacing an older report at ``path``)."""
        from ..container import write_bytes_atomic

        write_bytes_atomic(Path(path), (json.dumps(self.to_dict(), indent=2) + "\n").encode())


_FIELDS = {f for f in Measurement.__dataclass_fields__}


def load_report(path: Path) -> BenchReport:
    """Read a report, checking the schema strictly; InvalidInputError naming the problem."""
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise InvalidInputError(f"{path}: no such file") from None
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise InvalidInputError(f"{path}: not a JSON benchmark report ({exc})") from None
    if not isinstance(data, dict) or data.get("schema") not in READABLE:
        raise InvalidInputError(f"{path}: schema is {data.get('schema') if isinstance(data, dict) else None!r}, "
                                f"expected one of {', '.join(READABLE)}")
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
        # An untimed measurement (it failed its correctness gate) carries NaN times: compare must
        # still read it, to report the layer as incorrect.
        timed_ok = m["correct"] is not True or (isinstance(med, (int, float)) and med > 0)
        if isinstance(med, bool) or not isinstance(med, (int, float)) or not timed_ok \
                or (m["correct"] is True and math.isnan(med)):
            raise InvalidInputError(f"{path}: measurement #{i}: median_us must be a positive number"
                                    " (NaN only for a measurement that failed its gate)")
    unavailable = data.get("unavailable", [])
    if not isinstance(unavailable, list):
        raise InvalidInputError(f"{path}: 'unavailable' must be a list")
    return BenchReport(str(data.get("file", "")), dict(data.get("device") or {}),
                       float(data.get("read_bandwidth_gbps") or 0.0), out, unavailable, dict(data.get("meta") or {}))
