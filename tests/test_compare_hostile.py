"""`balprune compare` on malformed and hostile reports: every field it reads is type-checked.

A CI gate must not pass a report it misread: each case is exit 4 with one `balprune: error:` line
naming the report, the place (measurement index, device block, ...) and the field with what was
expected; the reports are unchanged; nothing hangs (a FIFO is refused before it is read).
"""

from __future__ import annotations

import copy
import hashlib
import json
import os

import pytest
from helpers import run_subprocess

from balprune.bench.report import SCHEMA, BenchReport, Measurement


def _m(layer="fc6", kernel="balanced", median=10.0, batch=1):
    return Measurement(layer, (4096, 25088), "F16", batch, "cold", False, kernel, median, median * 0.9, median * 1.1,
                       1000, 100.0, 2.5, 1e-4, True, "")


def _good() -> dict:
    rep = BenchReport("m.safetensors", {"name": "NVIDIA H200", "compute_capability": 90}, 4000.0,
                      [_m(), _m(kernel="dense", median=50.0), _m(layer="fc7")],
                      [{"layer": "fc6", "batch": 1, "kernel": "torch_2:4", "reason": "float32"}], {"kind": "test"})
    return rep.to_dict()


def _set(path: tuple, value):
    """A mutation of the good report: the value at ``path`` replaced (a missing key added)."""
    def apply(d):
        obj = d
        for p in path[:-1]:
            obj = obj[p]
        obj[path[-1]] = value
        return d
    return apply


def _drop(path: tuple):
    def apply(d):
        obj = d
        for p in path[:-1]:
            obj = obj[p]
        del obj[path[-1]]
        return d
    return apply


M0, M1 = ("measurements", 0), ("measurements", 1)

#: (mutation, words the error line must hold)
CASES = {
    "correct as a string": (_set(M0 + ("correct",), "yes"), ["measurement #0", "'correct'", "true or false",
                                                             "a string 'yes'"]),
    "correct string, null time": (lambda d: _set(M0 + ("median_us",), None)(_set(M0 + ("correct",), "yes")(d)),
                                  ["measurement #0", "'correct'", "true or false"]),
    "gated time null": (_set(M1 + ("median_us",), None), ["measurement #1", "'median_us'", "finite number > 0"]),
    "time as a string": (_set(M0 + ("median_us",), "10.5"), ["'median_us'", "finite number > 0", "a string"]),
    "time negative": (_set(M0 + ("p10_us",), -1.0), ["'p10_us'", ">= 0"]),
    "time zero": (_set(M0 + ("median_us",), 0), ["'median_us'", "> 0"]),
    "time overflowing to inf": (lambda d: d | {"__raw__": ("10.0", "1e400")}, ["'median_us'", "finite"]),
    # an integer literal float() cannot hold (OverflowError: exit 70 before)
    "time a huge integer": (lambda d: d | {"__raw__": ("10.0", "1" + "0" * 400)}, ["'median_us'", "finite"]),
    "time a boolean": (_set(M0 + ("p90_us",), True), ["'p90_us'", "a boolean"]),
    "batch a boolean": (_set(M0 + ("batch",), True), ["'batch'", "an integer >= 1", "a boolean True"]),
    "batch a float": (_set(M0 + ("batch",), 1.0), ["'batch'", "an integer >= 1", "a number 1.0"]),
    "batch zero": (_set(M0 + ("batch",), 0), ["'batch'", "an integer >= 1"]),
    "bytes a string": (_set(M0 + ("bytes",), "1000"), ["'bytes'", "an integer >= 0"]),
    "shape of three": (_set(M0 + ("shape",), [1, 2, 3]), ["'shape'", "two integers"]),
    "shape of strings": (_set(M0 + ("shape",), ["4096", 1]), ["'shape'", "two integers"]),
    "shape of booleans": (_set(M0 + ("shape",), [True, 1]), ["'shape'", "two integers"]),
    "mode unknown": (_set(M0 + ("mode",), "warm"), ["'mode'", "'cold' or 'hot'"]),
    "graph a string": (_set(M0 + ("graph",), "no"), ["'graph'", "true or false"]),
    "graph an integer": (_set(M0 + ("graph",), 0), ["'graph'", "true or false"]),
    "kernel empty": (_set(M0 + ("kernel",), ""), ["'kernel'", "non-empty string"]),
    "kernel a number": (_set(M0 + ("kernel",), 5), ["'kernel'", "an integer 5"]),
    "layer a list": (_set(M0 + ("layer",), ["fc6"]), ["'layer'", "a list of 1"]),
    "dtype null": (_set(M0 + ("dtype",), None), ["'dtype'", "null"]),
    "error a string": (_set(M0 + ("max_rel_error",), "0.1"), ["'max_rel_error'", "or null"]),
    "gbps negative": (_set(M0 + ("gbps",), -3), ["'gbps'", ">= 0"]),
    "note null": (_set(M0 + ("note",), None), ["'note'", "a string"]),
    "field missing": (_drop(M0 + ("p90_us",)), ["measurement #0", "missing field(s) 'p90_us'"]),
    "field unknown": (_set(M0 + ("median_ms",), 1.0), ["measurement #0", "unknown field(s) 'median_ms'"]),
    "measurement a list": (_set(M0, [1, 2]), ["measurement #0 must be an object", "a list of 2"]),
    "measurements an object": (_set(("measurements",), {}), ["'measurements'", "a list"]),
    "duplicate measurement": (lambda d: d | {"measurements": d["measurements"] + [d["measurements"][0]]},
                              ["measurement #3 repeats measurement #0", "'fc6'", "'balanced'"]),
    "device a string": (_set(("device",), "H200"), ["device must be an object", "a string 'H200'"]),
    "device without a name": (_drop(("device", "name")), ["device", "missing field 'name'"]),
    "device name a number": (_set(("device", "name"), 5), ["device", "'name'", "non-empty string"]),
    "capability a string": (_set(("device", "compute_capability"), "90"), ["device", "'compute_capability'",
                                                                            "an integer"]),
    "capability a boolean": (_set(("device", "compute_capability"), True), ["'compute_capability'", "a boolean"]),
    "device fact nested": (_set(("device", "extra"), {"a": 1}), ["device", "'extra'", "a string, number"]),
    "schema other": (_set(("schema",), "balprune.bench/9"), ["schema is a string 'balprune.bench/9'", SCHEMA]),
    "schema missing": (_drop(("schema",)), ["schema is null"]),
    "top-level unknown": (_set(("measurement",), []), ["unknown field(s) 'measurement'"]),
    "top-level missing": (_drop(("read_bandwidth_gbps",)), ["missing field(s) 'read_bandwidth_gbps'"]),
    "bandwidth a string": (_set(("read_bandwidth_gbps",), "4000"), ["'read_bandwidth_gbps'", "finite number"]),
    "file a number": (_set(("file",), 3), ["'file'", "a string"]),
    "unavailable an object": (_set(("unavailable",), {}), ["'unavailable'", "a list"]),
    "unavailable batch a string": (_set(("unavailable", 0, "batch"), "1"), ["unavailable #0", "'batch'"]),
    "unavailable without reason": (_drop(("unavailable", 0, "reason")), ["unavailable #0", "'reason'"]),
    "meta a list": (_set(("meta",), []), ["'meta'", "an object"]),
    "selection a string": (_set(("selection",), "x"), ["'selection'", "a list"]),
    "not an object": (lambda d: [d], ["must be a JSON object", "a list of 1"]),
}


def _sha(p) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def _write(path, data) -> None:
    raw = data.pop("__raw__", None) if isinstance(data, dict) else None
    text = json.dumps(data, indent=1)
    if raw:  # text JSON cannot be produced from a Python value (a number literal that overflows)
        old, new = raw
        assert text.count(old) >= 1
        text = text.replace(old, new, 1)
    path.write_text(text)


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("side", ["base", "new"])
def test_malformed_report_is_exit_4_naming_the_field(cli, tmp_path, case, side):
    mutate, words = CASES[case]
    good, bad = tmp_path / "good.json", tmp_path / "bad.json"
    _write(good, _good())
    _write(bad, mutate(copy.deepcopy(_good())))
    before = {p: _sha(p) for p in (good, bad)}
    r = cli("compare", *((bad, good) if side == "base" else (good, bad)))
    assert r.code == 4, r
    assert r.err.startswith(f"balprune: error: report {bad}") and r.err.count("\n") == 1, r.err
    for w in words:
        assert w in r.err, (w, r.err)
    assert r.out == "" and {p: _sha(p) for p in (good, bad)} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.json", "good.json"]


def test_the_good_report_of_these_cases_is_accepted(cli, tmp_path):
    """The cases above fail because of their one mutation, not because the starting report is bad."""
    good = tmp_path / "good.json"
    _write(good, _good())
    r = cli("compare", good, good)
    assert r.code == 0 and r.out.startswith("ok: 2 measurement(s) of 1 kernel(s) (balanced)"), r


@pytest.mark.parametrize("text,words", [
    ("", ["not valid JSON"]),
    ("not json", ["not valid JSON"]),
    ('{"schema": "balprune.bench/2", "schema": "balprune.bench/2"}', ["duplicate key 'schema'"]),
    ('{"schema": "balprune.bench/2", "file": "m", "device": {"name": "x"}, "measurements": [], '
     '"read_bandwidth_gbps": NaN}', ["read_bandwidth_gbps"]),
    ("[" * 5000 + "]" * 5000, ["nested 5000 levels deep"]),
    ('{"meta": ' + '{"a": ' * 3000 + "1" + "}" * 3000 + "}", ["nested 3001 levels deep"]),
])
def test_not_a_report_is_exit_4(cli, tmp_path, text, words):
    good, bad = tmp_path / "good.json", tmp_path / "bad.json"
    _write(good, _good())
    bad.write_text(text)
    r = cli("compare", good, bad)
    assert r.code == 4 and r.err.startswith("balprune: error: ") and r.err.count("\n") == 1, r
    assert all(w in r.err for w in words), r.err


def test_duplicate_keys_inside_a_measurement_are_refused(cli, tmp_path):
    good, bad = tmp_path / "good.json", tmp_path / "bad.json"
    _write(good, _good())
    text = json.dumps(_good(), indent=1).replace('"median_us": 10.0,', '"median_us": 10.0, "median_us": 99.0,', 1)
    bad.write_text(text)
    r = cli("compare", good, bad)
    assert r.code == 4 and "duplicate key 'median_us'" in r.err and r.err.count("\n") == 1, r


def test_non_utf8_and_missing_and_folder_reports_are_exit_4(cli, tmp_path):
    good = tmp_path / "good.json"
    _write(good, _good())
    latin = tmp_path / "latin.json"
    latin.write_bytes(json.dumps(_good()).replace("m.safetensors", "m\u00e9").encode("latin-1"))
    for bad, words in ((latin, "not UTF-8"), (tmp_path / "missing.json", "does not exist"), (tmp_path, "folder")):
        r = cli("compare", good, bad)
        assert r.code == 4 and words in r.err and r.err.count("\n") == 1, (bad, r)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs on this platform")
def test_a_fifo_report_is_refused_without_hanging(tmp_path):
    good, fifo = tmp_path / "good.json", tmp_path / "fifo.json"
    _write(good, _good())
    os.mkfifo(fifo)
    r = run_subprocess("compare", good, fifo, timeout=60)  # no writer: reading it would block forever
    assert r.returncode == 4, r.stderr
    assert r.stderr.startswith("balprune: error:") and "FIFO" in r.stderr and r.stderr.count("\n") == 1


def test_a_failed_measurement_with_null_times_is_read_and_flagged(cli, tmp_path):
    good, new = tmp_path / "good.json", tmp_path / "new.json"
    _write(good, _good())
    d = _good()
    d["measurements"][0].update(correct=False, median_us=None, p10_us=None, p90_us=None, gbps=None,
                                bandwidth_pct=None, max_rel_error=None, note="relative error 5e-1: not timed")
    _write(new, d)
    r = cli("compare", good, new, "--json")
    assert r.code == 1, r
    data = json.loads(r.out)
    assert [(c["layer"], c["status"], c["new_us"]) for c in data["changes"] if c["status"] != "ok"] == \
        [("fc6", "incorrect", None)]


def test_an_older_report_with_nan_literals_reads_where_a_failed_measurement_may_have_them(cli, tmp_path):
    """Earlier versions wrote json.dumps' NaN / Infinity for an untimed measurement: such a baseline still
    compares; a NaN where a number is required (a measurement that passed its gate) is still exit 4."""
    good, old, bad = tmp_path / "good.json", tmp_path / "old.json", tmp_path / "bad.json"
    _write(good, _good())
    d = _good()
    d["measurements"][0].update(correct=False, median_us=float("nan"), p10_us=float("nan"), p90_us=float("nan"),
                                gbps=float("nan"), bandwidth_pct=float("nan"), max_rel_error=float("inf"))
    old.write_text(json.dumps(d))  # allow_nan: the literals NaN and Infinity
    assert "NaN" in old.read_text() and "Infinity" in old.read_text()
    r = cli("compare", old, good, "--json")
    assert r.code == 0, r
    assert [c["status"] for c in json.loads(r.out)["changes"] if c["layer"] == "fc6" and c["kernel"] == "balanced"] \
        == ["new"]
    d["measurements"][0]["correct"] = True
    bad.write_text(json.dumps(d))
    r = cli("compare", good, bad)
    assert r.code == 4 and "median_us" in r.err and r.err.count("\n") == 1, r


def test_compare_json_is_strict_json_when_a_ratio_overflows(cli, tmp_path):
    """Timings of 5e-324 and 1e308 are each accepted, and their ratio overflows to inf: --json said
    `Infinity`, which strict parsers refuse. It says null."""
    base, new = _good(), _good()
    base["measurements"][0]["median_us"] = 5e-324
    new["measurements"][0]["median_us"] = 1e308
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    _write(a, base)
    _write(b, new)
    r = cli("compare", a, b, "--json")
    assert r.code == 1 and "Infinity" not in r.out, r
    out = json.loads(r.out, parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}"))
    assert [c["ratio"] for c in out["changes"] if c["layer"] == "fc6" and c["kernel"] == "balanced"] == [None]
