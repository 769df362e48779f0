"""Task `llama-lm`: a small Llama-family LM with its own BPE tokenizer, trained, pruned, exported as an HF folder.

Everything runs on a tiny configuration (2 layers, hidden 64, windows of 32 tokens, a few dozen
training steps on a slice of the standard library's sources).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import subprocess
import sys

import pytest
import torch
from helpers import REPO, transformers_or_skip

from balprune.errors import ConfigError, InvalidInputError, OutputError
from balprune.finetune.recipe import load_recipe
from balprune.finetune.run import load_checkpoint
from balprune.formats.packed_file import verify_packed
from balprune.llm.family import expected_tensors, open_llm
from balprune.llm.reference import ReferenceLM
from balprune.llm.text import SPECIAL_TOKENS
from balprune.tasks import TASKS, make_task
from balprune.tasks.llama_lm import export_run, train_tokenizer

TINY = dict(layers=2, hidden=64, heads=4, kv_heads=2, seq_len=32, vocab_size=400, max_train_chars=40000,
            max_eval_chars=6000, eval_batch_size=64)
CPU = torch.device("cpu")


def _task(data=None, **options):
    spec = TASKS["llama-lm"]
    return make_task(spec, spec.parse_options({**TINY, **options}, "[task] llama-lm"), data)


@pytest.fixture(scope="module")
def task():
    return _task()


def _train(task, seed, steps=40, lr=3e-3):
    torch.manual_seed(seed)
    model = task.build_model()
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    g = torch.Generator().manual_seed(seed)
    losses = []
    for _ in range(steps):
        loss = task.loss(model, task.batch(g, 16), CPU)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return model, losses


@pytest.fixture(scope="module")
def trained(task):
    return _train(task, seed=0)


# --------------------------------------------------------------------------- tokenizer and data


_TOKENIZER_SCRIPT = """
import hashlib, sys
from balprune.tasks.llama_lm import train_tokenizer
docs = [open(p, encoding="utf-8").read() for p in sys.argv[1:]]
print(hashlib.sha256(train_tokenizer(docs, 600).to_str().encode()).hexdigest())
"""


def test_tokenizer_json_is_byte_identical_across_runs_processes_and_threads():
    import string
    import textwrap

    paths = [textwrap.__file__, string.__file__]
    docs = [open(p, encoding="utf-8").read() for p in paths]
    digest = hashlib.sha256(train_tokenizer(docs, 600).to_str().encode()).hexdigest()
    assert hashlib.sha256(train_tokenizer(docs, 600).to_str().encode()).hexdigest() == digest
    # another process: another hash-map seed, one worker thread instead of several
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"), PYTHONHASHSEED="7", RAYON_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-c", _TOKENIZER_SCRIPT, *paths], capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip() == digest
    # and the vocabulary is what the options ask: 256 bytes, the 3 special tokens at ids 0-2, merges
    tok = train_tokenizer(docs, 600)
    assert tok.get_vocab_size() == 600
    assert [tok.token_to_id(t) for t in SPECIAL_TOKENS] == [0, 1, 2]
    assert hashlib.sha256(train_tokenizer(docs, 601).to_str().encode()).hexdigest() != digest


def test_task_data_is_deterministic_and_split_by_file(task):
    again = _task()
    assert again.tokenizer_json == task.tokenizer_json and again.data_id() == task.data_id()
    for split in ("train", "valid", "test"):
        assert torch.equal(again.ids[split], task.ids[split])
    d = task.describe()
    assert "standard library" in d["data"] and d["vocab"] == 400 and d["intermediate"] == 192  # 8/3*64 -> 192
    assert int(task.ids["train"].max()) < 400 and int(task.ids["train"].min()) >= 0
    # every document (file) is <s> ... </s>
    assert task.ids["train"][0] == 1 and task.ids["valid"][-1] == 2
    assert (task.ids["train"] == 1).sum() == (task.ids["train"] == 2).sum() >= 2
    # the splits are different files: the valid text is not a slice of the training text
    v = task.ids["valid"][:64]
    t = task.ids["train"].unfold(0, 64, 1)
    assert not (t == v).all(dim=1).any()
    assert task.windows("valid").shape == (len(task.ids["valid"]) // 32, 32)


def test_text_files_given_with_data(tmp_path):
    import string

    text = open(string.__file__, encoding="utf-8").read()
    for split, part in (("train", text), ("valid", text[:3000]), ("test", text[3000:6000])):
        (tmp_path / f"wiki.{split}.tokens").write_text(part)
    task = _task(data=tmp_path, vocab_size=300)
    assert "wiki.train.tokens" in task.describe()["data"] and task.config.vocab_size == 300
    (tmp_path / "wiki.test.tokens").unlink()
    with pytest.raises(InvalidInputError, match="wiki.test.tokens is missing"):
        _task(data=tmp_path)
    (tmp_path / "wiki.test.tokens").write_bytes(b"caf\xe9 au lait\n" * 100)
    with pytest.raises(InvalidInputError, match="not UTF-8 text"):
        _task(data=tmp_path)
    os.unlink(tmp_path / "wiki.test.tokens")
    os.mkfifo(tmp_path / "wiki.test.tokens")  # refused before any read (no hang)
    with pytest.raises(InvalidInputError, match="FIFO"):
        _task(data=tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(InvalidInputError, match="no text to read"):
        _task(data=tmp_path / "empty")
    (tmp_path / "short").mkdir()
    for split in ("train", "valid", "test"):
        (tmp_path / "short" / f"ptb.{split}.txt").write_text(text if split == "train" else " a b\n")
    with pytest.raises(InvalidInputError, match="fewer than seq_len"):
        _task(data=tmp_path / "short")


def test_options_are_bounded_and_must_build_a_llama_model():
    spec = TASKS["llama-lm"]
    with pytest.raises(ConfigError, match="hidden: must be at most 8192"):
        spec.parse_options({"hidden": 1 << 20}, "[task]")
    with pytest.raises(ConfigError, match="vocab_size: must be >= 259"):
        spec.parse_options({"vocab_size": 100}, "[task]")
    with pytest.raises(ConfigError, match="seq_len: must be at most 4096"):
        spec.parse_options({"seq_len": 1 << 16}, "[task]")
    with pytest.raises(ConfigError, match="heads: 3 must divide hidden"):
        spec.model_params(spec.parse_options({"heads": 3}, "[task]"))
    with pytest.raises(ConfigError, match="kv_heads: 3 must divide heads"):
        spec.model_params(spec.parse_options({"heads": 4, "kv_heads": 3}, "[task]"))
    with pytest.raises(ConfigError, match="must be even"):
        spec.model_params(spec.parse_options({"hidden": 24, "heads": 8}, "[task]"))


# --------------------------------------------------------------------------- model, training, evaluation


def test_model_carries_the_hf_names_of_its_config(task):
    model = task.build_model()
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == expected_tensors(task.config)
    assert "model.layers.1.self_attn.k_proj.weight" in dict(model.named_parameters())
    assert task.config.num_key_value_heads == 2 and task.config.model_type == "llama"
    assert all(p.requires_grad for p in model.parameters())
    tied = _task(tie_embeddings=True).build_model()
    assert tied.lm_head.weight is tied.model.embed_tokens.weight


def test_training_lowers_the_loss_and_perplexity_is_exp_of_the_mean_cross_entropy(task, trained):
    torch.manual_seed(0)
    untrained = task.build_model()
    before = task.evaluate(untrained, "valid", CPU)
    model, losses = trained
    after = task.evaluate(model, "valid", CPU)
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 1.0, losses
    assert after["perplexity"] < 0.5 * before["perplexity"], (before, after)
    # an untrained model is near-uniform: perplexity close to the vocabulary size
    assert 0.8 * 400 < before["perplexity"] < 1.25 * 400
    # independently: non-overlapping windows of 32 tokens, log-softmax in float64, next-token NLL
    ids = task.ids["valid"]
    n = len(ids) // 32
    windows = ids[: n * 32].reshape(n, 32)
    with torch.no_grad():
        logp = torch.log_softmax(model(windows).double(), dim=-1)
    nll = -logp[:, :-1].gather(-1, windows[:, 1:, None]).squeeze(-1)
    assert after["loss"] == pytest.approx(float(nll.mean()), rel=1e-6)
    assert after["perplexity"] == pytest.approx(math.exp(float(nll.mean())), rel=1e-6)
    assert math.isfinite(task.evaluate(model, "test", CPU)["perplexity"])


def test_same_seed_gives_the_same_weights(task, trained):
    model, losses = trained
    again, losses_again = _train(task, seed=0)
    other, _ = _train(task, seed=1, steps=2)
    assert losses == losses_again
    a, b, c = model.state_dict(), again.state_dict(), other.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["model.layers.0.mlp.up_proj.weight"], c["model.layers.0.mlp.up_proj.weight"])


# --------------------------------------------------------------------------- HF folder export


def _assert_same_logits(folder, model, windows):
    cfg, ckpt = open_llm(folder)
    assert cfg.model_type == "llama" and cfg.num_hidden_layers == 2
    ref = ReferenceLM.from_folder(folder)
    with torch.no_grad():
        assert torch.equal(ref(windows), model(windows))


def test_export_writes_an_hf_folder_that_open_llm_and_prune_read(cli, task, trained, tmp_path):
    from safetensors import safe_open

    model, _ = trained
    out = tmp_path / "hf"
    assert task.export_hf_folder(model, out) == out
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model-00001-of-00001.safetensors",
                                                     "model.safetensors.index.json", "tokenizer.json"]
    assert not list(tmp_path.glob(".*balprune-tmp*")), "no staging folder left behind"
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "llama" and config["vocab_size"] == 400 and config["eos_token_id"] == 2
    with safe_open(out / "model-00001-of-00001.safetensors", "pt") as f:
        assert f.metadata()["format"] == "pt"
    assert (out / "tokenizer.json").read_bytes() == task.tokenizer_json
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    assert tok.id_to_token(2) == "</s>" and tok.decode(tok.encode("def f(x):\n").ids) == "def f(x):\n"
    _assert_same_logits(out, model, task.windows("valid")[:4])
    # an existing folder is kept unless force; force replaces the files
    with pytest.raises(OutputError, match="not empty"):
        task.export_hf_folder(model, out)
    task.export_hf_folder(model, out, force=True)
    _assert_same_logits(out, model, task.windows("valid")[:4])
    # `balprune eval` on the folder, over the same ids and windows, reports the task's own metric
    ids = tmp_path / "valid.ids"
    ids.write_text(" ".join(map(str, task.ids["valid"].tolist())))
    r = cli("eval", out, "--data", ids, "--seq-len", "32", "--json")
    assert r.code == 0, r.err
    ev, mine = json.loads(r.out), task.evaluate(model, "valid", CPU)
    assert ev["windows"] == len(task.windows("valid")) and ev["nll_mean"] == pytest.approx(mine["loss"], rel=1e-6)
    r = cli("prune", out, "--block-size", "16", "--sparsity", "0.5", "--include", "model.layers.*",
            "-o", tmp_path / "p.safetensors", "--json")
    assert r.code == 0, r.err
    pf = verify_packed(tmp_path / "p.safetensors")
    assert pf.manifest["tensors"]["model.layers.1.mlp.down_proj.weight"]["pattern"] == "balanced"


def test_export_of_a_tied_model_loads_in_transformers(tmp_path):
    task = _task(tie_embeddings=True)
    model, _ = _train(task, seed=0, steps=3)
    task.export_hf_folder(model, tmp_path / "hf")
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["tie_word_embeddings"] is True
    windows = task.windows("test")[:2]
    _assert_same_logits(tmp_path / "hf", model, windows)
    transformers = transformers_or_skip()
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", attn_implementation="eager")
    tok = transformers.PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "hf" / "tokenizer.json"))
    with torch.no_grad():
        torch.testing.assert_close(hf(windows).logits, model(windows), rtol=1e-5, atol=1e-5)
    from tokenizers import Tokenizer

    assert tok("import os\n")["input_ids"] == Tokenizer.from_str(task.tokenizer_json.decode()).encode("import os\n").ids


# --------------------------------------------------------------------------- finetune / sweep / sensitivity


def tiny_recipe(tmp_path):
    """The shipped recipe, shrunk: same task, pattern and pruned layers, a CPU-sized model and budget."""
    text = (REPO / "configs" / "llama-lm-finetune.toml").read_text()
    shipped = load_recipe(REPO / "configs" / "llama-lm-finetune.toml")
    assert shipped.task.name == "llama-lm" and shipped.task_options["hidden"] == 256
    for k, v in {"layers = 4": "layers = 2", "hidden = 256": "hidden = 64", "seq_len = 128": "seq_len = 32",
                 "vocab_size = 4096": "vocab_size = 400", "max_train_chars = 8000000": "max_train_chars = 40000",
                 "max_eval_chars = 400000": "max_eval_chars = 6000", "lr = 0.001": "lr = 0.003",
                 "batch_size = 32": "batch_size = 16", "dense_steps = 5000": "dense_steps = 30",
                 "steps_per_stage = 500": "steps_per_stage = 5", "block_size = 32": "block_size = 16",
                 "steps = 4": "steps = 2"}.items():
        assert k in text, k
        text = text.replace(k, v, 1)
    p = tmp_path / "llama.toml"
    p.write_text(text)
    return p


def test_finetune_sweep_and_sensitivity_through_the_cli(cli, tmp_path):
    recipe = tiny_recipe(tmp_path)
    run = tmp_path / "run"
    r = cli("finetune", recipe, "--out", run, "--device", "cpu")
    assert r.code == 0, r.err
    m = json.loads((run / "metrics.json").read_text())
    assert m["task"] == "llama-lm" and m["metric"] == "perplexity" and m["done"]
    dense_ppl = m["stages"][0]["metrics"]["test"]["perplexity"]
    assert math.isfinite(dense_ppl) and dense_ppl < 400  # better than uniform after 30 steps
    pf = verify_packed(run / "model.balanced.safetensors")
    tensors = pf.manifest["tensors"]
    assert tensors["model.embed_tokens.weight"]["pattern"] == "dense" and tensors["lm_head.weight"]["pattern"] == "dense"
    ckpt = load_checkpoint(run / "checkpoint.pt")["model"]
    for name in ("model.layers.0.self_attn.q_proj.weight", "model.layers.1.self_attn.k_proj.weight",
                 "model.layers.1.mlp.down_proj.weight"):
        assert tensors[name]["pattern"] == "balanced"
        w = pf.dense(name)
        assert torch.equal(w, ckpt[name])
        rows, cols = w.shape
        # 70% of blocks of 16: k = floor(0.3 * 16 + 1/2) = 5 kept in every block of every row
        assert (w.reshape(rows, cols // 16, 16) != 0).sum(-1).eq(5).all(), name

    # the trained run as an HF folder: its logits are the checkpoint's model's
    task = _task(**{k: v for k, v in load_recipe(recipe).task_options.items()})
    hf = export_run(recipe, run / "checkpoint.pt", tmp_path / "hf")
    model = task.build_model()
    model.load_state_dict(ckpt)
    _assert_same_logits(hf, model, task.windows("valid")[:2])
    # the run's packed file carries config.json and tokenizer.json: unpack gives the same folder's model
    r = cli("unpack", run / "model.balanced.safetensors", "--hf-folder", tmp_path / "hf-unpacked")
    assert r.code == 0, r.err
    assert (tmp_path / "hf-unpacked" / "tokenizer.json").read_bytes() == (hf / "tokenizer.json").read_bytes()
    assert (tmp_path / "hf-unpacked" / "config.json").read_bytes() == (hf / "config.json").read_bytes()
    _assert_same_logits(tmp_path / "hf-unpacked", model, task.windows("valid")[:2])
    with pytest.raises(InvalidInputError, match="not a readable fine-tuning checkpoint|not a balprune"):
        export_run(recipe, run / "metrics.json", tmp_path / "hf2")
    assert not (tmp_path / "hf2").exists()

    sweep = tmp_path / "sweep"
    r = cli("sweep", recipe, "--patterns", "balanced,unstructured", "--sparsities", "0.5", "--out", sweep,
            "--no-plot", "--device", "cpu", "--json")
    assert r.code == 0, r.err
    s = json.loads((sweep / "sweep.json").read_text())
    assert s["task"] == "llama-lm" and len(s["points"]) == 2
    assert all(math.isfinite(p["value"]) for p in s["points"])

    plan = tmp_path / "plan.toml"
    r = cli("sensitivity", recipe, "--dense", sweep / "dense.pt", "--sparsities", "0.5", "-o", plan,
            "--json", tmp_path / "sens.json")
    assert r.code == 0, r.err
    layers = json.loads((tmp_path / "sens.json").read_text())["layers"]
    assert len(layers) == 2 * 7 and all(x["name"].startswith("model.layers.") for x in layers)
