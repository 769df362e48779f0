"""benchmarks/llm_criteria.py on the CPU: its plan, the commands it runs, and the targets it reads off
a perplexity table (each target shown passing and missing on hand-built tables)."""

from __future__ import annotations

import importlib.util
import sys

import pytest
from helpers import REPO

SCRIPT = REPO / "benchmarks" / "llm_criteria.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("llm_criteria", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["llm_criteria"] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


def test_nm_patterns_run_only_at_their_own_sparsity(bench):
    jobs = bench.plan(["wanda"], ["l32", "2:4", "4:8"], [0.5, 0.6, 0.7])
    assert [(j.pattern, j.sparsity) for j in jobs] == [("l32", 0.5), ("l32", 0.6), ("l32", 0.7), ("2:4", 0.5),
                                                       ("4:8", 0.5)]
    assert len({j.label for j in bench.plan(list(bench.CRITERIA), list(bench.PATTERNS), [0.5, 0.6, 0.7])}) == 42


def test_commands_are_the_users_commands(bench, tmp_path):
    j = bench.Job("sparsegpt", "l32", 0.6)
    cmd = bench.prune_command(j, tmp_path / "hf", tmp_path / "t.npy", tmp_path / "p.safetensors", 128, 128)
    assert cmd[1:4] == ["-m", "balprune", "prune"]
    text = " ".join(cmd)
    assert "--block-size 32 --sparsity 0.6 --criterion sparsegpt" in text and "--samples 128 --seq-len 128" in text
    assert "--include model.layers.*" in text
    mag = " ".join(bench.prune_command(bench.Job("magnitude", "2:4", 0.5), tmp_path, tmp_path, tmp_path, 1, 1))
    assert "--nm 2:4" in mag and "--sparsity" not in mag and "--criterion" not in mag


def _status(targets, prefix):
    return [t["status"] for t in targets if t["target"].startswith(prefix)]


def test_targets_pass_on_a_table_that_meets_them(bench):
    rows = {("per-row", 0.5): {"wanda": 10.0}, ("l32", 0.5): {"wanda": 10.2, "sparsegpt": 10.29, "magnitude": 15.0},
            ("per-row", 0.6): {"wanda": 12.0}, ("l32", 0.6): {"wanda": 12.7, "sparsegpt": 12.1},
            ("2:4", 0.5): {"wanda": 13.0}, ("4:8", 0.5): {"wanda": 11.0}}
    t = bench.evaluate_targets(rows)
    assert _status(t, "l32 wanda within 3%") == ["PASS"] and _status(t, "l32 sparsegpt within 3%") == ["PASS"]
    assert _status(t, "l32 wanda within 6%") == ["PASS"]
    assert _status(t, "wanda: 2:4 worse") == ["PASS"] and _status(t, "magnitude: 2:4") == ["n/a"]
    assert _status(t, "wanda ahead of magnitude") == ["PASS"]


def test_targets_miss_on_a_table_that_does_not(bench):
    rows = {("per-row", 0.5): {"wanda": 10.0}, ("l32", 0.5): {"wanda": 10.4, "magnitude": 10.3, "sparsegpt": 9.0},
            ("4:8", 0.5): {"wanda": 10.2}, ("2:4", 0.5): {"wanda": 12.0}}
    t = bench.evaluate_targets(rows)
    assert _status(t, "l32 wanda within 3%") == ["MISS"]
    assert _status(t, "wanda: 2:4 worse") == ["MISS"]  # 4:8 ahead of l32 here
    assert _status(t, "wanda ahead of magnitude") == ["MISS"] and _status(t, "sparsegpt ahead") == ["PASS"]
    text = bench.render(rows, 9.5, t, list(bench.CRITERIA))
    assert "dense perplexity: 9.500" in text and "| l32 | 50% | 10.300 | 10.400 | 9.000 |" in text
