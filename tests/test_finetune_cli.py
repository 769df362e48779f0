"""`balprune finetune`: Algorithm 1 end to end, outputs, exact resume, strict recipes, one-line errors."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from helpers import REPO
from test_finetune_tasks import make_image_folder

from balprune.finetune.recipe import load_recipe
from balprune.finetune.run import load_checkpoint, run_finetune
from balprune.formats.packed_file import verify_packed

TINY_DIGITS = """
[task]
name = "digits"
hidden = 64

[train]
seed = 3
batch_size = 32
lr = 0.05
dense_steps = 40
steps_per_stage = 15
finetune_lr = 0.02

[prune]
pattern = "balanced"
sparsity = 0.75
blocks = 4
exclude = ["fc1.*"]

[schedule]
kind = "cubic"
steps = 3
"""


def write_recipe(tmp_path, text=TINY_DIGITS, name="tiny.toml"):
    p = tmp_path / name
    p.write_text(text)
    return p


def _stages(metrics):
    return [{k: v for k, v in s.items() if k != "seconds"} for s in metrics["stages"]]


def test_finetune_digits_end_to_end(cli, tmp_path):
    recipe = write_recipe(tmp_path)
    out = tmp_path / "run"
    r = cli("finetune", recipe, "--out", out, "--device", "cpu")
    assert r.code == 0, r.err
    assert "stage 3/3 sparsity 0.750" in r.err and "accuracy test" in r.out and "packed model" in r.out
    m = json.loads((out / "metrics.json").read_text())
    assert m["schema"] == "balprune.finetune/1" and m["done"] and m["task"] == "digits"
    assert [s["stage"] for s in m["stages"]] == [0, 1, 2, 3]
    assert [s["global_step"] for s in m["stages"]] == [40, 55, 70, 85]
    assert m["stages"][-1]["sparsity"] == 0.75 and m["stages"][-1]["achieved"] == pytest.approx(0.75)
    assert m["stages"][-1]["metrics"]["test"]["accuracy"] > 0.5  # it learned something in 85 steps
    ckpt = load_checkpoint(out / "checkpoint.pt")
    assert ckpt["stage"] == 3
    pf = verify_packed(out / "model.balanced.safetensors")
    for name in ("fc2.weight", "fc3.weight"):
        w = pf.dense(name)
        assert torch.equal(w, ckpt["model"][name])
        # exactly k = 16 * 0.25 = 4 of every block of 16 kept (K = 64, 4 blocks)
        assert (w.reshape(w.shape[0], 4, 16) != 0).sum(-1).eq(4).all()
    assert pf.manifest["tensors"]["fc1.weight"]["pattern"] == "dense"
    assert not list(out.glob(".*balprune-tmp*")), "no temp file left behind"


def test_resume_after_interruption_equals_an_uninterrupted_run(cli, tmp_path):
    recipe = write_recipe(tmp_path)
    full = tmp_path / "full"
    assert cli("finetune", recipe, "--out", full, "--device", "cpu").code == 0

    class Stop(Exception):
        pass

    def interrupt(e):  # stop in the middle of stage 2's fine-tuning
        if e.phase == "train" and e.stage == 2 and e.step == 7:
            raise Stop

    part = tmp_path / "part"
    with pytest.raises(Stop):
        run_finetune(load_recipe(recipe), part, device="cpu", progress=interrupt)
    assert load_checkpoint(part / "checkpoint.pt")["stage"] == 1
    assert not (part / "model.balanced.safetensors").exists()
    r = cli("finetune", recipe, "--out", part, "--resume", "--device", "cpu")
    assert r.code == 0, r.err
    a = json.loads((full / "metrics.json").read_text())
    b = json.loads((part / "metrics.json").read_text())
    assert _stages(a) == _stages(b)  # every metric equal, exactly
    ca, cb = load_checkpoint(full / "checkpoint.pt"), load_checkpoint(part / "checkpoint.pt")
    for name in ca["model"]:
        assert torch.equal(ca["model"][name], cb["model"][name]), name
    assert (full / "model.balanced.safetensors").read_bytes() == (part / "model.balanced.safetensors").read_bytes()


def test_existing_run_needs_resume_or_force(cli, tmp_path):
    recipe = write_recipe(tmp_path)
    out = tmp_path / "run"
    assert cli("finetune", recipe, "--out", out, "--device", "cpu").code == 0
    r = cli("finetune", recipe, "--out", out, "--device", "cpu")
    assert r.code == 5 and "--resume" in r.err and r.err.count("\n") == 1
    r = cli("finetune", recipe, "--out", out, "--resume", "--force")
    assert r.code == 2
    # a different recipe cannot resume this run
    other = write_recipe(tmp_path, TINY_DIGITS.replace("sparsity = 0.75", "sparsity = 0.5"), "other.toml")
    r = cli("finetune", other, "--out", out, "--resume", "--device", "cpu")
    assert r.code == 4 and "different recipe" in r.err
    before = (out / "metrics.json").read_text()
    r = cli("finetune", recipe, "--out", out, "--resume", "--device", "cpu")  # finished: nothing to redo
    assert r.code == 0 and json.loads((out / "metrics.json").read_text())["stages"] == json.loads(before)["stages"]
    assert cli("finetune", other, "--out", out, "--force", "--device", "cpu", "--no-export").code == 0
    assert not (out / "model.balanced.safetensors").exists(), "--force removed the earlier run's outputs"


@pytest.mark.parametrize("edit,needle", [
    (lambda t: t.replace("hidden = 64", "hidden = 64\nwidth = 2"), "unknown key(s) width"),
    (lambda t: t.replace("seed = 3", "seed = 3\nepochs = 2"), "unknown key(s) epochs"),
    (lambda t: t + "\n[optimizer]\nname = 'sgd'\n", "unknown key(s) optimizer"),
    (lambda t: t.replace('name = "digits"', 'name = "mnist"'), "expected one of digits"),
    (lambda t: t.replace("hidden = 64", 'hidden = "64"'), "expected int"),
    (lambda t: t.replace("lr = 0.05", "lr = -1.0"), "must be >= 0"),
    (lambda t: t.replace("batch_size = 32", "batch_size = 0"), "must be >= 1"),
    (lambda t: t.replace("blocks = 4", "blocks = 4\nblock = 3"), "unknown key(s) block"),
    (lambda t: t.replace('[task]\nname = "digits"\nhidden = 64\n', ""), "[task] table"),
    (lambda t: t.replace("sparsity = 0.75", "sparsity = 1.5"), "sparsity"),
    (lambda t: t.replace("lr = 0.05", "lr = 0.05\noptimizer = 'lbfgs'"), "sgd or adam"),
    (lambda t: t + "\nbroken = [", "tiny.toml"),
])
def test_recipe_errors_are_one_line_exit_4(cli, tmp_path, edit, needle):
    recipe = write_recipe(tmp_path, edit(TINY_DIGITS))
    r = cli("finetune", recipe, "--out", tmp_path / "run")
    assert r.code == 4, r
    assert r.err.startswith("balprune: error: ") and r.err.count("\n") == 1 and needle in r.err
    assert not (tmp_path / "run").exists()


def test_bad_options_and_data(cli, tmp_path):
    recipe = write_recipe(tmp_path)
    r = cli("finetune", recipe, "--data", tmp_path, "--out", tmp_path / "r1")
    assert r.code == 2 and "ships its data" in r.err
    r = cli("finetune", recipe, "--device", "tpu", "--out", tmp_path / "r2")
    assert r.code == 2 and "--device" in r.err
    r = cli("finetune", tmp_path / "missing.toml")
    assert r.code == 4 and "does not exist" in r.err
    r = cli("finetune", recipe, "--out", tmp_path / "no" / "such" / "run")
    assert r.code == 5 and "does not exist" in r.err
    if not torch.cuda.is_available():
        r = cli("finetune", recipe, "--device", "cuda", "--out", tmp_path / "r3")
        assert r.code == 6 and "no CUDA device" in r.err
    lm = write_recipe(tmp_path, TINY_DIGITS.replace('name = "digits"\nhidden = 64', 'name = "lstm-lm"\nhidden = 16'),
                      "lm.toml")
    r = cli("finetune", lm, "--data", tmp_path, "--out", tmp_path / "r4")
    assert r.code == 4 and "ptb.train.txt is missing" in r.err
    for d in ("r1", "r2", "r3", "r4"):
        assert not (tmp_path / d).exists(), "nothing is created for a run that cannot start"


def test_finetune_lstm_lm_on_stdlib_text(cli, tmp_path):
    recipe = write_recipe(tmp_path, """
[task]
name = "lstm-lm"
hidden = 32
vocab_size = 200
bptt = 10
max_train_tokens = 5000
max_eval_tokens = 600

[train]
optimizer = "adam"
lr = 0.01
batch_size = 8
dense_steps = 6
steps_per_stage = 3
grad_clip = 1.0

[prune]
pattern = "balanced"
sparsity = 0.75
blocks = 4
exclude = ["embedding.*"]

[schedule]
steps = 2
""", "lm.toml")
    out = tmp_path / "lm"
    r = cli("finetune", recipe, "--out", out, "--device", "cpu", "--json")
    assert r.code == 0, r.err
    m = json.loads(r.out)
    assert m["metric"] == "perplexity" and not m["higher_is_better"]
    ppl = m["stages"][-1]["metrics"]["test"]["perplexity"]
    assert 1 < ppl < 200 * 2
    pf = verify_packed(out / "model.balanced.safetensors")
    assert pf.manifest["tensors"]["lstm.weight_hh_l1"]["pattern"] == "balanced"
    assert pf.manifest["tensors"]["embedding.weight"]["pattern"] == "dense"


def test_finetune_vgg16_on_a_tiny_image_folder(cli, tmp_path):
    root = make_image_folder(tmp_path / "imgs")
    text = (REPO / "configs" / "vgg16-finetune.toml").read_text()
    recipe = load_recipe(REPO / "configs" / "vgg16-finetune.toml")
    assert recipe.task_options["width"] == 1.0  # the shipped recipe is the real VGG-16
    for k, v in {"width = 1.0": "width = 0.0625", "image_size = 224": "image_size = 32",
                 "classifier_hidden = 4096": "classifier_hidden = 64"}.items():
        assert k in text
        text = text.replace(k, v)
    text = text.replace("dense_steps = 2000", "dense_steps = 2").replace("steps_per_stage = 500", "steps_per_stage = 1")
    text = text.replace("batch_size = 64", "batch_size = 4")
    p = write_recipe(tmp_path, text, "vgg.toml")
    out = tmp_path / "vgg"
    r = cli("finetune", p, "--data", root, "--out", out, "--device", "cpu")
    assert r.code == 0, r.err
    m = json.loads((out / "metrics.json").read_text())
    assert list(m["stages"][-1]["metrics"]) == ["val"] and "top5" in m["stages"][-1]["metrics"]["val"]
    pf = verify_packed(out / "model.balanced.safetensors")
    tensors = pf.manifest["tensors"]
    assert tensors["features.0.weight"]["pattern"] == "dense"  # skipped by the recipe's rule
    assert tensors["features.28.weight"]["pattern"] == "balanced"
    assert tensors["classifier.6.weight"]["sparsity_target"] == 0.8


@pytest.mark.parametrize("name", ["digits-balanced.toml", "lstm-lm-finetune.toml", "vgg16-finetune.toml",
                                  "llama-lm-finetune.toml", "llama-lm-criteria.toml"])
def test_shipped_recipes_load(name):
    r = load_recipe(REPO / "configs" / name)
    assert r.options.pattern.sparsity in (0.7, 0.8, 0.875, 0.92)
    assert r.train.steps_per_stage > 0 and r.options.schedule.steps > 1


def test_a_finished_run_can_be_moved_and_resumed(cli, tmp_path):
    recipe = write_recipe(tmp_path)
    assert cli("finetune", recipe, "--out", tmp_path / "a", "--device", "cpu", "--no-export").code == 0
    shutil.move(tmp_path / "a", tmp_path / "b")
    r = cli("finetune", recipe, "--out", tmp_path / "b", "--device", "cpu", "--resume")
    assert r.code == 0 and (tmp_path / "b" / "model.balanced.safetensors").exists()


def test_init_starts_from_a_given_state_dict(cli, tmp_path):
    recipe = write_recipe(tmp_path)
    assert cli("finetune", recipe, "--out", tmp_path / "a", "--device", "cpu", "--no-export").code == 0
    trained = load_checkpoint(tmp_path / "a" / "checkpoint.pt")["model"]
    torch.save(trained, tmp_path / "start.pt")
    text = TINY_DIGITS.replace("dense_steps = 40", 'dense_steps = 0\ninit = "start.pt"')
    r = cli("finetune", write_recipe(tmp_path, text, "init.toml"), "--out", tmp_path / "b", "--device", "cpu",
            "--no-export")
    assert r.code == 0, r.err
    m = json.loads((tmp_path / "b" / "metrics.json").read_text())
    assert m["stages"][0]["steps"] == 0
    from balprune.tasks import TASKS, make_task

    task = make_task(TASKS["digits"], TASKS["digits"].parse_options({"hidden": 64}, "t"), None)
    model = task.build_model()
    model.load_state_dict(trained)
    assert m["stages"][0]["metrics"]["test"] == task.evaluate(model, "test", torch.device("cpu"))
    torch.save({"other.weight": torch.zeros(2, 2)}, tmp_path / "start.pt")
    r = cli("finetune", write_recipe(tmp_path, text, "init.toml"), "--out", tmp_path / "c", "--device", "cpu")
    assert r.code == 4 and "does not fit the task's model" in r.err
    assert not (tmp_path / "c").exists()  # refused before the run folder is made (it was left empty)
    r = cli("sweep", write_recipe(tmp_path, text, "init.toml"), "--out", tmp_path / "s", "--device", "cpu",
            "--no-plot")
    assert r.code == 4 and "does not fit the task's model" in r.err and not (tmp_path / "s").exists()
    r = cli("finetune", write_recipe(tmp_path, text.replace("start.pt", "nowhere.pt"), "init.toml"),
            "--out", tmp_path / "d")
    assert r.code == 4 and "nowhere.pt does not exist" in r.err


def test_sigint_mid_stage_exits_130_and_keeps_the_last_stage_checkpoint(tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    recipe = write_recipe(tmp_path, TINY_DIGITS.replace("steps_per_stage = 15", "steps_per_stage = 200000"))
    out = tmp_path / "run"
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"))
    proc = subprocess.Popen([sys.executable, "-m", "balprune", "finetune", str(recipe), "--out", str(out),
                             "--device", "cpu"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.time() + 120
    while not (out / "checkpoint.pt").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.1)
    time.sleep(0.5)  # well inside stage 1's 200000 steps
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    lines = err.strip().splitlines()
    assert sum(line.startswith("balprune: error:") for line in lines) == 1
    assert lines[-1].startswith("balprune: error: interrupted by SIGINT") and "--resume" in lines[-1]
    assert not list(out.glob(".*balprune-tmp*")) and not (out / "model.balanced.safetensors").exists()
    ckpt = load_checkpoint(out / "checkpoint.pt")
    assert ckpt["stage"] == 0
    assert json.loads((out / "metrics.json").read_text())["done"] is False


@pytest.mark.parametrize("edit", [
    lambda s: s.update(stage="1"),
    lambda s: s.update(global_step=-5),
    lambda s: s.pop("optimizer"),
    lambda s: s.update(history=json.dumps([{"stage": "0"}])),
    lambda s: s.update(history="[" * 500 + "]" * 500),
    lambda s: s["model"].update({next(iter(s["model"])): torch.zeros(3)}),
], ids=["stage-str", "negative-step", "no-optimizer", "history-fields", "history-nesting", "misshaped-weight"])
def test_a_damaged_checkpoint_is_refused_on_resume(cli, tmp_path, edit):
    """--resume of a checkpoint.pt whose fields are missing, mistyped or do not fit the model: one line,
    exit 4, the checkpoint unchanged (never a KeyError / TypeError / size mismatch as exit 70)."""
    recipe = write_recipe(tmp_path)
    out = tmp_path / "run"
    assert cli("finetune", recipe, "--out", out, "--device", "cpu", "--no-export").code == 0
    ckpt = out / "checkpoint.pt"
    state = torch.load(ckpt, weights_only=True)
    edit(state)
    torch.save(state, ckpt)
    before = ckpt.read_bytes()
    r = cli("finetune", recipe, "--out", out, "--resume", "--device", "cpu")
    assert r.code == 4 and r.err.startswith("balprune: error: ") and r.err.count("\n") == 1, r
    assert ckpt.read_bytes() == before
