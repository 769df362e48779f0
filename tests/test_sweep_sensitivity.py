"""`balprune sweep` (table, JSON, PNG; same budget per run) and `balprune sensitivity` (a plan prune accepts)."""

from __future__ import annotations

import json
import sys

import pytest
import torch
from test_finetune_cli import TINY_DIGITS, write_recipe

from balprune.finetune.recipe import load_recipe, recipe_with_pattern
from balprune.finetune.run import run_finetune
from balprune.formats.packed_file import read_packed

PNG = b"\x89PNG\r\n\x1a\n"


def test_sweep_writes_table_json_and_plot_with_the_same_budget(cli, tmp_path):
    recipe = write_recipe(tmp_path)
    out = tmp_path / "sweep"
    r = cli("sweep", recipe, "--sparsities", "0.75,0.5", "--blocks", "2,4", "--block-sizes", "8", "--out", out,
            "--device", "cpu")
    assert r.code == 0, r.err
    for label in ("balanced B=2", "balanced B=4", "balanced L=8", "unstructured", "block 8x8", "vector 1x8"):
        assert label in r.out
    assert "s=0.5" in r.out and "s=0.75" in r.out and "relative to unstructured" in r.out
    data = json.loads((out / "sweep.json").read_text())
    assert data["schema"] == "balprune.sweep/1" and data["sparsities"] == [0.5, 0.75]
    assert len(data["points"]) == 6 * 2 and data["budget"]["stages"] == 3 and data["budget"]["steps_per_stage"] == 15
    assert (out / "sweep.png").read_bytes()[:8] == PNG
    by = {(p["label"], p["sparsity"]): p for p in data["points"]}
    assert by[("vector 1x8", 0.75)]["pattern"] == {"pattern": "vector", "sparsity": 0.75, "vector_length": 8}
    assert by[("balanced B=2", 0.5)]["pattern"]["blocks"] == 2
    assert by[("balanced L=8", 0.5)]["pattern"]["block_size"] == 8 and by[("balanced L=8", 0.75)]["achieved"] == 0.75
    # every run starts from the one dense model and gets the recipe's budget: a sweep point is exactly
    # what `finetune` gives for that pattern and sparsity
    alone = run_finetune(recipe_with_pattern(load_recipe(recipe), "block", 0.75, block_shape=(8, 8)), tmp_path / "alone",
                         device="cpu", export=False)
    point = by[("block 8x8", 0.75)]
    assert point["metrics"] == alone.stages[-1].metrics and point["achieved"] == alone.stages[-1].achieved
    assert data["dense_value"] == alone.dense_value
    same = json.loads((out / "runs" / "dense-same-budget" / "metrics.json").read_text())
    assert [st["achieved"] for st in same["stages"]] == [0.0] * 4 and same["stages"][-1]["global_step"] == 85
    assert data["dense_budget_value"] == same["stages"][-1]["metrics"]["test"]["accuracy"]
    assert "same budget" in r.out
    run = json.loads((out / "runs" / "vector-1x8-s0.75" / "metrics.json").read_text())
    assert [s["global_step"] for s in run["stages"]] == [40, 55, 70, 85]
    assert not (out / "runs" / "vector-1x8-s0.75" / "checkpoint.pt").exists()


def test_sweep_balanced_line_follows_the_recipe_geometry(tmp_path):
    from balprune.finetune.sweep import variants_for

    r = load_recipe(write_recipe(tmp_path, TINY_DIGITS.replace("blocks = 4", "block_size = 16")))
    assert [v.label for v in variants_for(r, ["balanced", "block"])] == ["balanced L=16", "block 8x8"]
    assert variants_for(load_recipe(write_recipe(tmp_path)), ["balanced"])[0].blocks == 4


def test_sweep_resume_keeps_finished_runs_and_refuses_without_it(cli, tmp_path):
    recipe = write_recipe(tmp_path)
    out = tmp_path / "sweep"
    args = ("sweep", recipe, "--patterns", "balanced,vector", "--sparsities", "0.5", "--out", out, "--device", "cpu",
            "--no-plot")
    assert cli(*args).code == 0
    assert not (out / "sweep.png").exists()
    r = cli(*args)
    assert r.code == 5 and "--resume" in r.err
    first = (out / "runs" / "vector-1x8-s0.5" / "metrics.json").stat().st_mtime_ns
    r = cli(*args, "--resume", "--json")
    assert r.code == 0
    assert (out / "runs" / "vector-1x8-s0.5" / "metrics.json").stat().st_mtime_ns == first, "not re-run"
    assert len(json.loads(r.out)["points"]) == 2


@pytest.mark.parametrize("args,needle", [
    (("--patterns", "balanced,diagonal"), "--patterns"),
    (("--sparsities", "0.5,abc"), "--sparsities"),
    (("--sparsities", "0.5,1.0"), "--sparsities"),
    (("--sparsities", "0,0.5"), "0 prunes nothing"),
    (("--sparsities", "0.5,0.5"), "twice"),
    (("--sparsities", ",".join(f"{0.1 + i * 1e-3:.4f}" for i in range(65))), "65 values; at most 64"),
    (("--blocks", "0"), "--blocks"),
    (("--block-shapes", "8by8"), "--block-shapes"),
    (("--resume", "--force"), "exclude each other"),
])
def test_sweep_bad_options_are_usage_errors(cli, tmp_path, args, needle):
    recipe = write_recipe(tmp_path)
    r = cli("sweep", recipe, *args, "--out", tmp_path / "s")
    assert r.code == 2 and needle in r.err and r.err.count("\n") == 1
    assert not (tmp_path / "s").exists()


def test_sweep_without_matplotlib_fails_before_training(cli, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    recipe = write_recipe(tmp_path)
    r = cli("sweep", recipe, "--out", tmp_path / "s", "--device", "cpu")
    assert r.code == 2 and "matplotlib" in r.err and "balprune[plot]" in r.err and r.err.count("\n") == 1
    assert not (tmp_path / "s" / "dense.pt").exists()


def test_sweep_refuses_a_list_schedule_that_fixes_the_target(cli, tmp_path):
    text = TINY_DIGITS.replace('kind = "cubic"\nsteps = 3', "values = [0.5, 0.75]")
    recipe = write_recipe(tmp_path, text)
    r = cli("sweep", recipe, "--sparsities", "0.9", "--out", tmp_path / "s", "--no-plot")
    assert r.code == 4 and "schedule values end at 0.75" in r.err
    assert not (tmp_path / "s").exists()
    r = cli("sweep", write_recipe(tmp_path), "--data", tmp_path, "--out", tmp_path / "s", "--no-plot")
    assert r.code == 2 and "ships its data" in r.err and not (tmp_path / "s").exists()


def test_sensitivity_proxy_plan_is_accepted_by_prune(cli, small_pt, tmp_path):
    g = torch.Generator().manual_seed(0)
    ckpt = tmp_path / "two.pt"
    torch.save({"dense.weight": torch.randn(32, 128, generator=g),  # Gaussian: every weight matters
                "peaky.weight": torch.randn(32, 128, generator=g) * (torch.rand(32, 128, generator=g) < 0.12),
                "peaky.bias": torch.zeros(32)}, ckpt)
    plan = tmp_path / "plan.toml"
    report = tmp_path / "sens.json"
    r = cli("sensitivity", ckpt, "--blocks", "4", "--tolerance", "0.3", "-o", plan, "--json", report)
    assert r.code == 0, r.err
    data = json.loads(report.read_text())
    assert data["mode"] == "proxy" and [x["name"] for x in data["layers"]] == ["dense.weight", "peaky.weight"]
    for layer in data["layers"]:
        d = layer["degradation"]
        assert d["0.95"] > d["0.5"] >= 0, "pruning more costs more"
        ok = [float(s) for s, v in d.items() if v <= 0.3]
        assert layer["chosen"] == (max(ok) if ok else None)
    chosen = {x["name"]: x["chosen"] for x in data["layers"]}
    assert chosen["peaky.weight"] >= 0.8 > chosen["dense.weight"], "the mostly-small layer takes more pruning"
    out = tmp_path / "planned.safetensors"
    r = cli("prune", ckpt, "--config", plan, "-o", out)
    assert r.code == 0, r.err
    tensors = read_packed(out).manifest["tensors"]
    for name, s in chosen.items():
        if s is None:
            assert tensors[name]["pattern"] == "dense"
        else:
            assert tensors[name]["pattern"] == "balanced" and tensors[name]["sparsity_target"] == s
    assert tensors["peaky.bias"]["pattern"] == "dense"
    # the default prune of small_pt's layers through the proxy: a plan for a real model shape works too
    assert cli("sensitivity", small_pt, "-o", tmp_path / "small.toml").code == 0
    r = cli("prune", small_pt, "--config", tmp_path / "small.toml", "-o", tmp_path / "small.safetensors")
    assert r.code == 0, r.err
    assert read_packed(tmp_path / "small.safetensors").manifest["tensors"]["q.weight"]["pattern"] == "dense"


def test_sensitivity_zero_tolerance_keeps_everything_dense_and_the_plan_still_works(cli, small_pt, tmp_path):
    plan = tmp_path / "plan.toml"
    assert cli("sensitivity", small_pt, "--tolerance", "0", "-o", plan, "--pattern", "vector",
               "--vector-length", "4").code == 0
    assert plan.read_text().count("\nskip = true\n") == 4
    r = cli("prune", small_pt, "--config", plan, "-o", tmp_path / "o.safetensors")
    assert r.code == 0 and all(t["pattern"] == "dense"
                               for t in read_packed(tmp_path / "o.safetensors").manifest["tensors"].values())
    r = cli("sensitivity", small_pt, "-o", plan)
    assert r.code == 5 and "--force" in r.err


def test_sensitivity_of_a_recipe_uses_the_task_metric(cli, tmp_path):
    recipe = write_recipe(tmp_path)
    plan = tmp_path / "plan.toml"
    r = cli("sensitivity", recipe, "--sparsities", "0.5,0.9", "--tolerance", "0.05", "-o", plan, "--json",
            tmp_path / "s.json", "--device", "cpu")
    assert r.code == 0, r.err
    data = json.loads((tmp_path / "s.json").read_text())
    assert data["mode"] == "metric" and 0 < data["baseline"] <= 1
    assert [x["name"] for x in data["layers"]] == ["fc2.weight", "fc3.weight"]  # fc1 excluded by the recipe
    for layer in data["layers"]:
        for s, v in layer["values"].items():
            assert layer["degradation"][s] == pytest.approx((data["baseline"] - v) / data["baseline"])
    # the plan prunes the run's model: `prune --key model` reads the fine-tuning checkpoint's weights
    assert cli("finetune", recipe, "--out", tmp_path / "run", "--device", "cpu", "--no-export").code == 0
    out = tmp_path / "planned.safetensors"
    r = cli("prune", tmp_path / "run" / "checkpoint.pt", "--key", "model", "--config", plan, "-o", out)
    assert r.code == 0, r.err
    assert read_packed(out).manifest["tensors"]["fc1.weight"]["pattern"] == "dense"


def test_progress_rendering_on_a_terminal():
    import io

    from rich.console import Console

    from balprune.cli import render_train
    from balprune.finetune.run import ProgressEvent

    console = Console(file=io.StringIO(), force_terminal=True, width=120, highlight=False)
    bar = render_train.progress_bar(console)
    with bar:
        task = bar.add_task("starting", total=1, loss="-", metric="")
        for phase, step, metric in (("train", 5, None), ("eval", 10, None), ("stage", 10, 0.9612)):
            render_train.update_bar(bar, task, ProgressEvent(phase, 2, 4, step, 10, 50 + step, 90, 0.787, 0.25,
                                                             "accuracy", metric), console, label="balanced B=4")
        assert bar.tasks[0].completed == 60 and bar.tasks[0].total == 90
        assert bar.tasks[0].fields["metric"] == "accuracy 96.12%" and bar.tasks[0].fields["loss"] == "0.2500"
    text = console.file.getvalue()
    assert "balanced B=4: stage 2/4 sparsity 0.787: accuracy 96.12% after 60 steps" in text


def test_sensitivity_bad_inputs(cli, small_pt, tmp_path):
    r = cli("sensitivity", small_pt, "--tolerance", "-1")
    assert r.code == 2 and "--tolerance" in r.err
    r = cli("sensitivity", small_pt, "--data", tmp_path)
    assert r.code == 2 and "apply to a recipe" in r.err
    r = cli("sensitivity", tmp_path / "missing.pt", "-o", tmp_path / "p.toml")
    assert r.code == 4 and not (tmp_path / "p.toml").exists()
    r = cli("sensitivity", small_pt, "--include-everything")
    assert r.code == 2
    r = cli("sensitivity", small_pt, "--sparsities", ",".join(f"{0.1 + i * 1e-3:.4f}" for i in range(65)))
    assert r.code == 2 and "at most 64" in r.err


def test_sensitivity_takes_any_seed_of_its_range(cli, small_pt, tmp_path):
    """The per-layer generator's seed is derived from --seed without overflowing its 64 bits (a seed near 2^63
    was an internal error, exit 70); seeds below 2^63 / 1000003 keep the values they always had."""
    for seed in ("20000000000000", str((1 << 63) - 1)):
        r = cli("sensitivity", small_pt, "--seed", seed, "-o", tmp_path / f"p{seed}.toml")
        assert r.code == 0, r.err
        assert (tmp_path / f"p{seed}.toml").exists()
    torch.save({"bias": torch.zeros(3)}, tmp_path / "onlybias.pt")
    r = cli("sensitivity", tmp_path / "onlybias.pt", "-o", tmp_path / "p.toml")
    assert r.code == 4 and "no tensor is a pruning target" in r.err and not (tmp_path / "p.toml").exists()


@pytest.mark.parametrize("damage", ["no stages", "stages a string", "test missing", "accuracy a string",
                                    "seconds a string", "achieved null", "pattern missing",
                                    "pattern a string"])
def test_a_damaged_finished_run_is_run_again_not_a_crash(tmp_path, damage):
    """sweep --resume read a finished run's metrics.json field by field: a damaged one was exit 70
    (IndexError, KeyError, TypeError). Such a run counts as not finished, so its point runs again."""
    import json as _json

    from balprune.finetune.sweep import METRICS, _finished

    good = {"done": True, "key": "k", "pattern": {"kind": "balanced", "sparsity": 0.5},
            "stages": [{"stage": 0, "steps": 10, "global_step": 10, "sparsity": 0.0, "seconds": 1.0, "achieved": 0.0,
                        "after_prune": None, "metrics": {"test": {"accuracy": 0.9}}},
                       {"stage": 1, "steps": 10, "global_step": 20, "sparsity": 0.5, "seconds": 2.0, "achieved": 0.5,
                        "after_prune": {"accuracy": 0.5}, "metrics": {"test": {"accuracy": 0.8}}}]}
    (tmp_path / METRICS).write_text(_json.dumps(good))
    assert _finished(tmp_path, "k", "test", "accuracy") == good
    bad = _json.loads(_json.dumps(good))
    last = bad["stages"][-1]
    {"no stages": lambda: bad.update(stages=[]), "stages a string": lambda: bad.update(stages="x"),
     "test missing": lambda: last["metrics"].pop("test"),
     "accuracy a string": lambda: last["metrics"]["test"].update(accuracy="x"),
     "seconds a string": lambda: bad["stages"][0].update(seconds="x"),
     "achieved null": lambda: last.update(achieved=None), "pattern missing": lambda: bad.pop("pattern"), "pattern a string": lambda: bad.update(pattern="x")}[damage]()
    (tmp_path / METRICS).write_text(_json.dumps(bad))
    assert _finished(tmp_path, "k", "test", "accuracy") is None
