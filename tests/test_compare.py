"""`balprune compare`: the CI regression gate over two benchmark reports."""

from __future__ import annotations

import json

import pytest

from balprune.bench.report import SCHEMA, BenchReport, Measurement


def _m(layer="fc6", kernel="balanced", median=10.0, correct=True, batch=1, mode="cold"):
    return Measurement(layer, (4096, 25088), "F16", batch, mode, False, kernel, median, median * 0.9, median * 1.1,
                       1000, 100.0, 2.5, 1e-4 if correct else 0.5, correct, "")


def _write(path, measurements):
    BenchReport("m.safetensors", {"name": "test"}, 4000.0, measurements).write(path)
    return path


def test_no_regression_exits_0_and_prints_table(cli, tmp_path):
    base = _write(tmp_path / "a.json", [_m(), _m(kernel="dense", median=50)])
    new = _write(tmp_path / "b.json", [_m(median=10.5), _m(kernel="dense", median=80)])  # dense is not ours
    r = cli("compare", base, new)
    assert r.code == 0, r.err
    assert "fc6" in r.out and "ok" in r.out


@pytest.mark.parametrize("new_ms,status", [
    ([_m(median=11.5)], "slower"),
    ([], "missing"),
    ([_m(median=9.0, correct=False)], "incorrect"),
])
def test_regressions_exit_1(cli, tmp_path, new_ms, status):
    base = _write(tmp_path / "a.json", [_m()])
    new = _write(tmp_path / "b.json", new_ms)
    r = cli("compare", base, new, "--json")
    assert r.code == 1
    data = json.loads(r.out)
    assert data["regressions"] == 1 and data["changes"][0]["status"] == status


def test_max_slowdown_bound_is_respected(cli, tmp_path):
    base = _write(tmp_path / "a.json", [_m()])
    new = _write(tmp_path / "b.json", [_m(median=11.5)])
    assert cli("compare", base, new, "--max-slowdown", "0.2").code == 0
    assert cli("compare", base, new, "--max-slowdown", "1.5").code == 2  # not a fraction in [0, 1)


def test_faster_and_new_are_not_regressions(cli, tmp_path):
    base = _write(tmp_path / "a.json", [_m()])
    new = _write(tmp_path / "b.json", [_m(median=5.0), _m(layer="fc7")])
    data = json.loads(cli("compare", base, new, "--json").out)
    assert {c["status"] for c in data["changes"]} == {"faster", "new"} and data["regressions"] == 0


@pytest.mark.parametrize("content", ["not json", json.dumps({"schema": "other"}),
                                     json.dumps({"schema": SCHEMA, "measurements": [{"layer": "x"}]})])
def test_bad_reports_exit_4(cli, tmp_path, content):
    bad = tmp_path / "bad.json"
    bad.write_text(content)
    good = _write(tmp_path / "a.json", [_m()])
    r = cli("compare", good, bad)
    assert r.code == 4 and r.err.startswith("balprune: error:") and r.err.count("\n") == 1


def test_bench_without_a_gpu_exits_6_with_one_line(cli):
    """bad-inputs item 24: no GPU / no CuPy -> one line with the cause, exit 6, nothing else imported."""
    try:
        import cupy

        if cupy.cuda.runtime.getDeviceCount() > 0:
            pytest.skip("a GPU is present: the no-GPU path cannot be exercised here")
    except Exception:
        pass
    from helpers import REPO

    r = cli("bench", REPO / "tests" / "golden" / "balanced.safetensors")
    assert r.code == 6, r
    assert r.err.startswith("balprune: error:") and r.err.count("\n") == 1
    assert "cupy" in r.err.lower() or "gpu" in r.err.lower()
