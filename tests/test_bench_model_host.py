"""`bench --model` on the host (CPU only): usage errors before any GPU use, no-GPU exit 6, the
end-to-end table and rows, `compare` on model reports, and the report's JSON with meta["model"]."""

from __future__ import annotations

import io
import json
import math

import pytest
from helpers import REPO, gpu_skip_reason
from rich.console import Console

from balprune.bench.model import PAPER, model_rows
from balprune.bench.report import BenchReport, Measurement, load_report
from balprune.cli import render

PACKED = REPO / "tests" / "golden" / "balanced.safetensors"


# --------------------------------------------------------------------------- CLI: usage and no GPU

@pytest.fixture
def no_model_bench(monkeypatch):
    """Make any call of the model benchmark (the first thing that touches the GPU) a test failure."""
    import balprune.bench.model as bm

    calls = []
    monkeypatch.setattr(bm, "bench_model", lambda *a, **k: calls.append((a, k)) or pytest.fail("bench_model ran"))
    return calls


@pytest.mark.parametrize("args,needle", [
    (["--model", "--batch", "8"], "--model runs the whole model at batch 1"),
    (["--model", "--layer", "a"], "--model runs the whole model at batch 1"),
    (["--model", "--no-peers"], "--model runs the whole model at batch 1"),
    (["--model", "--dtype", "float8"], "float8"),
    (["--model", "--dtype", ","], "--dtype"),
    (["--model", "--paths", "fastest"], "fastest"),
    (["--model", "--frames", "0"], "--frames"),
    (["--frames", "0"], "--frames"),
    (["--model", "--iters", "0"], "--iters"),
])
def test_model_usage_errors_exit_2_with_one_line_before_the_gpu(cli, tmp_path, no_model_bench, args, needle):
    r = cli("bench", PACKED, "--json", tmp_path / "r.json", *args)
    assert r.code == 2, r
    assert r.err.startswith("balprune: error:") and r.err.count("\n") == 1 and needle in r.err, r
    assert r.out == "" and no_model_bench == [] and list(tmp_path.iterdir()) == []


def test_model_json_folder_checked_before_the_run(cli, tmp_path, no_model_bench):
    r = cli("bench", PACKED, "--model", "--json", tmp_path / "missing" / "r.json")
    assert r.code == 5 and "does not exist" in r.err and r.err.count("\n") == 1, r
    assert no_model_bench == []


@pytest.mark.skipif(gpu_skip_reason() is None, reason="a GPU is present: the no-GPU path cannot be exercised here")
def test_model_bench_without_a_gpu_exits_6_with_one_line(cli, tmp_path, capsys):
    from helpers import small_lm_packed

    packed = small_lm_packed(tmp_path)  # a built-in model: the file is checked (exit 4) before the GPU
    capsys.readouterr()
    out = tmp_path / "out"
    out.mkdir()
    r = cli("bench", packed, "--model", "--json", out / "r.json")
    assert r.code == 6, r
    assert r.err.startswith("balprune: error:") and r.err.count("\n") == 1
    assert "cupy" in r.err.lower() or "gpu" in r.err.lower() or "cuda" in r.err.lower()
    assert r.out == "" and list(out.iterdir()) == []


def test_model_bench_without_a_gpu_exits_6_in_a_fresh_process(tmp_path):
    if gpu_skip_reason() is None:
        pytest.skip("a GPU is present: the no-GPU path cannot be exercised here")
    from helpers import run_subprocess, small_lm_packed

    r = run_subprocess("bench", small_lm_packed(tmp_path), "--model", "--dtype", "float16")
    assert r.returncode == 6 and r.stderr.startswith("balprune: error:") and r.stderr.count("\n") == 1, r.stderr
    assert "Traceback" not in r.stderr


# --------------------------------------------------------------------------- synthetic model reports

_CODE = {"float32": "F32", "float16": "F16"}
# (dtype, mode, graph) -> (balprune us, torch us); speedup = torch / balprune
TIMES = {
    ("F32", "hot", False): (100.0, 250.0),   # 2.50
    ("F32", "hot", True): (80.0, 240.0),     # 3.00
    ("F32", "cold", False): (125.0, 275.0),  # 2.20
    ("F32", "cold", True): (110.0, 264.0),   # 2.40
    ("F16", "hot", False): (50.0, 200.0),    # 4.00
    ("F16", "hot", True): (40.0, 140.0),     # 3.50
    ("F16", "cold", False): (64.0, 208.0),   # 3.25
    ("F16", "cold", True): (60.0, 171.0),    # 2.85
}


def _mm(dtype, mode, graph, kernel, us, *, correct=True, err=None):
    return Measurement("model", (1, 1), dtype, 1, mode, graph, kernel, us, us * 0.9, us * 1.2, 1_000_000,
                       1e6 / us / 1e3, 20.0, (1e-6 if dtype == "F32" else 3e-3) if err is None else err, correct,
                       "token step")


def _choice(layer, shape, pattern, path, times, reason=""):
    """A dispatch decision shaped like runtime.model.stages.Choice.to_dict()."""
    return {"layer": layer, "shape": list(shape), "batch": 1, "pattern": pattern, "path": path,
            "reason": reason, "times_us": dict(times), "bytes": {k: 1000 for k in times},
            "errors": {k: 1e-7 for k in times}, "unavailable": {}, "variants": {k: "" for k in times}}


def _dispatch():
    return [_choice("lstm.l0", (6000, 3000), "balanced", "balanced", {"balanced": 4.0, "dense": 10.0},
                    "balanced 2.50x faster than dense"),
            _choice("decoder.weight", (10000, 1500), "balanced", "dense", {"balanced": 6.0, "dense": 5.0},
                    "dense 1.20x faster than balanced")]


def _model_report(times=TIMES, *, order=None) -> BenchReport:
    ms = []
    keys = order or list(times)
    for key in keys:
        b, t = times[key]
        ms += [_mm(*key, "balprune", b), _mm(*key, "torch", t)]
    for dtype in ("F32", "F16"):  # per-layer rows from the dispatcher, as bench_model writes them
        for c in _dispatch():
            for k, us in c["times_us"].items():
                ms.append(Measurement(c["layer"], tuple(c["shape"]), dtype, 1, "hot", True, k, us, us, us, 1000,
                                      1000 / us / 1e3, 5.0, 1e-7, True, ""))
    meta = {"model": {
        "architecture": "lstm-lm", "kind": "lstm-lm", "frames": None, "paper": PAPER["lstm-lm"],
        "tolerance": {"float32": 1e-4, "float16": 2e-2},
        "dtypes": {d: {"unit": "token step", "dispatch": _dispatch(),
                       "max_rel_error": {"balprune": 1e-6, "torch": 1e-7},
                       "weight_bytes": {"balprune": 1_000_000, "torch": 4_000_000},
                       "paths": {c["layer"]: c["path"] for c in _dispatch()}} for d in ("float32", "float16")}}}
    return BenchReport("lm.balanced.safetensors", {"name": "Test GPU"}, 4000.0, ms,
                       unavailable=[{"layer": "model", "batch": 1, "kernel": "torch (graph)",
                                     "reason": "float16: cannot capture"}], meta=meta)


def _render(report) -> str:
    console = Console(record=True, width=200, file=io.StringIO())
    for t in render.model_tables(report):
        console.print(t)
    return console.export_text()


def test_model_rows_order_and_speedup():
    keys = list(TIMES)
    scrambled = [keys[i] for i in (7, 2, 5, 0, 4, 3, 6, 1)]
    rows = model_rows(_model_report(order=scrambled))
    assert [(r["dtype"], r["graph"], r["mode"]) for r in rows] == [
        ("F32", False, "hot"), ("F32", False, "cold"), ("F32", True, "hot"), ("F32", True, "cold"),
        ("F16", False, "hot"), ("F16", False, "cold"), ("F16", True, "hot"), ("F16", True, "cold")]
    for r in rows:
        b, t = TIMES[(r["dtype"], r["mode"], r["graph"])]
        assert r["balprune"].median_us == b and r["torch"].median_us == t
        assert r["speedup"] == pytest.approx(t / b)  # torch's time over balprune's
    assert all(r["dtype"] in ("F32", "F16") for r in rows)  # per-layer rows are not model rows


def test_model_rows_without_a_correct_pair_have_no_speedup():
    ms = [_mm("BF16", "hot", False, "balprune", 10.0), _mm("BF16", "hot", False, "torch", 30.0),
          _mm("F16", "hot", False, "balprune", math.nan, correct=False, err=0.5),
          _mm("F16", "hot", False, "torch", 30.0), _mm("F32", "hot", False, "balprune", 10.0)]
    rows = model_rows(BenchReport("x", {}, 1.0, ms))
    assert [r["dtype"] for r in rows] == ["F32", "F16", "BF16"]
    f32, f16, bf16 = rows
    assert f32["speedup"] is None and "torch" not in f32  # torch missing
    assert f16["speedup"] is None  # balprune failed its tolerance
    assert bf16["speedup"] == pytest.approx(3.0)


def test_model_tables_render_dispatch_end_to_end_and_speedups():
    text = _render(_model_report())
    assert "lstm-lm float32 on Test GPU: per stage" in text and "lstm-lm float16 on Test GPU: per stage" in text
    assert "lstm-lm end to end, batch 1, median us per token step" in text
    lines = text.splitlines()
    # per-layer table: dense/sparse/x dense per layer and totals (dense 15, sparse 10, chosen paths 4 + 5 = 9)
    l0 = next(ln for ln in lines if ln.lstrip().startswith("lstm.l0"))
    assert "6000x3000" in l0 and "10.0" in l0 and "4.0" in l0 and "2.50" in l0 and "balanced 2.50x faster" in l0
    dec = next(ln for ln in lines if ln.lstrip().startswith("decoder.weight"))
    assert "0.83" in dec and " dense " in dec
    total = next(ln for ln in lines if ln.lstrip().startswith("total"))
    assert "15.0" in total and "10.0" in total and "1.50" in total and "9.0" in total
    assert "layers on their chosen paths: 1.67x dense" in total
    # end-to-end table: one row per (dtype, graph, mode) with x torch = torch / balprune
    e2e = [ln.split() for ln in lines if ln.lstrip().startswith(("F32", "F16"))]
    assert len(e2e) == 8
    for cells in e2e:
        dtype, graph, mode = cells[0], cells[1] == "yes", cells[2]
        b, t = TIMES[(dtype, mode, graph)]
        assert cells[3] == f"{b:.1f}" and cells[5] == f"{t:.1f}", cells
        assert cells[7] == f"{t / b:.2f}", cells
    assert "paper (PTB LSTM LM 2x1500, 80%, its GPU): dense 294.1 us, balanced 120.2 us = 2.45x" in text
    assert "n/a torch (graph): float16: cannot capture" in text


def test_model_table_marks_a_failed_runner_and_leaves_its_speedup_empty():
    rep = _model_report()
    rep.measurements = [m for m in rep.measurements if not (m.layer == "model" and m.dtype == "F16")]
    rep.measurements += [_mm("F16", "hot", False, "balprune", math.nan, correct=False, err=0.5),
                         _mm("F16", "hot", False, "torch", 200.0)]
    (row,) = [ln.split() for ln in _render(rep).splitlines() if ln.lstrip().startswith("F16")]
    assert row[:4] == ["F16", "no", "hot", "failed"] and row[4] == "200.0"  # no spread, no speedup for a failure
    assert row[-1] == "5.0e-01" and len(row) == 7  # dtype graph mode failed torch its-p10-p90 error


def test_ctc_note_gives_frames():
    rep = _model_report()
    rep.meta["model"].update(architecture="ctc-bilstm", kind="ctc-bilstm", frames=50, paper=PAPER["ctc-bilstm"])
    text = _render(rep)
    assert "one utterance = 50 frames; per frame: divide by 50" in text


def test_vision_notes_say_the_batch_norm_fold_and_the_torch_layout():
    rep = _model_report()
    rep.meta["model"].update(architecture="resnet50", kind="resnet", paper=None)
    rep.meta["model"]["dtypes"]["float16"]["torch_layout"] = {
        "layout": "channels-last", "eager_hot_us": {"NCHW": 1210.5, "channels-last": 990.25}}
    rep.meta["model"]["dtypes"]["float16"]["activations"] = "channels-last"
    text = _render(rep)
    assert "batch norm: folded into the convs by prune" in text
    assert "float16 torch dense: cuDNN benchmark mode, channels-last (eager, hot: NCHW 1210.5 us" in text
    assert "float16 balprune: activations channels-last between the conv layers" in text
    assert "float32 torch dense" not in text and "float32 balprune" not in text  # no record, no note


# --------------------------------------------------------------------------- compare and JSON

def _slower(kernel, dtype="F16", factor=2.0):
    times = dict(TIMES)
    for key, (b, t) in TIMES.items():
        if key[0] == dtype:
            times[key] = (b * factor, t) if kernel == "balprune" else (b, t * factor)
    return _model_report(times)


def test_compare_flags_a_slower_balprune_model_row(cli, tmp_path):
    base, new = tmp_path / "base.json", tmp_path / "new.json"
    _model_report().write(base)
    _slower("balprune").write(new)
    r = cli("compare", base, new, "--json")
    assert r.code == 1, r
    data = json.loads(r.out)
    slower = [c for c in data["changes"] if c["status"] == "slower"]
    assert data["regressions"] == 4 and len(slower) == 4
    assert {(c["layer"], c["dtype"], c["kernel"]) for c in slower} == {("model", "F16", "balprune")}
    assert {(c["mode"], c["graph"]) for c in slower} == {("hot", False), ("hot", True), ("cold", False), ("cold", True)}
    assert all(c["ratio"] == pytest.approx(2.0) for c in slower)
    # F32 model rows are matched separately (dtype is part of the key) and did not change
    assert {c["status"] for c in data["changes"] if c["layer"] == "model" and c["dtype"] == "F32"} == {"ok"}
    assert "torch" not in {c["kernel"] for c in data["changes"]}  # dense torch is a peer, not ours
    r = cli("compare", base, new)
    assert r.code == 1 and "model" in r.out and "F16" in r.out and "balprune" in r.out
    assert "4 regression(s)" in r.err


def test_compare_ignores_a_slower_torch_model_row(cli, tmp_path):
    base, new = tmp_path / "base.json", tmp_path / "new.json"
    _model_report().write(base)
    _slower("torch").write(new)
    r = cli("compare", base, new, "--json")
    assert r.code == 0, r
    data = json.loads(r.out)
    assert data["regressions"] == 0 and {c["status"] for c in data["changes"]} == {"ok"}
    assert {c["kernel"] for c in data["changes"]} == {"balprune", "balanced"}
    # asking for torch explicitly does flag it
    assert cli("compare", base, new, "--kernel", "torch").code == 1


def test_compare_flags_a_missing_model_row(cli, tmp_path):
    base, new = tmp_path / "base.json", tmp_path / "new.json"
    _model_report().write(base)
    rep = _model_report()
    rep.measurements = [m for m in rep.measurements if not (m.layer == "model" and m.dtype == "F32")]
    rep.write(new)
    data = json.loads(cli("compare", base, new, "--json").out)
    missing = [c for c in data["changes"] if c["status"] == "missing"]
    assert len(missing) == 4 and {(c["layer"], c["dtype"], c["kernel"]) for c in missing} == {("model", "F32", "balprune")}


def test_model_report_json_round_trip_keeps_meta_model(tmp_path):
    rep = _model_report()
    path = tmp_path / "lm.json"
    rep.write(path)
    data = json.loads(path.read_text())
    assert data["schema"] == "balprune.bench/2"
    assert data["meta"]["model"]["dtypes"]["float16"]["dispatch"][0]["layer"] == "lstm.l0"
    back = load_report(path)
    assert back.meta == rep.meta and back.meta["model"]["paper"] == PAPER["lstm-lm"]
    assert back.measurements == rep.measurements and back.unavailable == rep.unavailable
    assert _render(back) == _render(rep)
    assert [p.name for p in tmp_path.iterdir()] == ["lm.json"]  # atomic: no temp left behind


def test_report_with_an_untimed_failed_runner_reads_back(tmp_path):
    rep = _model_report()
    rep.measurements.append(_mm("F16", "hot", False, "balprune", math.nan, correct=False, err=0.5))
    rep.measurements = [m for m in rep.measurements
                        if not (m.layer == "model" and m.dtype == "F16" and m.kernel == "balprune")
                        or not m.correct]
    rep.write(tmp_path / "r.json")
    back = load_report(tmp_path / "r.json")
    assert [m.correct for m in back.measurements if m.kernel == "balprune"].count(False) == 1


def test_compare_flags_a_runner_that_failed_its_gate_after_a_round_trip(tmp_path):
    from balprune.bench.compare import compare_reports, regressions

    base = _model_report()
    new = _model_report()
    new.measurements = [m for m in new.measurements
                        if not (m.layer == "model" and m.dtype == "F16" and m.kernel == "balprune")]
    new.measurements.append(_mm("F16", "hot", False, "balprune", math.nan, correct=False, err=0.5))
    base.write(tmp_path / "a.json")
    new.write(tmp_path / "b.json")
    bad = regressions(compare_reports(load_report(tmp_path / "a.json"), load_report(tmp_path / "b.json")))
    assert {(c.dtype, c.mode, c.graph, c.status) for c in bad if c.status == "incorrect"} == {("F16", "hot", False, "incorrect")}


# --------------------------------------------------------------------------- Llama-family files


@pytest.fixture(scope="module")
def llama_packed(tmp_path_factory):
    from balprune.cli import main
    from balprune.llm.examples import write_example

    root = tmp_path_factory.mktemp("llama")
    out = root / "p.safetensors"
    assert main(["prune", str(write_example("llama-tiny", root / "src")), "--sparsity", "0.5", "--blocks", "4",
                 "-o", str(out)]) == 0
    return out


def test_llama_file_is_recognised_not_refused_as_unknown(llama_packed):
    """A packed file recording an HF causal-LM config takes the decode path (bench.llm), whose preflight
    verifies the file and checks the layout; other packed files (None) take the built-in architectures'."""
    from helpers import small_lm_packed

    from balprune.bench.llm import llm_preflight

    cfg, _ = llm_preflight(llama_packed)
    assert cfg.model_type == "llama"
    assert llm_preflight(small_lm_packed(llama_packed.parent)) is None


def test_llama_bench_without_a_gpu_exits_6_after_the_file_is_checked(llama_packed, tmp_path):
    if gpu_skip_reason() is None:
        pytest.skip("a GPU is present: the no-GPU path cannot be exercised here")
    from helpers import run_subprocess

    r = run_subprocess("bench", llama_packed, "--model", "--dtype", "float16")
    assert r.returncode == 6 and r.stderr.startswith("balprune: error:") and r.stderr.count("\n") == 1, r.stderr
    bad = tmp_path / "bad.safetensors"
    data = bytearray(llama_packed.read_bytes())
    data[-8:] = b"\xff" * 8  # a value or index byte of the last tensor: the verification refuses it first
    bad.write_bytes(bytes(data))
    r = run_subprocess("bench", bad, "--model", "--dtype", "float16")
    assert r.returncode == 4 and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr, r.stderr


def test_llama_report_renders_each_unit():
    from balprune.bench.model import model_rows

    ms = []
    for layer, b, t in (("model", 400.0, 900.0), ("model@ctx1024", 420.0, 930.0), ("prefill@128", 3000.0, 2800.0)):
        for kernel, us in (("balprune", b), ("torch", t)):
            ms.append(Measurement(layer, (1, 1), "F16", 1, "hot", layer != "prefill@128", kernel, us, us, us, 1, 1.0,
                                  1.0, 1e-3, True, ""))
    report = BenchReport("x", {"name": "GPU"}, 1.0, ms)
    report.meta["model"] = {"architecture": "llama", "kind": "llama", "contexts": [128, 1024], "read_gbps": 4000.0,
                            "dtypes": {"float16": {"unit": "token", "dispatch": [],
                                                   "floor_us": {"torch": 600.0, "balprune": 330.0}}}}
    rows = model_rows(report)
    assert [r["unit"] for r in rows] == ["model", "model@ctx1024", "prefill@128"]
    assert rows[0]["speedup"] == pytest.approx(2.25)
    text = _render(report)
    assert "model@ctx1024" in text and "prefill@128" in text and "packed 330.0 us" in text


def test_llama_report_shows_the_transformers_peer_and_its_ratio():
    """The transformers peer (bench.hf_peer) gets its own column and ratio; a step it could not capture is
    a separate eager row and a note, and its failing gate never makes the report's own failures."""
    from balprune.bench.report import own_failures

    ms = [Measurement("model", (1, 1), "F16", 1, "hot", True, k, us, us, us, 1, 1.0, 1.0, 1e-3, True, "")
          for k, us in (("balprune", 400.0), ("torch", 900.0), ("transformers", 2400.0))]
    ms.append(Measurement("model@ctx1024", (1, 1), "F16", 1, "hot", True, "transformers", 9.0, 9.0, 9.0, 1, 1.0, 1.0,
                          0.5, False, ""))
    # a peer whose step could not be captured ran eager: it still shares the graph row of its unit
    ms += [Measurement("model@ctx2048", (1, 1), "F16", 1, "hot", g, k, us, us, us, 1, 1.0, 1.0, 1e-3, True, "")
           for k, g, us in (("balprune", True, 500.0), ("transformers", False, 5000.0))]
    report = BenchReport("x", {"name": "GPU"}, 1.0, ms)
    report.unavailable.append({"layer": "model", "batch": 1, "kernel": "transformers (graph)",
                               "reason": "float16: RuntimeError: capture failed"})
    report.meta["model"] = {"architecture": "llama", "kind": "llama", "contexts": [128, 1024], "read_gbps": 4000.0,
                            "dtypes": {"float16": {"unit": "token", "dispatch": [], "floor_us": {}}}}
    from balprune.bench.model import model_rows

    rows = {r["unit"]: r for r in model_rows(report)}
    assert set(rows["model@ctx2048"]) >= {"balprune", "transformers"} and rows["model@ctx2048"]["graph"]
    text = _render(report)
    assert "transformers" in text and "x tf" in text and "6.00" in text  # 2400 / 400
    assert "5000.0 eager" in text and "10.00" in text
    assert "n/a transformers (graph)" in text
    assert own_failures(report) == []


def test_the_vision_torch_peer_is_the_faster_layout_and_computes_the_same():
    """bench.model._faster_layout: both layouts timed, the faster kept and named; the channels-last copy
    computes what the NCHW module does (the bench then checks the kept runner's own output)."""
    from types import SimpleNamespace

    import torch

    from balprune.bench.model import _faster_layout

    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(8, 4, 1)).eval()
    inputs = {"image": torch.randn(3, 12, 12)}
    for fast in ("NCHW", "channels-last"):
        calls = []

        def time_calls(f, iters, warmup, fast=fast, calls=calls):
            out = f()
            calls.append(out)
            layout = "channels-last" if out.is_contiguous(memory_format=torch.channels_last) and not out.is_contiguous() \
                else "NCHW"
            return SimpleNamespace(median_us=1.0 if layout == fast else 2.0)
        runner, meta = _faster_layout(module, SimpleNamespace(kind="resnet"), inputs, torch.device("cpu"),
                                      SimpleNamespace(time_calls=time_calls))
        assert meta["layout"] == fast and set(meta["eager_hot_us"]) == {"NCHW", "channels-last"}
        assert torch.allclose(runner(), calls[0], atol=1e-5) and torch.allclose(calls[0], calls[1], atol=1e-5)
