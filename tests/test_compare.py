"""`balprune compare`: the CI regression gate over two benchmark reports."""

from __future__ import annotations

import json

import pytest
from helpers import REPO, gpu_skip_reason

from balprune.bench.report import SCHEMA, BenchReport, Measurement


def _m(layer="fc6", kernel="balanced", median=10.0, correct=True, batch=1, mode="cold"):
    return Measurement(layer, (4096, 25088), "F16", batch, mode, False, kernel, median, median * 0.9, median * 1.1,
                       1000, 100.0, 2.5, 1e-4 if correct else 0.5, correct, "")


def _write(path, measurements, device=None):
    BenchReport("m.safetensors", device or {"name": "test"}, 4000.0, measurements).write(path)
    return path


H200 = {"name": "NVIDIA H200", "compute_capability": 90, "multiprocessors": 132}


def test_no_regression_exits_0_with_one_summary_line(cli, tmp_path):
    base = _write(tmp_path / "a.json", [_m(), _m(kernel="dense", median=50), _m(layer="fc7", median=20)])
    new = _write(tmp_path / "b.json", [_m(median=10.5), _m(kernel="dense", median=80),  # dense is not ours
                                       _m(layer="fc7", median=15), _m(layer="fc8")])
    r = cli("compare", base, new)
    assert r.code == 0, r.err
    assert r.out == "ok: 3 measurement(s) of 1 kernel(s) (balanced) compared, none slower than 10%; 1 faster; 1 new\n"
    assert r.err == ""


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


@pytest.mark.skipif(gpu_skip_reason() is None, reason="a GPU is present: the no-GPU path cannot be exercised here")
def test_bench_without_a_gpu_exits_6_with_one_line(cli):
    """bad-inputs item 24: no GPU / no CuPy -> one line with the cause, exit 6, nothing else imported."""

    r = cli("bench", REPO / "tests" / "golden" / "balanced.safetensors")
    assert r.code == 6, r
    assert r.err.startswith("balprune: error:") and r.err.count("\n") == 1
    assert "cupy" in r.err.lower() or "gpu" in r.err.lower()


# --------------------------------------------------------------------------- kernels: never check nothing

@pytest.mark.parametrize("named", [["cublas"], ["balanced", "balanc"], ["dense", "CSR"], ["csr"]])
def test_a_kernel_the_base_report_lacks_is_a_usage_error_naming_those_it_holds(cli, tmp_path, named):
    """The baseline decides what can be compared: a typo, or a kernel only the new report holds (csr here:
    all of its measurements would be "new", nothing compared), must not let a CI job pass."""
    base = _write(tmp_path / "a.json", [_m(), _m(kernel="dense", median=50)])
    new = _write(tmp_path / "b.json", [_m(), _m(kernel="csr", median=70)])
    r = cli("compare", base, new, *[x for k in named for x in ("--kernel", k)])
    assert r.code == 2, r
    assert r.err.startswith("balprune: error: --kernel ") and r.err.count("\n") == 1
    assert "the base report holds: balanced, dense" in r.err
    unknown = [k for k in named if k not in ("balanced", "dense")]
    assert all(repr(k) in r.err for k in unknown) and r.out == ""
    assert ("only in the new report" in r.err) == (named == ["csr"])


def test_a_kernel_one_report_holds_is_compared(cli, tmp_path):
    base = _write(tmp_path / "a.json", [_m(), _m(kernel="dense", median=50)])
    new = _write(tmp_path / "b.json", [_m()])
    r = cli("compare", base, new, "--kernel", "dense", "--json")
    assert r.code == 1, r  # dense went missing: the kernel named is checked
    data = json.loads(r.out)
    assert data["kernels"] == ["dense"] and [c["status"] for c in data["changes"]] == ["missing"]


def test_reports_without_balprunes_kernels_need_kernel_named(cli, tmp_path):
    base = _write(tmp_path / "a.json", [_m(kernel="dense", median=50)])
    new = _write(tmp_path / "b.json", [_m(kernel="dense", median=90)])
    r = cli("compare", base, new)
    assert r.code == 2 and "it holds: dense" in r.err and "--kernel" in r.err and r.err.count("\n") == 1, r
    assert cli("compare", base, new, "--kernel", "dense").code == 1  # named: it is compared (and slower)


def test_reports_without_measurements_are_refused(cli, tmp_path):
    base = _write(tmp_path / "a.json", [])
    new = _write(tmp_path / "b.json", [])
    r = cli("compare", base, new)
    assert r.code == 4 and "the base report holds no measurement" in r.err and r.err.count("\n") == 1, r


# --------------------------------------------------------------------------- devices

@pytest.mark.parametrize("other", [
    {"name": "NVIDIA A100-SXM4-80GB", "compute_capability": 80, "multiprocessors": 108},
    {"name": "NVIDIA H200", "compute_capability": 89, "multiprocessors": 132},  # same name, other capability
    {"name": "NVIDIA H200"},  # capability not recorded: not known to be the same device
])
def test_reports_of_different_devices_are_refused(cli, tmp_path, other):
    base = _write(tmp_path / "a.json", [_m()], device=H200)
    new = _write(tmp_path / "b.json", [_m()], device=other)
    r = cli("compare", base, new)
    assert r.code == 4, r
    assert r.err.startswith("balprune: error: the reports come from different devices") and r.err.count("\n") == 1
    assert "base NVIDIA H200 (compute capability 90)" in r.err and "--allow-device-change" in r.err
    assert r.out == ""


def test_other_device_facts_do_not_count_as_a_device_change(cli, tmp_path):
    base = _write(tmp_path / "a.json", [_m()], device=H200)
    new = _write(tmp_path / "b.json", [_m()], device={**H200, "driver": 13000, "torch": "2.9.0"})
    assert cli("compare", base, new).code == 0


def test_allowed_device_change_is_said_in_the_summary_table_and_json(cli, tmp_path):
    a100 = {"name": "NVIDIA A100", "compute_capability": 80}
    base = _write(tmp_path / "a.json", [_m()], device=H200)
    same = _write(tmp_path / "b.json", [_m()], device=a100)
    slower = _write(tmp_path / "c.json", [_m(median=20.0)], device=a100)
    said = "devices differ (--allow-device-change): base NVIDIA H200 (compute capability 90), " \
           "new NVIDIA A100 (compute capability 80)"
    r = cli("compare", base, same, "--allow-device-change")
    assert r.code == 0 and r.out.count("\n") == 1 and r.out.startswith("ok: 1 measurement(s)") and said in r.out, r
    r = cli("compare", base, slower, "--allow-device-change")
    # the caption wraps at the table's width
    assert r.code == 1 and "fc6" in r.out and "slower" in r.out and said in " ".join(r.out.split()), r
    data = json.loads(cli("compare", base, same, "--allow-device-change", "--json").out)
    assert data["device_change"] == said.split(": ", 1)[1]
    assert json.loads(cli("compare", base, base, "--json").out)["device_change"] is None


def test_regression_table_lists_every_compared_row_and_one_stderr_line(cli, tmp_path):
    base = _write(tmp_path / "a.json", [_m(), _m(layer="fc7")])
    new = _write(tmp_path / "b.json", [_m(median=30.0), _m(layer="fc7")])
    r = cli("compare", base, new)
    assert r.code == 1
    assert "fc6" in r.out and "fc7" in r.out and "slower" in r.out and "ok" in r.out
    assert r.err == "1 regression(s) beyond 10% (slower, missing or incorrect)\n"


def test_regression_table_shows_the_regressions_first_and_at_most_its_row_cap(cli, tmp_path, monkeypatch):
    """A regressed 10^5-row report pair took rich minutes to print: the table holds at most
    COMPARE_TABLE_ROWS rows, regressions first, and says how many more there are (--json has them all)."""
    from balprune.cli import render

    monkeypatch.setattr(render.compare_table, "__kwdefaults__", {"max_rows": 3})
    layers = [f"l{i}" for i in range(6)]
    base = _write(tmp_path / "a.json", [_m(layer=x) for x in layers])
    new = _write(tmp_path / "b.json", [_m(layer=x, median=30.0 if x == "l5" else 10.0) for x in layers])
    r = cli("compare", base, new)
    assert r.code == 1
    shown = sorted((r.out.index(f" {x} "), x) for x in layers if f" {x} " in r.out)
    assert [x for _, x in shown] == ["l5", "l0", "l1"], r.out
    assert "3 more measurement(s) not shown" in r.out
    assert len(json.loads(cli("compare", base, new, "--json").out)["changes"]) == 6


def test_untimed_baseline_is_not_a_baseline(cli, tmp_path):
    """A baseline measurement that failed its gate was not timed (null times): the new one is 'new'."""
    untimed = Measurement("fc6", (4096, 25088), "F16", 1, "cold", False, "balanced", float("nan"), float("nan"),
                          float("nan"), 1000, float("nan"), float("nan"), None, False, "not timed")
    base = _write(tmp_path / "a.json", [untimed])
    assert json.loads(base.read_text())["measurements"][0]["median_us"] is None  # JSON has no NaN
    new = _write(tmp_path / "b.json", [_m()])
    r = cli("compare", base, new, "--json")  # nothing timed in the base: nothing could be compared
    assert r.code == 4 and "nothing was compared" in r.err and r.err.count("\n") == 1 and r.out == "", r
    data = json.loads(cli("compare", new, base, "--json").out)
    assert [(c["status"], c["base_us"], c["new_us"]) for c in data["changes"]] == [("incorrect", 10.0, None)]
