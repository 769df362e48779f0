"""The CLI on real files: prune / unpack / verify / inspect / example, configs and patterns."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from helpers import REPO, run_subprocess, small_state_dict
from safetensors.torch import load_file

from balprune.save import save_state_dict


def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def test_prune_default_output_table_and_exact_unpack(cli, small_pt, tmp_path):
    before = _sha(small_pt)
    r = cli("prune", small_pt, "--blocks", "32", "--sparsity", "0.9")
    assert r.code == 0, r.err
    out = tmp_path / "model.balanced.safetensors"
    assert out.exists()
    assert "fc1.weight" in r.out and "balanced" in r.out and "total" in r.out
    assert _sha(small_pt) == before
    dense = tmp_path / "dense.safetensors"
    assert cli("unpack", out, "-o", dense).code == 0
    got = load_file(str(dense))
    src = small_state_dict()
    assert sorted(got) == sorted(src)  # every tensor back, none added (safetensors stores names sorted)
    for name, want in src.items():
        assert got[name].dtype == want.dtype and got[name].shape == want.shape
        kept = got[name] != 0
        assert torch.equal(got[name][kept], want[kept])
    # fc1: K=100, 32 blocks -> L=4, B=25, k=floor(0.4+0.5)=1 -> 25 of 100 kept per row
    assert int((got["fc1.weight"] != 0).sum(1).max()) <= 25
    assert torch.equal(got["fc1.bias"], src["fc1.bias"])


def test_prune_json_report_and_inspect_json(cli, small_st, tmp_path):
    out = tmp_path / "o.safetensors"
    r = cli("prune", small_st, "-s", "0.75", "--blocks", "4", "-o", out, "--json")
    assert r.code == 0, r.err
    rep = json.loads(r.out)
    assert rep["schema"] == "balprune.prune-report/1"
    by = {t["name"]: t for t in rep["tensors"]}
    assert by["fc1.weight"]["action"] == "pruned" and by["fc1.weight"]["sparsity_achieved"] == pytest.approx(0.76)
    assert by["fc1.bias"]["action"] == "passed" and "1-D" in by["fc1.bias"]["reason"]
    assert by["q.weight"]["action"] == "passed" and "I8" in by["q.weight"]["reason"]
    assert rep["packed_bytes"] < rep["dense_bytes"]
    r = cli("inspect", out, "--json")
    assert r.code == 0
    info = json.loads(r.out)
    assert info["manifest"]["source"]["sha256"] == _sha(small_st)
    layers = {x["name"]: x for x in info["layers"]}
    assert layers["fc1.weight"]["pattern"] == "balanced"
    assert info["manifest"]["options"]["blocks"] == 4
    r = cli("verify", out, "--json")
    assert r.code == 0 and json.loads(r.out)["ok"] is True
    r = cli("inspect", out)
    assert r.code == 0 and "sha256" in r.out and "fc1.weight" in r.out


@pytest.mark.parametrize("args,pattern", [
    (["--pattern", "unstructured", "-s", "0.8"], "unstructured"),
    (["--pattern", "unstructured", "--scope", "global", "-s", "0.8"], "unstructured"),
    (["--pattern", "block", "--block-shape", "4x4", "-s", "0.5"], "block"),
    (["--nm", "2:4"], "balanced"),
    (["--block-size", "8", "-s", "0.5"], "balanced"),
])
def test_patterns_through_cli_round_trip(cli, small_pt, tmp_path, args, pattern):
    out = tmp_path / "p.safetensors"
    r = cli("prune", small_pt, *args, "-o", out)
    assert r.code == 0, r.err
    assert cli("verify", out).code == 0
    info = json.loads(cli("inspect", out, "--json").out)
    assert {x["pattern"] for x in info["layers"]} >= {pattern, "dense"}
    dense = tmp_path / "d.safetensors"
    assert cli("unpack", out, "-o", dense).code == 0
    got = load_file(str(dense))
    src = small_state_dict()
    for name, want in src.items():
        kept = got[name] != 0
        assert torch.equal(got[name][kept], want[kept])
    if args[0] == "--nm":
        w = got["fc1.weight"].reshape(24, 25, 4)
        assert ((w != 0).sum(-1) <= 2).all()


def test_global_scope_ranks_across_tensors(cli, tmp_path):
    src = tmp_path / "g.safetensors"
    save_state_dict({"a.weight": torch.full((4, 4), 10.0), "b.weight": torch.full((4, 4), 0.1) + torch.arange(16).view(4, 4) * 1e-3}, src)
    out = tmp_path / "o.safetensors"
    assert cli("prune", src, "--pattern", "unstructured", "--scope", "global", "-s", "0.5", "-o", out).code == 0
    info = {x["name"]: x for x in json.loads(cli("inspect", out, "--json").out)["layers"]}
    assert info["a.weight"]["sparsity_achieved"] == 0.0 and info["b.weight"]["sparsity_achieved"] == 1.0 - 1 / 16


def test_include_exclude_and_config_rules(cli, small_pt, tmp_path):
    out = tmp_path / "o.safetensors"
    r = cli("prune", small_pt, "-s", "0.5", "--include", "fc*", "--exclude", "fc2.*", "-o", out, "--json")
    assert r.code == 0, r.err
    by = {t["name"]: t for t in json.loads(r.out)["tensors"]}
    assert by["fc1.weight"]["action"] == "pruned"
    assert by["fc2.weight"]["action"] == "passed" and "exclude" in by["fc2.weight"]["reason"]
    assert by["conv2.weight"]["action"] == "passed" and "include" in by["conv2.weight"]["reason"]

    cfg = tmp_path / "r.toml"
    cfg.write_text('[prune]\nsparsity = 0.5\nblocks = 4\n\n[[layers]]\nmatch = "conv*"\nskip = true\n\n'
                   '[[layers]]\nmatch = "fc2.weight"\npattern = "block"\nblock_shape = "2x2"\nsparsity = 0.75\n')
    r = cli("prune", small_pt, "--config", cfg, "-o", out, "--force", "--json")
    assert r.code == 0, r.err
    by = {t["name"]: t for t in json.loads(r.out)["tensors"]}
    assert by["conv2.weight"]["action"] == "passed" and "rule" in by["conv2.weight"]["reason"]
    assert by["fc2.weight"]["reason"].startswith("block")
    assert by["fc1.weight"]["reason"].startswith("balanced B=4")
    # the CLI wins over the config file
    r = cli("prune", small_pt, "--config", cfg, "-s", "0.9", "-o", out, "--force", "--json")
    by = {t["name"]: t for t in json.loads(r.out)["tensors"]}
    assert by["fc1.weight"]["sparsity_achieved"] > 0.85


@pytest.mark.parametrize("text,needle", [
    ("[prune]\nsparsity = 0.5\nbogus = 1\n", "bogus"),
    ("[prune]\nsparsity = 1.5\n", "sparsity"),
    ("[prune]\nsparsity = 0.5\n[[layers]]\nskip = true\n", "match"),
    ("[prune\n", "r.toml"),
    ("[unknown]\n", "unknown"),
])
def test_bad_configs_exit_4_naming_the_problem(cli, small_pt, tmp_path, text, needle):
    cfg = tmp_path / "r.toml"
    cfg.write_text(text)
    r = cli("prune", small_pt, "--config", cfg, "-o", tmp_path / "o.safetensors")
    assert r.code == 4, r
    assert needle in r.err and r.err.count("\n") == 1
    assert not (tmp_path / "o.safetensors").exists()


@pytest.mark.parametrize("name", ["vgg16-balanced", "lstm-lm-balanced", "nm-2of4"])
def test_shipped_configs_are_valid(cli, small_pt, tmp_path, name):
    r = cli("prune", small_pt, "--config", REPO / "configs" / f"{name}.toml", "-o", tmp_path / "o.safetensors")
    assert r.code == 0, r.err


def test_steps_without_hook_note_one_shot(cli, small_pt, tmp_path):
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    r = cli("prune", small_pt, "-s", "0.8", "--steps", "4", "-o", a)
    assert r.code == 0 and "one-shot" in r.err
    assert cli("prune", small_pt, "-s", "0.8", "-o", b).code == 0
    # identical tensors; only the options recorded in the manifest differ
    from balprune.formats.packed_file import read_packed

    pa, pb = read_packed(a), read_packed(b)
    assert [e.name for e in pa.parsed.entries] == [e.name for e in pb.parsed.entries]
    stored_a, stored_b = load_file(str(a)), load_file(str(b))  # every stored part (values, indices, ...)
    assert all(torch.equal(stored_a[k], stored_b[k]) for k in stored_a), "stored tensors differ"
    assert pa.manifest["tensors"] == pb.manifest["tensors"]
    assert pa.manifest["options"] != pb.manifest["options"]  # --steps 4 is recorded
    assert {k: v for k, v in pa.manifest["options"].items() if k != "schedule"} == \
        {k: v for k, v in pb.manifest["options"].items() if k != "schedule"}


def test_sharded_safetensors_folder(cli, tmp_path):
    folder = tmp_path / "sharded"
    folder.mkdir()
    sd = small_state_dict()
    names = list(sd)
    shard_a = {n: sd[n] for n in names[:4]}
    shard_b = {n: sd[n] for n in names[4:]}
    save_state_dict(shard_a, folder / "model-00001-of-00002.safetensors")
    save_state_dict(shard_b, folder / "model-00002-of-00002.safetensors")
    wm = {n: "model-00001-of-00002.safetensors" for n in shard_a} | {n: "model-00002-of-00002.safetensors" for n in shard_b}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": wm}))
    r = cli("prune", folder, "-s", "0.9")
    assert r.code == 0, r.err
    out = tmp_path / "sharded.balanced.safetensors"
    assert out.exists() and cli("verify", out).code == 0
    assert set(json.loads(cli("inspect", out, "--json").out)["manifest"]["tensors"][0]) >= {"name"}


def test_torchvision_vgg16_state_dict_prunes(cli, tmp_path):
    """The whole torchvision VGG-16 (random weights): torchvision imports, every layer is handled."""
    src = tmp_path / "vgg16.pt"
    r = cli("example", "vgg16", "-o", src)
    assert r.code == 0, r.err
    r = cli("prune", src, "--blocks", "32", "--sparsity", "0.9", "--json")
    assert r.code == 0, r.err
    by = {t["name"]: t for t in json.loads(r.out)["tensors"]}
    assert len(by) == 32  # 13 conv + 3 fc layers, weight and bias each
    assert by["features.0.weight"]["action"] == "passed" and "too short" in by["features.0.weight"]["reason"]
    for name in ("features.2.weight", "features.28.weight", "classifier.0.weight", "classifier.6.weight"):
        assert by[name]["action"] == "pruned"
    # fc6: K=25088, 32 blocks of 784 (uint16 indices), k=78: 1 - 78*32/25088
    # auto: 78 u16 offsets per block (4992 bytes a row) against one bit per column (3136 bytes)
    assert by["classifier.0.weight"]["reason"].startswith("balanced B=32 L=784 k=78 idx=bitmask")
    assert "offsets 4992, bitmask 3136" in by["classifier.0.weight"]["reason"]
    assert by["classifier.0.weight"]["sparsity_achieved"] == pytest.approx(1 - 78 * 32 / 25088)
    rep = json.loads(r.out)
    assert rep["packed_bytes"] < 0.2 * rep["dense_bytes"]
    assert cli("verify", tmp_path / "vgg16.balanced.safetensors").code == 0


def test_example_lstm_lm_shapes(cli, tmp_path):
    out = tmp_path / "lm.safetensors"
    r = cli("example", "lstm-lm", "-o", out)
    assert r.code == 0, r.err
    from balprune.checkpoint import open_checkpoint

    shapes = {t.name: t.shape for t in open_checkpoint(out).tensors}
    assert shapes["lstm.weight_hh_l1"] == (6000, 1500) and shapes["decoder.weight"] == (10000, 1500)
    assert shapes["embedding.weight"] == (10000, 1500)
    assert cli("example", "list").code == 0
    assert cli("example", "nope", "-o", tmp_path / "x.pt").code == 2


def test_console_script_help_and_version():
    r = run_subprocess("--version")
    assert r.returncode == 0 and r.stdout.startswith("balprune ")
    r = run_subprocess("--help")
    assert r.returncode == 0
    for cmd in ("prune", "unpack", "verify", "inspect", "example"):
        assert cmd in r.stdout


def test_safetensors_written_by_balprune_say_format_pt(cli, small_pt, tmp_path):
    """transformers (and other readers) refuse a safetensors file whose metadata "format" is not one they
    know: unpack's output and example's .safetensors carry format=pt beside balprune's own keys."""
    from safetensors import safe_open

    packed, dense, ex = tmp_path / "p.safetensors", tmp_path / "d.safetensors", tmp_path / "e.safetensors"
    assert cli("prune", small_pt, "-s", "0.5", "--blocks", "4", "-o", packed).code == 0
    assert cli("unpack", packed, "-o", dense).code == 0
    assert cli("example", "tiny-cnn", "-o", ex).code == 0
    with safe_open(dense, "pt") as f:
        md = f.metadata()
    assert md["format"] == "pt" and md["balprune"] == "unpacked" and len(md["source_sha256"]) == 64
    with safe_open(ex, "pt") as f:
        assert f.metadata()["format"] == "pt"
