"""Outputs over inputs (issue 14, hostile class 6), through the real CLI.

No output of a command replaces one of its inputs (exit 3), named by the same path, a symlink or a
hard link: checkpoints and their shards, --config, recipes and their [train] init, --dense, the
packed file of bench; no two outputs of one command share a file (exit 2, before anything is
read). Every refusal leaves the inputs byte-identical and nothing new in the folder. Generated
TOML plans quote every string, so neither a tensor nor a folder name can inject TOML.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from test_bad_inputs import Guard, assert_fails
from test_finetune_cli import TINY_DIGITS, write_recipe

from balprune.config import load_config, prune_options_from_config
from balprune.save import save_state_dict


def _ckpt(path: Path, names=("fc1.weight", "fc2.weight"), cols=256) -> Path:
    g = torch.Generator().manual_seed(0)
    save_state_dict({n: torch.randn(16, cols, generator=g) for n in names}, path)
    return path


def _alias(kind: str, target: Path, where: Path) -> Path:
    """``target`` under another name: the same path, a symlink or a hard link."""
    if kind == "same":
        return target
    if kind == "symlink":
        where.symlink_to(target)
    else:
        os.link(target, where)
    return where


KINDS = ["same", "symlink", "hardlink"]


# --------------------------------------------------------------------------- prune / unpack


@pytest.mark.parametrize("kind", KINDS)
def test_prune_output_over_the_checkpoint(cli, tmp_path, kind):
    src = _ckpt(tmp_path / "m.safetensors")
    out = _alias(kind, src, tmp_path / "o.safetensors")
    g = Guard(tmp_path)
    assert_fails(cli("prune", src, "-s", "0.5", "-o", out, "--force"), 3, g, mentions=("over an input",))


@pytest.mark.parametrize("kind", KINDS)
def test_prune_output_over_the_config(cli, tmp_path, kind):
    src = _ckpt(tmp_path / "m.safetensors")
    cfg = tmp_path / "c.toml"
    cfg.write_text("[prune]\nsparsity = 0.5\n")
    out = _alias(kind, cfg, tmp_path / "o.safetensors")
    g = Guard(tmp_path)
    assert_fails(cli("prune", src, "--config", cfg, "-o", out, "--force"), 3, g, mentions=("--config", "over an input"))


def _two_shards(tmp_path: Path, first: str, second: str) -> Path:
    """A sharded folder tmp_path/hf: a.weight in ``first``, b.weight in ``second``, and their index."""
    folder = tmp_path / "hf"
    folder.mkdir()
    _ckpt(folder / first, names=("a.weight",))
    _ckpt(folder / second, names=("b.weight",))
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"a.weight": first, "b.weight": second}}))
    return folder


def test_prune_output_over_a_shard_of_a_folder(cli, tmp_path):
    folder = _two_shards(tmp_path, "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors")
    g = Guard(tmp_path)
    assert_fails(cli("prune", folder, "-s", "0.5", "-o", folder / "model-00002-of-00002.safetensors", "--force"),
                 3, g, mentions=("model-00002-of-00002.safetensors", "over an input"))
    # a new file in the folder is fine
    assert cli("prune", folder, "-s", "0.5", "-o", folder / "pruned.safetensors").code == 0


@pytest.mark.parametrize("kind", KINDS)
def test_unpack_output_over_the_packed_file(cli, tmp_path, kind):
    packed = tmp_path / "p.safetensors"
    assert cli("prune", _ckpt(tmp_path / "m.safetensors"), "-s", "0.5", "-o", packed).code == 0
    out = _alias(kind, packed, tmp_path / "d.safetensors")
    g = Guard(tmp_path)
    assert_fails(cli("unpack", packed, "-o", out, "--force"), 3, g)


# --------------------------------------------------------------------------- bench side outputs (no GPU needed:
# the refusal comes before the GPU is looked for)


@pytest.mark.parametrize("kind", KINDS)
def test_bench_json_over_the_packed_file(cli, tmp_path, kind):
    packed = tmp_path / "p.safetensors"
    assert cli("prune", _ckpt(tmp_path / "m.safetensors"), "-s", "0.5", "-o", packed).code == 0
    out = _alias(kind, packed, tmp_path / "r.json")
    g = Guard(tmp_path)
    assert_fails(cli("bench", packed, "--json", out), 3, g, mentions=("--json", "over an input"))


@pytest.mark.parametrize("second", ["x.json", "./x.json", "sub/../x.json", "link.json"])
def test_bench_sweep_json_and_plot_on_one_file(cli, tmp_path, monkeypatch, second):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "sub").mkdir()
    (tmp_path / "link.json").symlink_to(tmp_path / "x.json")  # dangling: x.json does not exist yet
    g = Guard(tmp_path)
    assert_fails(cli("bench-sweep", "--json", "x.json", "--plot", second), 2, g, mentions=("--json", "--plot"))


# --------------------------------------------------------------------------- sensitivity


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("flag", ["-o", "--json"])
def test_sensitivity_outputs_over_the_checkpoint(cli, tmp_path, kind, flag):
    src = _ckpt(tmp_path / "m.safetensors")
    out = _alias(kind, src, tmp_path / "o.out")
    other = ["--json", tmp_path / "s.json"] if flag == "-o" else ["-o", tmp_path / "p.toml"]
    g = Guard(tmp_path)
    assert_fails(cli("sensitivity", src, flag, out, *other, "--force"), 3, g, mentions=("checkpoint", "over an input"))


def test_sensitivity_outputs_over_the_config(cli, tmp_path):
    src = _ckpt(tmp_path / "m.safetensors")
    cfg = tmp_path / "c.toml"
    cfg.write_text('[prune]\nsparsity = 0.5\n')
    g = Guard(tmp_path)
    assert_fails(cli("sensitivity", src, "--config", cfg, "-o", cfg, "--force"), 3, g, mentions=("--config",))
    assert_fails(cli("sensitivity", src, "--config", cfg, "-o", tmp_path / "p.toml", "--json", cfg, "--force"), 3, g,
                 mentions=("--json", "--config"))


def test_sensitivity_outputs_over_a_shard(cli, tmp_path):
    folder = _two_shards(tmp_path, "s1.safetensors", "s2.safetensors")
    g = Guard(tmp_path)
    assert_fails(cli("sensitivity", folder, "-o", folder / "s2.safetensors", "--force"), 3, g,
                 mentions=("s2.safetensors",))


@pytest.mark.parametrize("same", ["plan.toml", "./plan.toml", "d/../plan.toml"])
def test_sensitivity_plan_and_json_on_one_file(cli, tmp_path, monkeypatch, same):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "d").mkdir()
    src = _ckpt(tmp_path / "m.safetensors")
    g = Guard(tmp_path)
    assert_fails(cli("sensitivity", src, "-o", "plan.toml", "--json", same), 2, g, mentions=("--json", "-o/--output"))
    # even when the recipe / checkpoint does not exist: nothing is read before the usage error
    assert_fails(cli("sensitivity", "nowhere.toml", "-o", "plan.toml", "--json", same), 2, g)


def test_sensitivity_existing_outputs_linked_to_each_other(cli, tmp_path):
    src = _ckpt(tmp_path / "m.safetensors")
    plan = tmp_path / "p.toml"
    plan.write_text("# an earlier plan\n")
    os.link(plan, tmp_path / "s.json")
    g = Guard(tmp_path)
    assert_fails(cli("sensitivity", src, "-o", plan, "--json", tmp_path / "s.json", "--force"), 2, g)


@pytest.fixture
def recipe_with_init(tmp_path):
    from balprune.tasks import TASKS, make_task

    task = make_task(TASKS["digits"], TASKS["digits"].parse_options({"hidden": 64}, "t"), None)
    init = tmp_path / "init.pt"
    torch.save(task.build_model().state_dict(), init)
    return write_recipe(tmp_path, TINY_DIGITS.replace("dense_steps = 40", 'dense_steps = 0\ninit = "init.pt"')), init


@pytest.mark.parametrize("kind", KINDS)
def test_sensitivity_recipe_mode_outputs_over_recipe_init_and_dense(cli, tmp_path, recipe_with_init, kind):
    recipe, init = recipe_with_init
    dense = tmp_path / "dense.pt"
    dense.write_bytes(b"not read")
    g = Guard(tmp_path)
    for target, args, label in ((recipe, [], "recipe"), (init, [], "[train] init"), (dense, ["--dense", dense], "--dense")):
        where = tmp_path / f"alias-{label[:3].strip('[')}"
        out = _alias(kind, target, where)
        assert_fails(cli("sensitivity", recipe, *args, "-o", out, "--device", "cpu", "--force"), 3, None,
                     mentions=(label, "over an input"))
        assert_fails(cli("sensitivity", recipe, *args, "-o", tmp_path / "p.toml", "--json", out, "--device", "cpu",
                         "--force"), 3, None, mentions=(label,))
        if kind != "same":
            where.unlink()
    g.assert_unchanged()


# --------------------------------------------------------------------------- finetune / sweep run folders


def test_finetune_run_folder_files_over_the_recipe_or_its_init(cli, tmp_path, recipe_with_init):
    recipe, init = recipe_with_init
    run = tmp_path / "run"
    run.mkdir()
    # the recipe itself stored as the run's metrics.json; --force would delete it
    inside = run / "metrics.json"
    inside.write_text(recipe.read_text().replace('init = "init.pt"', f'init = "{init}"'))
    g = Guard(tmp_path)
    assert_fails(cli("finetune", inside, "--out", run, "--device", "cpu", "--force"), 3, g,
                 mentions=("recipe", "over an input"))
    # the init checkpoint where the run writes its packed model
    packed = run / "model.balanced.safetensors"
    save_state_dict(torch.load(init, weights_only=True), packed)
    text = TINY_DIGITS.replace("dense_steps = 40", f'dense_steps = 0\ninit = "{packed}"')
    r2 = write_recipe(tmp_path, text, "r2.toml")
    g = Guard(tmp_path)
    assert_fails(cli("finetune", r2, "--out", run, "--device", "cpu", "--force"), 3, g, mentions=("[train] init",))
    # ... and a packed model of another pattern, which --force would delete
    other = run / "model.block.safetensors"
    os.replace(packed, other)
    r3 = write_recipe(tmp_path, text.replace(str(packed), str(other)), "r3.toml")
    g = Guard(tmp_path)
    assert_fails(cli("finetune", r3, "--out", run, "--device", "cpu", "--force"), 3, g, mentions=("[train] init",))


def test_sweep_refuses_inputs_inside_its_runs_folder(cli, tmp_path, recipe_with_init):
    recipe, init = recipe_with_init
    sweep = tmp_path / "sw"
    (sweep / "runs" / "old").mkdir(parents=True)
    kept = sweep / "runs" / "old" / "init.pt"
    kept.write_bytes(init.read_bytes())
    r = write_recipe(tmp_path, recipe.read_text().replace('init = "init.pt"', f'init = "{kept}"'), "r.toml")
    g = Guard(tmp_path)
    assert_fails(cli("sweep", r, "--out", sweep, "--patterns", "balanced", "--sparsities", "0.5", "--no-plot",
                     "--device", "cpu", "--force"), 3, g, mentions=("[train] init", "runs"))
    # the recipe as the sweep's sweep.json
    (sweep / "sweep.json").write_text(r.read_text())
    g = Guard(tmp_path)
    assert_fails(cli("sweep", sweep / "sweep.json", "--out", sweep, "--patterns", "balanced", "--sparsities", "0.5",
                     "--no-plot", "--device", "cpu", "--force"), 3, g, mentions=("recipe",))


# --------------------------------------------------------------------------- TOML plans cannot be injected

HOSTILE = ['q"uote.weight', 'nl\n[prune]\nsparsity = 0.1\n.weight', "br].weight", "[x]", '"""triple', "a\\b",
           "del\x7f\x1b[2J", "tab\tname", "glob*?.weight", "sep\u2028ar"]


def test_plan_quotes_hostile_tensor_names_and_reads_back_exactly(cli, tmp_path):
    src = _ckpt(tmp_path / "m.safetensors", names=HOSTILE + ["plain.weight"])
    plan = tmp_path / "plan.toml"
    r = cli("sensitivity", src, "--sparsities", "0.5,0.75", "--tolerance", "100", "-o", plan, "--json",
            tmp_path / "s.json")
    assert r.code == 0, r
    text = plan.read_text()
    assert "\x1b" not in text and "\x7f" not in text and "\u2028" not in text
    data = load_config(plan)
    assert set(data) == {"prune", "layers"} and data["prune"]["sparsity"] == 0.75
    rules = data["layers"]
    names = HOSTILE + ["plain.weight"]
    assert len(rules) == len(names) and sorted(data["prune"]["include"]) == sorted(r["match"] for r in rules)
    opts = prune_options_from_config(data)
    for name in names:
        (rule,) = [r for r in opts.rules if r.matches(name)]  # each rule matches its own tensor, and only it
        assert [n for n in names if rule.matches(n)] == [name] and rule.pattern.sparsity == 0.75
    # and `prune --config` prunes exactly those tensors at the planned sparsity
    out = tmp_path / "o.safetensors"
    r = cli("prune", src, "--config", plan, "-o", out, "--json")
    assert r.code == 0, r
    rep = json.loads(r.out)
    assert {t["name"]: (t["action"], t["sparsity_achieved"]) for t in rep["tensors"]} == {n: ("pruned", 0.75)
                                                                                          for n in names}


def test_plan_quotes_a_hostile_folder_name(cli, tmp_path):
    folder = tmp_path / 'd"\n[prune]\nsparsity = 0.1\n# '
    folder.mkdir()
    src = _ckpt(folder / "m.safetensors")
    plan = tmp_path / "plan.toml"
    r = cli("sensitivity", src, "--sparsities", "0.5,0.75", "--tolerance", "100", "-o", plan)
    assert r.code == 0, r
    data = load_config(plan)
    assert data["prune"]["sparsity"] == 0.75 and len(data["layers"]) == 2
    assert all(ln.startswith("#") or not ln.startswith("sparsity = 0.1") for ln in plan.read_text().splitlines())


def test_plan_refuses_a_name_toml_cannot_hold(cli, tmp_path):
    """A lone surrogate (legal in a safetensors header's JSON, not in UTF-8): exit 4, no plan."""
    import struct

    w = torch.randn(4, 64)
    header = {"ok.weight": {"dtype": "F32", "shape": [4, 64], "data_offsets": [0, 1024]},
              "bad\ud800.weight": {"dtype": "F32", "shape": [4, 64], "data_offsets": [1024, 2048]}}
    hb = json.dumps(header).encode()
    hb += b" " * (-len(hb) % 8)
    src = tmp_path / "m.safetensors"
    src.write_bytes(struct.pack("<Q", len(hb)) + hb + w.numpy().tobytes() * 2)
    plan = tmp_path / "plan.toml"
    g = Guard(tmp_path)
    assert_fails(cli("sensitivity", src, "--tolerance", "100", "-o", plan), 4, g, output=plan)


@pytest.mark.parametrize("link", ["symlink", "hardlink"])
def test_finetune_run_folder_files_linked_to_each_other(cli, tmp_path, link):
    """Two files of one run (checkpoint.pt and metrics.json) that are one file: exit 2, nothing touched."""
    recipe = write_recipe(tmp_path)
    run = tmp_path / "run"
    run.mkdir()
    (run / "checkpoint.pt").write_bytes(b"an earlier run's checkpoint")
    _alias(link, run / "checkpoint.pt", run / "metrics.json")
    g = Guard(tmp_path)
    assert_fails(cli("finetune", recipe, "--out", run, "--device", "cpu", "--force"), 2, g,
                 mentions=("checkpoint.pt", "metrics.json"))


def test_plan_of_a_checkpoint_whose_path_is_not_utf8(cli, tmp_path):
    """A file name with undecodable bytes (surrogate-escaped in Python): the plan's comment escapes it."""
    folder = os.fsdecode(bytes(tmp_path) + b"/d\xff")
    os.mkdir(folder)
    src = _ckpt(Path(folder) / "m.safetensors")
    plan = tmp_path / "plan.toml"
    r = cli("sensitivity", src, "--sparsities", "0.5,0.75", "--tolerance", "100", "-o", plan)
    assert r.code == 0, r
    assert load_config(plan)["prune"]["sparsity"] == 0.75 and "\\udcff" in plan.read_text()


def test_a_failing_torch_save_is_an_output_error(cli, tmp_path, monkeypatch):
    """torch's zip writer reports a full disk as RuntimeError ("unexpected pos ..."): a .pt output that
    cannot be written is exit 5 with one line, nothing at the output path, no temp file left."""
    import balprune.save as save

    def full(*_a, **_k):
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 1536 vs 1430")

    monkeypatch.setattr(save.torch, "save", full)
    out = tmp_path / "e.pt"
    r = cli("example", "tiny-cnn", "-o", out)
    assert r.code == 5 and r.err.startswith(f"balprune: error: cannot write {out}") and r.err.count("\n") == 1, r
    assert list(tmp_path.iterdir()) == []


def test_a_signal_after_the_output_is_committed_says_the_output_is_complete(tmp_path):
    """SIGTERM while the table is printed, after prune committed its file: exit 143 with one line saying the
    file had been written completely (not "no output was written"), and the file is there and verifies."""
    import subprocess
    import sys

    from helpers import REPO

    src, out = tmp_path / "m.pt", tmp_path / "o.safetensors"
    torch.save({"w": torch.randn(8, 32)}, src)
    script = (
        "import os, signal, sys\n"
        "import balprune.cli.render as r\n"
        "table = r.prune_table\n"
        "def late(report):\n"
        "    os.kill(os.getpid(), signal.SIGTERM)\n"
        "    return table(report)\n"
        "r.prune_table = late\n"
        "from balprune.cli import entry_point\n"
        f"sys.argv = ['balprune', 'prune', {str(src)!r}, '-s', '0.5', '--blocks', '4', '-o', {str(out)!r}]\n"
        "entry_point()\n")
    p = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "PYTHONPATH": str(REPO / "src")})
    assert p.returncode == 143, p.stderr
    assert p.stderr.count("\n") == 1 and f"{out} had been written completely" in p.stderr, p.stderr
    from balprune.formats.packed_file import verify_packed

    verify_packed(out)
