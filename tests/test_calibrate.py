"""`balprune prune FOLDER --criterion wanda|sparsegpt --calibration FILE` on llama-tiny folders (CPU).

Through the real CLI: the packed file verifies, differs from magnitude's only where calibration prunes
(the decoder linears), comes out byte-identical on a re-run, and every decoder linear is exactly what
the published rule gives on the inputs of a model whose earlier layers are already pruned; bad
calibration options and files end with one line and their exit code, with no output file.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from balprune.config import prune_options_from_config
from balprune.errors import ConfigError
from balprune.formats.packed_file import read_packed
from balprune.llm.calibrate import LINEARS, calibration_windows, linear_name
from balprune.llm.examples import write_example
from balprune.llm.family import open_llm
from balprune.llm.reference import ReferenceLM
from balprune.llm.text import EXAMPLE_CORPUS

CAL = ("--samples", "6", "--seq-len", "24")


@pytest.fixture(scope="module")
def llm(tmp_path_factory) -> tuple[Path, Path]:
    """(llama-tiny folder, a file of 300 token ids) shared by the module's tests (never written to)."""
    root = tmp_path_factory.mktemp("llm")
    folder = write_example("llama-tiny", root / "tiny")
    ids = root / "ids.txt"
    g = torch.Generator().manual_seed(7)
    ids.write_text(" ".join(map(str, torch.randint(0, 512, (300,), generator=g).tolist())) + "\n")
    return folder, ids


def _digest(*paths: Path) -> dict[str, str]:
    """sha256 of every file under ``paths`` (to show inputs are never changed)."""
    out = {}
    for p in paths:
        for f in sorted([p] if p.is_file() else p.rglob("*")):
            if f.is_file():
                out[str(f)] = hashlib.sha256(f.read_bytes()).hexdigest()
    return out


def _prune(cli, folder, out, *args):
    r = cli("prune", folder, "--blocks", "4", "--sparsity", "0.5", "-o", out, *args)
    assert r.code == 0, r.err
    return r


def test_wanda_and_sparsegpt_verify_differ_from_magnitude_and_repeat_byte_for_byte(cli, llm, tmp_path):
    folder, ids = llm
    before = _digest(folder, ids)
    outputs = {}
    for criterion in ("magnitude", "wanda", "sparsegpt"):
        extra = () if criterion == "magnitude" else ("--calibration", ids, *CAL)
        for run in (1, 2):
            out = tmp_path / f"{criterion}{run}.safetensors"
            r = _prune(cli, folder, out, "--criterion", criterion, *extra, "--json")
            report = json.loads(r.out)
            assert report["criterion"] == criterion
            assert cli("verify", out).code == 0
            outputs[criterion, run] = out
        assert outputs[criterion, 1].read_bytes() == outputs[criterion, 2].read_bytes(), criterion
    default = tmp_path / "default.safetensors"
    _prune(cli, folder, default)  # no --criterion: magnitude, the bytes of every earlier balprune
    assert default.read_bytes() == outputs["magnitude", 1].read_bytes()
    assert _digest(folder, ids) == before

    files = {c: read_packed(outputs[c, 1]) for c in ("magnitude", "wanda", "sparsegpt")}
    options = files["wanda"].manifest["options"]
    assert options["criterion"] == "wanda"
    assert options["calibration"] == {"data": "ids.txt", "samples": 6, "seq_len": 24, "seed": 0, "device": "cpu"}
    assert "criterion" not in files["magnitude"].manifest["options"]
    decoder_linears = {linear_name(n, m) for n in range(4) for m, _ in LINEARS}
    for name in list(files["magnitude"].manifest["tensors"]):
        dense = {c: f.dense(name) for c, f in files.items()}
        if name in decoder_linears:
            assert not torch.equal(dense["wanda"], dense["magnitude"]), name
            assert not torch.equal(dense["sparsegpt"], dense["wanda"]), name
        else:  # embedding: magnitude-pruned without a criterion, left dense by the calibrated ones; norms dense
            source = open_llm(folder)[1].load(name)
            assert torch.equal(dense["wanda"], source) and torch.equal(dense["sparsegpt"], source), name
            assert files["wanda"].manifest["tensors"][name]["pattern"] == "dense", name
    assert not torch.equal(files["magnitude"].dense("model.embed_tokens.weight"),
                           files["wanda"].dense("model.embed_tokens.weight"))  # the default without a criterion


def test_calibrated_criteria_target_the_decoder_layers_unless_told_otherwise(cli, llm, tmp_path):
    """Without --include the embedding stays dense, and a note says so; --include names it back in."""
    folder, ids = llm
    r = cli("prune", folder, "--sparsity", "0.5", "--criterion", "wanda", "--calibration", ids, *CAL,
            "-o", tmp_path / "a.safetensors")
    assert r.code == 0, r.err
    assert "note: targets: the decoder layers' linears" in r.err
    assert read_packed(tmp_path / "a.safetensors").manifest["tensors"]["model.embed_tokens.weight"]["pattern"] == "dense"
    r = cli("prune", folder, "--sparsity", "0.5", "--criterion", "wanda", "--calibration", ids, *CAL,
            "--include", "model.*", "-o", tmp_path / "b.safetensors")
    assert r.code == 0 and "note: targets" not in r.err, r.err
    assert read_packed(tmp_path / "b.safetensors").manifest["tensors"]["model.embed_tokens.weight"]["pattern"] != "dense"


def test_each_layer_is_pruned_on_the_outputs_of_the_pruned_layers_before_it(cli, llm, tmp_path):
    """Every decoder linear of the wanda file equals Wanda's per-row rule on the inputs it gets in a model
    whose earlier layers hold the file's pruned weights (the embedding left dense: --exclude)."""
    folder, ids = llm
    out = tmp_path / "w.safetensors"
    r = cli("prune", folder, "--blocks", "1", "--sparsity", "0.5", "--exclude", "model.embed_tokens.weight",
            "--criterion", "wanda", "--calibration", ids, *CAL, "-o", out)
    assert r.code == 0, r.err
    pf = read_packed(out)
    cfg, ckpt = open_llm(folder)
    windows = calibration_windows(cfg, folder, ids, tokenizer=None, samples=6, seq_len=24, seed=0)
    for n in range(cfg.num_hidden_layers):
        model = ReferenceLM.from_checkpoint(cfg, ckpt)
        for m in range(n):
            for module, _ in LINEARS:
                name = linear_name(m, module)
                model.get_submodule(name[: -len(".weight")]).weight.data = pf.dense(name)
        inputs = {}
        hooks = [model.get_submodule(linear_name(n, module)[: -len(".weight")]).register_forward_pre_hook(
            lambda _m, args, module=module, inputs=inputs: inputs.__setitem__(module, args[0])) for module, _ in LINEARS]
        model(windows)
        for h in hooks:
            h.remove()
        for module, _ in LINEARS:
            name = linear_name(n, module)
            x = inputs[module].reshape(-1, inputs[module].shape[-1]).to(torch.float64)
            w = ckpt.load(name)
            scores = w.abs() * x.norm(dim=0).to(torch.float32)
            drop = torch.sort(scores, dim=1).indices[:, : w.shape[1] // 2]
            assert torch.equal(pf.dense(name), w.clone().scatter_(1, drop, 0.0)), name


@pytest.mark.parametrize("args", [
    ("--nm", "2:4"),
    ("-p", "unstructured", "--sparsity", "0.6"),
    ("-p", "block", "--block-shape", "4x8", "--sparsity", "0.5"),
    ("-p", "vector", "--vector-length", "8", "--sparsity", "0.5"),
])
def test_sparsegpt_in_every_pattern_verifies(cli, llm, tmp_path, args):
    folder, ids = llm
    out = tmp_path / "o.safetensors"
    r = cli("prune", folder, *args, "--criterion", "sparsegpt", "--calibration", ids, *CAL, "-o", out, "--json")
    assert r.code == 0, r.err
    assert cli("verify", out).code == 0
    report = json.loads(r.out)
    assert report["criterion"] == "sparsegpt"
    assert any("criterion sparsegpt" in note for note in report["notes"])


def test_text_calibration_uses_the_folders_tokenizer(cli, llm, tmp_path):
    folder, _ = llm
    text = tmp_path / "calib.txt"
    text.write_text(EXAMPLE_CORPUS)
    out = tmp_path / "o.safetensors"
    r = cli("prune", folder, "--blocks", "4", "--sparsity", "0.5", "--criterion", "wanda", "--calibration", text,
            "--samples", "4", "--seq-len", "32", "-o", out)
    assert r.code == 0, r.err
    assert "(criterion wanda)" in r.out  # the table's title
    # the same folder without its tokenizer.json: text data needs --tokenizer
    bare = tmp_path / "bare"
    shutil.copytree(folder, bare)
    (bare / "tokenizer.json").unlink()
    r = cli("prune", bare, "--blocks", "4", "--sparsity", "0.5", "--criterion", "wanda", "--calibration", text,
            "-o", tmp_path / "p.safetensors")
    assert r.code == 2 and "--tokenizer" in r.err and r.err.count("\n") == 1
    r = cli("prune", bare, "--blocks", "4", "--sparsity", "0.5", "--criterion", "wanda", "--calibration", text,
            "--tokenizer", folder / "tokenizer.json", "--samples", "4", "--seq-len", "32", "-o", tmp_path / "p.safetensors")
    assert r.code == 0, r.err
    a, b = read_packed(out), read_packed(tmp_path / "p.safetensors")  # the folders' recorded files differ
    assert all(torch.equal(a.dense(name), b.dense(name)) for name in a.manifest["tensors"])


def test_recipe_keys_equal_the_command_line(cli, llm, tmp_path):
    folder, ids = llm
    recipe_dir = tmp_path / "recipes"
    recipe_dir.mkdir()
    shutil.copy(ids, recipe_dir / "calib-ids.txt")
    recipe = recipe_dir / "wanda.toml"
    recipe.write_text('[prune]\nsparsity = 0.5\nblocks = 4\ncriterion = "sparsegpt"\ncalibration = "calib-ids.txt"\n'
                      'samples = 6\nseq_len = 24\ndevice = "cpu"\n')
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    assert cli("prune", folder, "--config", recipe, "-o", a).code == 0
    _prune(cli, folder, b, "--criterion", "sparsegpt", "--calibration", recipe_dir / "calib-ids.txt", *CAL)
    assert a.read_bytes() == b.read_bytes()
    # the command line wins over the recipe: --criterion magnitude drops the recipe's calibration keys
    c, d = tmp_path / "c.safetensors", tmp_path / "d.safetensors"
    assert cli("prune", folder, "--config", recipe, "--criterion", "magnitude", "-o", c).code == 0
    _prune(cli, folder, d)
    assert c.read_bytes() == d.read_bytes()


def test_fine_tuning_recipes_refuse_a_calibrated_criterion():
    data = {"prune": {"sparsity": 0.5, "criterion": "wanda", "calibration": "ids.txt"}}
    with pytest.raises(ConfigError, match="only `balprune prune` calibrates"):
        prune_options_from_config(data)
    assert prune_options_from_config({"prune": {"sparsity": 0.5, "criterion": "magnitude"}}).calibration is None


def _fifo(tmp_path: Path) -> Path:
    p = tmp_path / "fifo.txt"
    os.mkfifo(p)
    return p


def _write(tmp_path: Path, name: str, text: str) -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


# (extra arguments, from tmp_path and the ids file; expected exit code; a word the one line holds)
BAD = {
    "no calibration": (lambda t, ids: ["--criterion", "wanda"], 2, "--calibration"),
    "calibration with magnitude": (lambda t, ids: ["--calibration", ids], 2, "--calibration"),
    "samples with magnitude": (lambda t, ids: ["--samples", "8"], 2, "--samples"),
    "unknown criterion": (lambda t, ids: ["--criterion", "obs", "--calibration", ids], 2, "--criterion"),
    "samples 0": (lambda t, ids: ["--criterion", "wanda", "--calibration", ids, "--samples", "0"], 2, "--samples"),
    "seq-len not a number": (lambda t, ids: ["--criterion", "wanda", "--calibration", ids, "--seq-len", "1e3"], 2,
                             "--seq-len"),
    "device tpu": (lambda t, ids: ["--criterion", "wanda", "--calibration", ids, "--device", "tpu"], 2, "--device"),
    "global scope": (lambda t, ids: ["--criterion", "wanda", "--calibration", ids, "-p", "unstructured",
                                     "--scope", "global"], 2, "global"),
    "seq-len over the model's positions": (lambda t, ids: ["--criterion", "wanda", "--calibration", ids,
                                                           "--seq-len", "4096"], 2, "max_position_embeddings"),
    "missing file": (lambda t, ids: ["--criterion", "wanda", "--calibration", t / "nope.txt"], 4, "does not exist"),
    "a FIFO": (lambda t, ids: ["--criterion", "wanda", "--calibration", _fifo(t)], 4, "FIFO"),
    "id outside the vocabulary": (lambda t, ids: ["--criterion", "wanda", "--calibration",
                                                  _write(t, "big.txt", "1 2 3 600 " * 40), *CAL], 4, "600"),
    "too few tokens": (lambda t, ids: ["--criterion", "sparsegpt", "--calibration", _write(t, "few.txt", "1 2 3 4"),
                                       *CAL], 4, "tokens"),
    "output over the calibration file": (lambda t, ids: ["--criterion", "wanda", "--calibration", ids, "-o", ids], 3,
                                         "input"),
    "--key with an HF folder": (lambda t, ids: ["--criterion", "wanda", "--calibration", ids, "--key", "model"], 2,
                                "--key"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_calibration_inputs_one_line_no_output(cli, llm, tmp_path, case):
    folder, ids = llm
    make, code, word = BAD[case]
    extra = [str(a) for a in make(tmp_path, ids)]
    out = tmp_path / "o.safetensors"
    before = _digest(folder, ids)
    args = ["prune", folder, "--sparsity", "0.5", *extra]
    r = cli(*(args if "-o" in extra else [*args, "-o", out]))
    assert r.code == code, r.err
    assert word in r.err and r.err.count("\n") == 1, r.err
    assert not out.exists() and not list(tmp_path.glob(".*balprune-tmp*"))
    assert _digest(folder, ids) == before


def test_calibrated_criteria_need_an_llm_folder(cli, llm, tmp_path):
    folder, ids = llm
    single = tmp_path / "model.safetensors"
    shutil.copy(next(folder.glob("*.safetensors")), single)
    r = cli("prune", single, "--sparsity", "0.5", "--criterion", "wanda", "--calibration", ids,
            "-o", tmp_path / "o.safetensors")
    assert r.code == 2 and "Hugging Face folder" in r.err and r.err.count("\n") == 1
    assert not (tmp_path / "o.safetensors").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_device_cuda_without_a_gpu_is_exit_6(cli, llm, tmp_path):
    folder, ids = llm
    r = cli("prune", folder, "--sparsity", "0.5", "--criterion", "wanda", "--calibration", ids, "--device", "cuda",
            "-o", tmp_path / "o.safetensors")
    assert r.code == 6 and "cuda" in r.err and r.err.count("\n") == 1
    assert not (tmp_path / "o.safetensors").exists()


def test_recipe_values_are_type_checked(cli, llm, tmp_path):
    folder, ids = llm
    for body, word in (('criterion = "obs"', "criterion"), ('criterion = "wanda"\ncalibration = "ids.txt"\n'
                                                             'samples = "8"', "samples"),
                       ('criterion = "wanda"\ncalibration = 3', "calibration")):
        recipe = tmp_path / "r.toml"
        recipe.write_text(f"[prune]\nsparsity = 0.5\n{body}\n")
        r = cli("prune", folder, "--config", recipe, "-o", tmp_path / "o.safetensors")
        assert r.code == 4 and word in r.err and r.err.count("\n") == 1, r.err


def test_bfloat16_folder_keeps_its_dtype(cli, llm, tmp_path):
    from dataclasses import replace

    from balprune.llm.examples import PRESETS, write_hf_folder

    _, ids = llm
    folder = write_hf_folder(replace(PRESETS["llama-tiny"][1], torch_dtype="bfloat16"), tmp_path / "bf16")
    out = tmp_path / "o.safetensors"
    _prune(cli, folder, out, "--criterion", "sparsegpt", "--calibration", ids, *CAL)
    assert cli("verify", out).code == 0
    pf = read_packed(out)
    weight = pf.dense(linear_name(2, "mlp.down_proj"))
    assert weight.dtype == torch.bfloat16 and bool(torch.isfinite(weight.float()).all())
    # wanda keeps stored values: every kept bf16 weight is the folder's own, bit for bit
    out_w = tmp_path / "w.safetensors"
    _prune(cli, folder, out_w, "--criterion", "wanda", "--calibration", ids, *CAL)
    _, ckpt = open_llm(folder)
    for module, _ in LINEARS:
        name = linear_name(1, module)
        got, src = read_packed(out_w).dense(name), ckpt.load(name)
        assert got.dtype == torch.bfloat16 and torch.equal(got, torch.where(got != 0, src, got)), name


def test_nan_weight_in_a_decoder_layer_is_exit_4_naming_it(cli, llm, tmp_path):
    from safetensors.torch import load_file, save_file

    folder, ids = llm
    bad = tmp_path / "bad"
    shutil.copytree(folder, bad)
    shard = next(bad.glob("*.safetensors"))
    tensors = load_file(shard)
    name = linear_name(1, "self_attn.v_proj")
    tensors[name][3, 5] = float("nan")
    save_file(tensors, shard, metadata={"format": "pt"})
    out = tmp_path / "o.safetensors"
    r = cli("prune", bad, "--sparsity", "0.5", "--criterion", "wanda", "--calibration", ids, *CAL, "-o", out)
    assert r.code == 4 and name in r.err and "NaN" in r.err and r.err.count("\n") == 1, r.err
    assert not out.exists() and not list(tmp_path.glob(".*balprune-tmp*"))


def test_calibration_memory_is_checked_before_the_first_layer(llm, monkeypatch):
    from balprune import safeio
    from balprune.config import PruneOptions
    from balprune.errors import InvalidInputError
    from balprune.llm.calibrate import device_bytes, prune_layers
    from balprune.patterns.kinds import BalancedPattern
    from balprune.prune.criteria import Criterion
    from balprune.prune.plan import plan_tensor

    folder, ids = llm
    cfg, ckpt = open_llm(folder)
    plans = {t.name: plan_tensor(t, PruneOptions(BalancedPattern(0.5, blocks=4))) for t in ckpt.tensors}
    windows = calibration_windows(cfg, folder, ids, tokenizer=None, samples=6, seq_len=24, seed=0)
    need = device_bytes(cfg, 6, 24, Criterion.SPARSEGPT)
    monkeypatch.setattr(safeio, "memory_available", lambda: need - 1)
    with pytest.raises(InvalidInputError, match="calibrating on 6 windows of 24 tokens"):
        next(iter(prune_layers(cfg, ckpt, plans, windows, Criterion.SPARSEGPT)))
    monkeypatch.setattr(safeio, "memory_available", lambda: need)
    name, weight = next(iter(prune_layers(cfg, ckpt, plans, windows, Criterion.SPARSEGPT)))
    assert name == linear_name(0, "self_attn.q_proj") and weight.shape == (64, 64)


def test_gpu_memory_shortage_is_exit_7_before_any_layer_is_read(llm, monkeypatch):
    """On a GPU the same check compares the device's free memory and gives exit 7 (README: every GPU memory
    shortage), as eval and generate do; nothing is read from the checkpoint first."""
    from balprune.config import PruneOptions
    from balprune.errors import GpuRuntimeError
    from balprune.llm.calibrate import device_bytes, prune_layers
    from balprune.patterns.kinds import BalancedPattern
    from balprune.prune.criteria import Criterion
    from balprune.prune.plan import plan_tensor

    folder, ids = llm
    cfg, ckpt = open_llm(folder)
    plans = {t.name: plan_tensor(t, PruneOptions(BalancedPattern(0.5, blocks=4))) for t in ckpt.tensors}
    windows = calibration_windows(cfg, folder, ids, tokenizer=None, samples=6, seq_len=24, seed=0)
    need = device_bytes(cfg, 6, 24, Criterion.WANDA, "cuda")
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (need - 1, 10 * need))
    loads = []
    monkeypatch.setattr(type(ckpt), "load", lambda self, name: loads.append(name))
    with pytest.raises(GpuRuntimeError, match="calibrating on 6 windows of 24 tokens on cuda"):
        next(iter(prune_layers(cfg, ckpt, plans, windows, Criterion.WANDA, device="cuda")))
    assert loads == [] and GpuRuntimeError.exit_code == 7


def test_the_memory_estimate_counts_wandas_working_copies_where_they_are_made(llm):
    """wanda scores and masks on the CPU: on --device cpu its copies of the widest matrix count, on a GPU
    only the pruned weight's new copy does (issue 17's device budget)."""
    from balprune.llm.calibrate import device_bytes
    from balprune.prune.criteria import Criterion

    folder, _ = llm
    cfg, _ = open_llm(folder)
    widest = max(cfg.hidden_size * cfg.intermediate_size, cfg.hidden_size * cfg.q_dim)
    assert device_bytes(cfg, 6, 24, Criterion.WANDA, "cpu") - device_bytes(cfg, 6, 24, Criterion.WANDA, "cuda") \
        == 3 * 4 * widest
