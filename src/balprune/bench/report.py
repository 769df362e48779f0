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
``selection`` is derived from the measurements (``selection`` below): the runtime's path per row.
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
from ..patterns.registry import ENCODINGS, MODEL_BITMASK_PATH, MODEL_CONV_PATH
from ..runtime.measure import TIE_FRACTION, pick_path
from ..values import as_float

#: Kernels balprune itself can run a layer with (the runtime's choice is the faster of them): a failure
#: of one of these is exit 7; a peer library's is reported and not fatal. Kept here, not in peers.py, so
#: reading and comparing reports imports nothing heavy (no torch).
#: Own paths a subject kernel has besides dense (patterns.registry: an encoding's bench_alternatives;
#: a bitmask-stored balanced layer also runs the offsets kernel on its exact in-memory conversion).
#: The path is the fastest of them; the model runtime's dispatcher times the offsets kernel and, for a
#: bitmask-stored layer, the bitmask kernel (MODEL_BITMASK_PATH); runtime.load runs the stored encoding's kernel.
ALTERNATIVES = {enc.bench_subject: tuple(a.kernel for a in enc.bench_alternatives) for enc in ENCODINGS.values()}
ALTERNATIVES["balanced"] += (MODEL_BITMASK_PATH, MODEL_CONV_PATH)  # a model report's dispatch rows
OWN_PATHS = ("balanced", "bsr", "dense", *(k for ks in ALTERNATIVES.values() for k in ks))


def _own(kernel: str, subject: str | None) -> bool:
    """Whether ``kernel`` is one of balprune's own paths for a row whose subject is ``subject``."""
    return kernel in OWN_PATHS and (kernel in ("dense", subject) or kernel in ALTERNATIVES.get(subject, ()))

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
        """The report as JSON-ready data: every non-finite number (an untimed measurement's times, an
        infinite error, anywhere in meta or selection too) is null, because JSON has no NaN/Infinity."""
        return finite_json({"schema": SCHEMA, "file": self.file, "device": self.device,
                             "read_bandwidth_gbps": self.read_bandwidth_gbps,
                             "measurements": [_measurement_json(m) for m in self.measurements],
                             "unavailable": list(self.unavailable), "selection": selection(self),
                             "meta": dict(self.meta)})

    def write(self, path: Path) -> None:
        """Write the JSON report atomically (replacing an older report at ``path``); strict JSON."""
        from ..container import write_bytes_atomic

        text = json.dumps(self.to_dict(), indent=2, allow_nan=False)
        write_bytes_atomic(Path(path), (text + "\n").encode())


def finite_json(obj: object) -> object:
    """``obj`` with every non-finite float replaced by None, recursively (dicts, lists, tuples)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_json(v) for v in obj]
    return obj


def _finite(m: Measurement | None) -> bool:
    return m is not None and m.correct and math.isfinite(m.median_us)


def rows(report: BenchReport) -> list[dict]:
    """One row per (layer, batch, mode, graph): each kernel's measurement, the subject, the chosen
    path, the ideal time (subject bytes / read bandwidth) and speedups of subject and path."""
    out: dict[tuple, dict] = {}
    for m in report.measurements:
        key = (m.layer, m.dtype, m.batch, m.mode, m.graph)
        row = out.setdefault(key, {"layer": m.layer, "shape": m.shape, "dtype": m.dtype, "batch": m.batch,
                                   "mode": m.mode, "graph": m.graph, "kernels": {}})
        row["kernels"][m.kernel] = m
    for row in out.values():
        ks = row["kernels"]
        subject = next((k for k in ("balanced", "bsr", "csr") if k in ks), None)
        row["subject"] = subject
        s = ks.get(subject)
        row["ideal_us"] = (s.bytes / (report.read_bandwidth_gbps * 1e3)) if s is not None else None
        own = {k: ks[k] for k in OWN_PATHS if _finite(ks.get(k)) and _own(k, subject)}
        # the runtime's rule (a near-tie goes to the path that reads fewer bytes)
        best = own[pick_path({k: m.median_us for k, m in own.items()}, {k: m.bytes for k, m in own.items()})[0]] \
            if own else None
        fastest = min(own.values(), key=lambda m: m.median_us) if own else None
        row["path"] = best.kernel if best else None
        row["path_us"] = best.median_us if best else None
        if best is not None and best.kernel == "dense" and _finite(s):
            row["path_reason"] = f"{subject} kernel {s.median_us / best.median_us:.2f}x slower than dense here"
        elif best is not fastest:
            row["path_reason"] = (f"within {TIE_FRACTION:.0%} of {fastest.kernel} ({fastest.median_us:.1f} us), "
                                  f"{best.bytes / 1e6:.2f} MB read against {fastest.bytes / 1e6:.2f} MB")
        else:
            row["path_reason"] = ""
        row["speedup"] = {}
        for k, m in ks.items():
            if k == subject or k == "stream" or not _finite(m):
                continue
            row["speedup"][k] = (m.median_us / s.median_us) if _finite(s) else None
        d = ks.get("dense")
        row["path_speedup_vs_dense"] = (d.median_us / best.median_us) if best and _finite(d) else None
    return list(out.values())


def selection(report: BenchReport) -> list[dict]:
    """The runtime's choice per (layer, batch, mode, graph), for the JSON report."""
    return [{"layer": r["layer"], "batch": r["batch"], "mode": r["mode"], "graph": r["graph"], "path": r["path"],
             "path_us": r["path_us"], "subject": r["subject"], "reason": r["path_reason"],
             "ideal_us": r["ideal_us"]} for r in rows(report)]


#: The model report's runner that is balprune's own (``bench --model``); "torch" there is a peer.
OWN_MODEL_RUNNER = "balprune"


def own_failures(report: BenchReport) -> list[Measurement]:
    """The measurements of balprune's own paths that failed their correctness gate: the ones that
    make ``bench`` exit 7. Own: in a layer row, its subject kernel when that is one of
    OWN_PATHS (balanced, bsr) and dense (the runtime's alternative); in a model
    report's "model" rows, the balprune runner. A failed peer (CSR, torch's BSR and 2:4, balprune's
    BSR kernel on a balanced layer's block-sparse peer, torch's dense model) is reported, not fatal.
    """
    bad = []
    for r in rows(report):
        for k, m in r["kernels"].items():
            if m.correct:
                continue
            if is_model_unit(r["layer"]) and "model" in report.meta:
                own = k == OWN_MODEL_RUNNER
            else:
                own = _own(k, r["subject"])
            if own:
                bad.append(m)
    return bad


def is_model_unit(layer: str) -> bool:
    """Whether a measurement's layer is an end-to-end unit: "model", or an LLM's "model@ctxN" / "prefill@N"."""
    return layer == "model" or layer.startswith(("model@", "prefill@"))


_FIELDS = {f for f in Measurement.__dataclass_fields__}


def _measurement_json(m: Measurement) -> dict:
    """A measurement as JSON data (to_dict turns its non-finite floats into null with the rest)."""
    return {**asdict(m), "shape": list(m.shape)}

#: A report's top-level fields: those every readable version has, and those version 2 added (or that
#: only some reports carry). Anything else is refused: a misspelt field must not pass unread.
_REQUIRED = ("schema", "file", "device", "read_bandwidth_gbps", "measurements")
_OPTIONAL = ("unavailable", "selection", "meta")

#: The device block's known facts (runtime.measure.Timer.device_facts) and their JSON types; "name" is required.
_DEVICE_FIELDS: dict[str, type] = {"name": str, "compute_capability": int, "multiprocessors": int, "l2_bytes": int,
                                   "cuda_runtime": int, "driver": int, "cupy": str, "torch": str,
                                   "sm_clock_max_khz": int, "memory_clock_max_khz": int}

_UNAVAILABLE_FIELDS: dict[str, type] = {"layer": str, "batch": int, "kernel": str, "reason": str}

_TIMES = ("median_us", "p10_us", "p90_us")
_RATES = ("gbps", "bandwidth_pct")  # derived from the median: not defined for an untimed measurement either


def _got(value: object) -> str:
    """How a wrong value is named in an error: its JSON type and (short) its value."""
    kind = {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "a list",
            dict: "an object", type(None): "null"}.get(type(value), type(value).__name__)
    if value is None:
        return kind
    if isinstance(value, (list, dict)):
        return f"{kind} of {len(value)}"
    text = repr(value)
    return f"{kind} {text[:40] + '...' if len(text) > 40 else text}"


class _Fields:
    """Typed access to one JSON object of a report; every error names the report, the place and the field."""

    def __init__(self, obj: dict, where: str) -> None:
        self.obj, self.where = obj, where

    def _bad(self, key: str, want: str) -> InvalidInputError:
        return InvalidInputError(f"{self.where}: field {key!r} must be {want}, got {_got(self.obj[key])}")

    def text(self, key: str, *, empty: bool = False) -> str:
        v = self.obj[key]
        if not isinstance(v, str) or (not empty and not v):
            raise self._bad(key, "a string" if empty else "a non-empty string")
        return v

    def integer(self, key: str, minimum: int = 0) -> int:
        v = self.obj[key]
        if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
            raise self._bad(key, f"an integer >= {minimum}")
        return v

    def flag(self, key: str) -> bool:
        v = self.obj[key]
        if not isinstance(v, bool):
            raise self._bad(key, "true or false")
        return v

    def number(self, key: str, *, positive: bool = False, null: bool = False) -> float | None:
        """A finite number >= 0 (> 0 with ``positive``), or None where ``null`` allows it."""
        v = self.obj[key]
        if v is None and null:
            return None
        if isinstance(v, int) and not isinstance(v, bool):
            v = as_float(v)  # a JSON integer float() cannot hold is inf: refused below as not finite
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0 \
                or (positive and v == 0):
            want = "a finite number " + ("> 0" if positive else ">= 0") + (" or null" if null else "")
            raise self._bad(key, want)
        return float(v)

    def choice(self, key: str, allowed: tuple[str, ...]) -> str:
        v = self.obj[key]
        if not isinstance(v, str) or v not in allowed:
            raise self._bad(key, " or ".join(repr(a) for a in allowed))
        return v


def _exact_keys(obj: object, where: str, required: tuple[str, ...] | set[str], optional: tuple[str, ...] = ()) -> dict:
    if not isinstance(obj, dict):
        raise InvalidInputError(f"{where} must be an object, got {_got(obj)}")
    missing = [k for k in sorted(required) if k not in obj]
    unknown = [k for k in obj if k not in required and k not in optional]
    if missing or unknown:
        parts = ([f"missing field(s) {', '.join(map(repr, missing))}"] if missing else []) + \
                ([f"unknown field(s) {', '.join(map(repr, unknown))}"] if unknown else [])
        raise InvalidInputError(f"{where}: {'; '.join(parts)}")
    return obj


def _measurement(obj: object, where: str) -> Measurement:
    """One measurement, every field type-checked. Times and the rates derived from them: for a measurement
    that passed its gate, finite (median > 0); one that failed it was not timed: they may be null (read as
    NaN, the in-memory 'not timed'). max_rel_error: a finite number or null (not gated, or not finite)."""
    f = _Fields(_exact_keys(obj, where, _FIELDS), where)
    shape = obj["shape"]
    if not (isinstance(shape, list) and len(shape) == 2
            and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)):
        raise f._bad("shape", "a list of two integers >= 0 ([rows, cols])")
    correct = f.flag("correct")
    times = {k: f.number(k, positive=correct and k == "median_us", null=not correct) for k in _TIMES + _RATES}
    return Measurement(
        layer=f.text("layer"), shape=(shape[0], shape[1]), dtype=f.text("dtype"), batch=f.integer("batch", 1),
        mode=f.choice("mode", ("cold", "hot")), graph=f.flag("graph"), kernel=f.text("kernel"),
        **{k: math.nan if v is None else v for k, v in times.items()},
        bytes=f.integer("bytes"), max_rel_error=f.number("max_rel_error", null=True), correct=correct,
        note=f.text("note", empty=True))


def _device(obj: object, where: str) -> dict:
    """The device block: "name" required; the known facts with their types; other facts only as JSON
    scalars (a later bench may record more; nothing reads them)."""
    if not isinstance(obj, dict):
        raise InvalidInputError(f"{where} must be an object, got {_got(obj)}")
    if "name" not in obj:
        raise InvalidInputError(f"{where}: missing field 'name'")
    dev = obj
    f = _Fields(dev, where)
    for key, value in dev.items():
        kind = _DEVICE_FIELDS.get(key)
        if kind is str:
            f.text(key)
        elif kind is int:
            f.integer(key)
        elif isinstance(value, (list, dict)):
            raise f._bad(key, "a string, number, boolean or null")
    return dict(dev)


def load_report(path: Path) -> BenchReport:
    """Read a benchmark report (schema ``balprune.bench/1`` or ``/2``), checking the type of every field.

    The file is read through safeio (regular files only, size-capped, nesting-bounded, duplicate JSON keys
    NaN/Infinity literals read as null, as older reports wrote them). Refused with InvalidInputError (exit 4) naming the report, the
    measurement's index and the field, and what was expected: an unknown schema; a missing or unknown
    top-level, measurement or ``unavailable`` field; a value of the wrong type (ints are not booleans,
    times are finite and >= 0, a gated measurement's median > 0, null only for the times of a
    measurement that failed its gate and for ``max_rel_error``); a device block without a name; two
    measurements with one identity (``Measurement.key``: compare could match only one of them).
    """
    from ..safeio import loads_json, read_text

    label = f"report {path}"
    # Earlier balprune versions wrote NaN / Infinity literals for untimed measurements and infinite errors:
    # they read as null, which the field checks then allow only where a failed measurement may have it.
    data = loads_json(read_text(path, "report"), label, constants_as_null=True)
    if not isinstance(data, dict):
        raise InvalidInputError(f"{label}: must be a JSON object, got {_got(data)}")
    if data.get("schema") not in READABLE:
        raise InvalidInputError(f"{label}: schema is {_got(data.get('schema'))}, expected one of {', '.join(READABLE)}")
    top = _Fields(_exact_keys(data, label, _REQUIRED, _OPTIONAL), label)
    file = top.text("file", empty=True)
    bandwidth = top.number("read_bandwidth_gbps")
    device = _device(data["device"], f"{label}: device")
    if not isinstance(data["measurements"], list):
        raise top._bad("measurements", "a list")
    out: list[Measurement] = []
    seen: dict[tuple, int] = {}
    for i, m in enumerate(data["measurements"]):
        meas = _measurement(m, f"{label}: measurement #{i}")
        if meas.key in seen:
            layer, dtype, batch, mode, graph, kernel = meas.key
            raise InvalidInputError(
                f"{label}: measurement #{i} repeats measurement #{seen[meas.key]} (layer {layer!r}, dtype {dtype}, "
                f"batch {batch}, {mode}, graph {graph}, kernel {kernel!r}); compare could match only one of them")
        seen[meas.key] = i
        out.append(meas)
    unavailable = data.get("unavailable", [])
    if not isinstance(unavailable, list):
        raise top._bad("unavailable", "a list")
    for i, u in enumerate(unavailable):
        where = f"{label}: unavailable #{i}"
        uf = _Fields(_exact_keys(u, where, tuple(_UNAVAILABLE_FIELDS)), where)
        for key, kind in _UNAVAILABLE_FIELDS.items():
            uf.integer(key, 1) if kind is int else uf.text(key, empty=key == "reason")
    if "selection" in data and not isinstance(data["selection"], list):
        raise top._bad("selection", "a list")  # derived from the measurements on writing; not read back
    meta = data.get("meta", {})
    if not isinstance(meta, dict):
        raise top._bad("meta", "an object")
    return BenchReport(file, device, bandwidth, out, [dict(u) for u in unavailable], dict(meta))
