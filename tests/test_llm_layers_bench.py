"""benchmarks/llm_layers.py on the CPU: its aggregation on a hand-built report of schema balprune.bench/2
(checked by bench.report.load_report, its ``selection`` derived by bench.report itself), its targets,
the summary from files already in --out, and the commands --dry-run prints."""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import shlex
import subprocess
import sys

import pytest
from helpers import REPO

from balprune.bench.report import load_report, selection

SCRIPT = REPO / "benchmarks" / "llm_layers.py"


def _load():
    spec = importlib.util.spec_from_file_location("llm_layers", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["llm_layers"] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


ll = _load()
NAMES = [ll.tensor_name(s) for s in ll.LINEARS]  # q k v o gate up down
BW = 4000.0  # GB/s


def _m(layer, batch, graph, kernel, us, nbytes, *, mode="cold", correct=True):
    """One measurement with every field of the schema (bench.report.Measurement)."""
    timed = correct and us is not None
    gbps = nbytes / (us * 1e-6) / 1e9 if timed else None
    return {"layer": layer, "shape": [4096, 4096], "dtype": "F16", "batch": batch, "mode": mode, "graph": graph,
            "kernel": kernel, "median_us": us if timed else None, "p10_us": us * 0.98 if timed else None,
            "p90_us": us * 1.02 if timed else None, "bytes": nbytes, "gbps": gbps,
            "bandwidth_pct": 100 * gbps / BW if timed else None,
            "max_rel_error": None if kernel == "stream" else (1e-4 if correct else 0.5), "correct": correct,
            "note": "" if correct else "failed the correctness gate (relative error 5.00e-01 > bound 1.00e-03); not timed"}


def synthetic_report(tmp_path, *, fail_q_balanced=False, with_selection=True) -> dict:
    """Seven layers, batch 1 and 4, cold, eager and graph; layer i (0..6):
    batch 1 graph: dense 10(i+1), balanced 5(i+1), stream 4(i+1) us; balanced moves 2e6 (i+1) bytes;
    batch 4 graph: dense 10(i+1)+1, balanced 6(i+1), except down (i=6): balanced 100 > dense 71 (path dense);
    eager: every time + 1 us."""
    ms = []
    for i, name in enumerate(NAMES):
        n = i + 1
        bal_bytes, dense_bytes = 2_000_000 * n, 5_000_000 * n
        for graph in (False, True):
            e = 0.0 if graph else 1.0
            for batch, dense, bal, stream in ((1, 10 * n, 5 * n, 4 * n),
                                              (4, 10 * n + 1, 100 if name.endswith("down_proj.weight") else 6 * n,
                                               5 * n)):
                if fail_q_balanced and i == 0:
                    if not graph:  # a failed gate is one untimed row: the first mode, eager (bench.run)
                        ms.append(_m(name, batch, False, "balanced", None, bal_bytes, correct=False))
                else:
                    ms.append(_m(name, batch, graph, "balanced", bal + e, bal_bytes))
                ms.append(_m(name, batch, graph, "dense", dense + e, dense_bytes))
                ms.append(_m(name, batch, graph, "stream", stream + e, bal_bytes))
    data = {"schema": "balprune.bench/2", "file": "x.safetensors",
            "device": {"name": "NVIDIA H200", "compute_capability": 90, "l2_bytes": 62914560},
            "read_bandwidth_gbps": BW, "measurements": ms, "unavailable": [], "meta": {}}
    path = tmp_path / "report.json"
    path.write_text(json.dumps(data))
    rep = load_report(path)  # the real reader accepts it: every field in the real schema
    assert len(rep.measurements) == len(ms)
    if with_selection:
        data["selection"] = selection(rep)  # the runtime's path per row, as bench writes it
    path.write_text(json.dumps(data))
    load_report(path)
    return json.loads(path.read_text())


@pytest.mark.parametrize("with_selection", [True, False])
def test_sums_and_ratios(tmp_path, with_selection):
    rep = synthetic_report(tmp_path, with_selection=with_selection)
    s1 = ll.layer_sums(rep, NAMES, 1, "cold", True)
    assert s1["dense_us"] == pytest.approx(280) and s1["path_us"] == pytest.approx(140)
    assert s1["ratio"] == pytest.approx(2.0) and s1["kernel_ratio"] == pytest.approx(2.0)
    assert s1["on_dense"] == [] and s1["missing"] == []
    s4 = ll.layer_sums(rep, NAMES, 4, "cold", True)
    assert s4["dense_us"] == pytest.approx(287)
    assert s4["path_us"] == pytest.approx(6 * 21 + 71)  # down goes to dense
    assert s4["kernel_us"] == pytest.approx(6 * 21 + 100)
    assert s4["ratio"] == pytest.approx(287 / 197) and s4["kernel_ratio"] == pytest.approx(287 / 226)
    assert s4["on_dense"] == ["model.layers.0.mlp.down_proj.weight"]
    e1 = ll.layer_sums(rep, NAMES, 1, "cold", False)
    assert e1["ratio"] == pytest.approx(287 / 147)


def test_path_matches_bench_selection(tmp_path):
    """Computed without ``selection`` (schema /1 reports), the path is what bench.report selects."""
    rep = synthetic_report(tmp_path, fail_q_balanced=True)
    bare = {k: v for k, v in rep.items() if k != "selection"}
    ms = ll.index_measurements(rep)
    for s in rep["selection"]:
        got = ll.runtime_path(bare, ms, s["layer"], s["batch"], s["mode"], s["graph"])
        assert got == (s["path"], pytest.approx(s["path_us"]))


def test_failed_kernel_goes_to_dense(tmp_path):
    rep = synthetic_report(tmp_path, fail_q_balanced=True)
    s1 = ll.layer_sums(rep, NAMES, 1, "cold", True)
    assert s1["path_us"] == pytest.approx(10 + 5 * 27)  # q on dense (10 us), the rest on the kernel
    assert s1["ratio"] == pytest.approx(280 / 145)
    assert s1["kernel_us"] is None and s1["kernel_ratio"] is None
    assert s1["on_dense"] == [NAMES[0]] and any("q_proj" in m for m in s1["missing"])


def test_stream_fractions(tmp_path):
    rep = synthetic_report(tmp_path)
    fr = ll.stream_fractions(rep, NAMES, "cold", True, batch=1)
    assert [x["pct"] for x in fr] == [pytest.approx(80.0)] * 7
    # 2e6 (i+1) bytes: >= 8 MB from o_proj (i = 3) on, all below 90%
    assert [x["flag"] for x in fr] == [False, False, False, True, True, True, True]
    eager = ll.stream_fractions(rep, NAMES, "cold", False, batch=1)
    assert eager[0]["pct"] == pytest.approx(100 * 5 / 6)


def _result(model, dtype, config, r1, r4=None, r16=None, file_pct=None):
    sums = {str(b): {"ratio": r} for b, r in ((1, r1), (4, r4), (16, r16)) if r is not None or b == 1}
    return {"model": model, "dtype": dtype, "config": config, "bench": {"sums": {"cold/graph": sums}},
            "file_pct": file_pct}


def test_targets():
    res = [_result("8b", "float16", "50%", 1.6, 1.5, 1.1, 56.3),
           _result("8b", "float16", "80%", 2.5, 2.0, 0.99, 27.5),
           _result("8b", "bfloat16", "4:8", 1.2, 1.2, 1.0),
           _result("1b", "float16", "70%", 1.01),
           _result("1b", "bfloat16", "2:4", None)]
    t = {x["target"]: x["verdict"] for x in ll.evaluate_targets(res)}
    assert t["Llama-3-8B float16 50%: batch 1 >= 1.5x dense"] == "PASS"
    assert t["Llama-3-8B float16 50%: batch 4 ratio >= 90% of batch 1's (1.60x)"] == "PASS"
    assert t["Llama-3-8B float16 50%: batch 16 not slower than dense (>= 1.00x)"] == "PASS"
    assert t["Llama-3-8B float16 80%: batch 1 >= 2.7x dense"] == "MISS"
    assert t["Llama-3-8B float16 80%: batch 4 ratio >= 90% of batch 1's (2.50x)"] == "MISS"  # 2.0 < 2.25
    assert t["Llama-3-8B float16 80%: batch 16 not slower than dense (>= 1.00x)"] == "MISS"
    assert t["Llama-3-8B float16 80%: file <= 27% of dense"] == "MISS"
    assert "Llama-3-8B bfloat16 4:8: batch 1 >= 1.5x dense" not in t  # no batch-1 target for 4:8
    assert t["Llama-3-8B bfloat16 4:8: batch 4 ratio >= 90% of batch 1's (1.20x)"] == "PASS"
    assert t["Llama-3.2-1B float16 70%: batch 1 faster than dense (> 1.00x)"] == "PASS"
    assert t["Llama-3.2-1B bfloat16 2:4: batch 1 faster than dense (> 1.00x)"] == "MISS"  # not measured
    assert len(t) == 12


def test_summarize_only_from_out(tmp_path):
    """The whole summary from files a run left in --out (a bench report, prune JSON, file sizes)."""
    out = tmp_path / "out"
    out.mkdir()
    rep = synthetic_report(tmp_path)
    for m in rep["measurements"]:
        if m["kernel"] == "balanced":
            m["note"] = "bitmask indices"  # bench's note on the balanced kernel (peers.py)
    stem = "8b-float16-b32-s50"
    (out / f"bench-{stem}.json").write_text(json.dumps(rep))
    (out / f"prune-{stem}.json").write_text(json.dumps({"sparsity_achieved": 0.5}))
    (out / f"files-{stem}.json").write_text(json.dumps({"prune_rc": 0, "bench_rc": 0, "dense_file_bytes": 1000,
                                                        "packed_file_bytes": 560}))
    assert ll.main(["--summarize-only", "--models", "8b", "--dtypes", "float16", "--configs", "50",
                    "--batch", "1,4", "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    (r,) = summary["results"]
    assert r["file_pct"] == pytest.approx(56.0) and r["sparsity_achieved"] == 0.5
    assert r["bench"]["sums"]["cold/graph"]["1"]["ratio"] == pytest.approx(2.0)
    assert r["bench"]["sums"]["cold/graph"]["4"]["ratio"] == pytest.approx(287 / 197)
    verdicts = {t["target"]: t["verdict"] for t in summary["targets"]}
    assert verdicts["Llama-3-8B float16 50%: batch 1 >= 1.5x dense"] == "PASS"
    assert verdicts["Llama-3-8B float16 50%: batch 4 ratio >= 90% of batch 1's (2.00x)"] == "MISS"  # 1.46
    assert verdicts["Llama-3-8B float16 50%: file <= 57% of dense"] == "PASS"
    assert r["bench"]["index"] == ["bitmask"]
    table = (out / "table.txt").read_text()
    assert "    2.00" in table and "1.46" in table and "80!" in table and "56.0" in table
    assert not any(isinstance(v, float) and not math.isfinite(v) for v in r["bench"]["sums"]["cold/graph"]["1"].values())


def test_dry_run_prints_commands(tmp_path):
    cmd = [sys.executable, str(SCRIPT), "--dry-run", "--models", "1b", "--dtypes", "float16,bfloat16",
           "--configs", "50,2:4", "--batch", "1,4,16", "--index", "bitmask", "--workdir", str(tmp_path / "w"),
           "--out", str(tmp_path / "o")]
    res = subprocess.run(cmd, capture_output=True, text=True, check=True)
    lines = res.stdout.splitlines()
    commands = [shlex.split(line) for line in lines if not line.startswith("#")]
    assert len(commands) == 2 * 2 * 2  # (prune, bench) x 2 dtypes x 2 configs
    w, o = tmp_path / "w", tmp_path / "o"
    assert commands[0] == [sys.executable, "-m", "balprune", "prune", f"{w}/1b.layer0.float16.safetensors",
                           "--blocks", "32", "--sparsity", "0.5", "--index", "bitmask",
                           "-o", f"{w}/1b.layer0.float16.b32-s50.safetensors", "--force", "--json",
                           ">", f"{o}/prune-1b-float16-b32-s50.json"]
    assert commands[1] == [sys.executable, "-m", "balprune", "bench", f"{w}/1b.layer0.float16.b32-s50.safetensors",
                           "--batch", "1,4,16", "--graph", "--cold", "--no-peers",
                           "--json", f"{o}/bench-1b-float16-b32-s50.json", ">", f"{o}/bench-1b-float16-b32-s50.txt"]
    assert commands[2][3:7] == ["prune", f"{w}/1b.layer0.float16.safetensors", "--nm", "2:4"]
    assert commands[7][4] == f"{w}/1b.layer0.bfloat16.nm2-4.safetensors"
    assert sum(line.startswith("# write") for line in lines) == 2
    assert not (tmp_path / "o").exists() and not (tmp_path / "w").exists()  # nothing written


def test_dry_run_without_index_does_not_pass_it(tmp_path):
    res = subprocess.run([sys.executable, str(SCRIPT), "--dry-run", "--models", "8b", "--dtypes", "bfloat16",
                          "--configs", "70,4:8", "--peers", "--out", str(tmp_path)], capture_output=True, text=True,
                         check=True)
    assert "--index" not in res.stdout and "--no-peers" not in res.stdout
    assert "--blocks 32 --sparsity 0.7 -o" in res.stdout and "--nm 4:8 -o" in res.stdout


def test_configs_parse():
    assert ll.parse_config("80").prune_args == ("--blocks", "32", "--sparsity", "0.8")
    assert ll.parse_config("0.7").label == "70%"
    assert ll.parse_config("2:4").prune_args == ("--nm", "2:4")
    with pytest.raises(argparse.ArgumentTypeError):
        ll.parse_config("4:2")
