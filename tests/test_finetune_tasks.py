"""Built-in tasks on real data, nothing downloaded: digits (shipped), lstm-lm (PTB files / stdlib), vgg16 (ImageFolder)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from helpers import REPO

from balprune.errors import InvalidInputError, UsageError
from balprune.tasks import TASKS, make_task
from balprune.tasks.digits import load_digits
from balprune.tasks.lstm_lm import build_vocab, stdlib_corpus, tokenize_line


def _task(name, data=None, **options):
    spec = TASKS[name]
    return make_task(spec, spec.parse_options(options, f"[task] {name}"), data)


def test_digits_are_the_real_uci_images():
    x, y = load_digits()
    assert x.shape == (1797, 64) and x.dtype == torch.float32 and y.shape == (1797,)
    assert float(x.min()) == 0.0 and float(x.max()) == 1.0
    assert torch.bincount(y).tolist() == [178, 182, 177, 183, 181, 182, 181, 179, 174, 180]
    # the first image of the file is a zero: 0,0,5,13,9,1,0,0 / 0,0,13,15,10,15,5,0 ...
    assert (x[0, :16] * 16).round().int().tolist() == [0, 0, 5, 13, 9, 1, 0, 0, 0, 0, 13, 15, 10, 15, 5, 0]
    assert int(y[0]) == 0


def test_digits_splits_are_disjoint_and_fixed():
    a, b = _task("digits", hidden=16), _task("digits", hidden=16)
    sizes = {k: len(v[1]) for k, v in a.data.items()}
    assert sizes == {"train": 1257, "valid": 180, "test": 360}
    for k in a.data:
        assert torch.equal(a.data[k][0], b.data[k][0])
    rows = {tuple(r.tolist()) for r in a.data["test"][0]}
    # (a few digit images are duplicated in the data set itself; nearly all test images are unseen)
    assert sum(tuple(r.tolist()) in rows for r in a.data["train"][0]) < 10


def test_digits_refuses_data(tmp_path):
    with pytest.raises(UsageError, match="ships its data"):
        _task("digits", data=tmp_path)


@pytest.mark.slow
def test_digits_data_ships_in_the_wheel_and_loads_from_an_installed_copy(tmp_path):
    wheels = tmp_path / "wheels"
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                            str(REPO), "-w", str(wheels)], capture_output=True, text=True)
    if build.returncode != 0 and "hatchling" in build.stderr:
        pytest.skip("hatchling is not installed (it is in the dev extra)")
    assert build.returncode == 0, build.stderr[-2000:]
    (wheel,) = wheels.glob("balprune-*.whl")
    site = tmp_path / "site"
    inst = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site), str(wheel)],
                          capture_output=True, text=True)
    assert inst.returncode == 0, inst.stderr[-2000:]
    code = ("import importlib.resources as r, balprune, balprune.tasks.digits as d; x, y = d.load_digits(); "
            "print(balprune.__file__); print(x.shape[0], int(y.sum())); "
            "print(r.files('balprune').joinpath('data', 'LICENSE-digits').read_text().count('BSD 3-Clause'))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path,
                       env={"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin"})
    assert r.returncode == 0, r.stderr[-2000:]
    where, counts, license_ = r.stdout.split("\n")[:3]
    assert where.startswith(str(site)), "imported from the installed wheel, not the source tree"
    assert counts == f"1797 {int(load_digits()[1].sum())}" and license_ == "1"


def test_tokenizer_and_vocabulary_are_simple_and_deterministic():
    assert tokenize_line("x = foo(12, 'a')  # 3.5") == ["x", "=", "foo", "(", "N", ",", "'", "a", "'", ")", "#", "N"]
    assert tokenize_line("   ") == []
    assert build_vocab(["b", "a", "b", "c", "a", "<unk>", "d"], 3) == ["a", "b", "<unk>"]


def test_stdlib_corpus_is_capped_and_reproducible():
    a, src = stdlib_corpus(3000, 500)
    b, _ = stdlib_corpus(3000, 500)
    assert a == b and "standard library" in src
    assert {k: len(v) for k, v in a.items()} == {"train": 3000, "valid": 500, "test": 500}
    assert a["train"] != a["valid"][:500] and "<eos>" in a["train"]


def test_lstm_lm_reads_ptb_format_files(tmp_path):
    words = "the cat sat on the mat".split()
    for split in ("train", "valid", "test"):
        (tmp_path / f"ptb.{split}.txt").write_text("\n".join(" ".join(words[i:] + words[:i]) for i in range(6)) + "\n")
    task = _task("lstm-lm", data=tmp_path, hidden=8, bptt=4, vocab_size=4)
    assert task.vocab == ["the", "<eos>", "cat", "<unk>"]
    assert len(task.ids["train"]) == 6 * 7 and "PTB" in task.describe()["data"]
    (tmp_path / "ptb.test.txt").unlink()
    with pytest.raises(InvalidInputError, match="ptb.test.txt is missing"):
        _task("lstm-lm", data=tmp_path, hidden=8, bptt=4)


def test_lstm_lm_trains_on_stdlib_text():
    task = _task("lstm-lm", hidden=32, bptt=12, vocab_size=300, max_train_tokens=20000, max_eval_tokens=2000)
    torch.manual_seed(0)
    model = task.build_model()
    names = dict(model.named_parameters())
    assert {"embedding.weight", "lstm.weight_ih_l0", "lstm.weight_hh_l1", "decoder.weight"} <= set(names)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    before = task.evaluate(model, "valid", torch.device("cpu"))["perplexity"]
    g = torch.Generator().manual_seed(0)
    for _ in range(40):
        loss = task.loss(model, task.batch(g, 16), torch.device("cpu"))
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = task.evaluate(model, "valid", torch.device("cpu"))["perplexity"]
    assert after < 0.5 * before, (before, after)


def test_vgg16_full_size_matches_torchvision_names_and_shapes():
    from balprune.tasks.vgg16 import build_vgg16
    from balprune.vision import torchvision

    with torch.device("meta"):
        ours = build_vgg16(1000, 1.0, 4096, 224)
        ref = torchvision().models.vgg16(weights=None)
    assert [(k, v.shape) for k, v in ours.state_dict().items()] == [(k, v.shape) for k, v in ref.state_dict().items()]
    with torch.device("meta"):
        small = build_vgg16(3, 0.0625, 16, 32)
    sd = small.state_dict()
    assert sd["features.0.weight"].shape == (4, 3, 3, 3) and sd["classifier.6.weight"].shape == (3, 16)
    assert set(k for k in sd if k.startswith("classifier")) == {f"classifier.{i}.{w}" for i in (0, 3, 6)
                                                                for w in ("weight", "bias")}


def make_image_folder(root, classes=("cat", "dog", "fox"), per_class=(4, 2), size=20):
    """A tiny ImageFolder (train/ and val/) of random-coloured PNGs, class-dependent tint."""
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    for split, n in zip(("train", "val"), per_class):
        for c, name in enumerate(classes):
            (root / split / name).mkdir(parents=True)
            for i in range(n):
                px = (torch.rand(size, size, 3, generator=g) * 128).to(torch.uint8)
                px[..., c % 3] += 100
                Image.fromarray(px.numpy()).save(root / split / name / f"{i}.png")
    return root


def test_vgg16_task_reads_an_image_folder(tmp_path):
    root = make_image_folder(tmp_path / "imgs")
    task = _task("vgg16", data=root, width=0.0625, image_size=32, classifier_hidden=16)
    x, y = task.batch(torch.Generator().manual_seed(0), 5)
    assert x.shape == (5, 3, 32, 32) and y.max() < 3
    torch.manual_seed(0)
    model = task.build_model()
    res = task.evaluate(model, "val", torch.device("cpu"))
    assert set(res) == {"accuracy", "top5", "loss"} and res["top5"] == 1.0  # 3 classes: top-5 holds all
    with pytest.raises(InvalidInputError, match="no train/ folder"):
        _task("vgg16", data=tmp_path / "imgs" / "train", width=0.0625, image_size=32)
    import shutil

    shutil.rmtree(root / "val")
    with pytest.raises(InvalidInputError, match="no val/ folder"):
        _task("vgg16", data=root, width=0.0625, image_size=32)
    with pytest.raises(UsageError, match="--data is required"):
        _task("vgg16")
