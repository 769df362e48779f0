"""``balprune eval``: perplexity of an HF folder, an unpacked file and a packed file, checked against a direct
computation from ReferenceLM logits, against transformers' loss, and against the uniform-prediction
bound; every hostile data / tokenizer / option case through the real CLI with the refusal contract
(one line, the documented exit code, inputs unchanged, nothing written)."""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import assert_refused, listing, run_subprocess, small_state_dict, transformers_or_skip

from balprune.checkpoint import open_checkpoint
from balprune.llm.examples import PRESETS, random_tensor, write_example, write_hf_folder
from balprune.llm.family import read_config
from balprune.llm.reference import ReferenceLM
from balprune.llm.text import EXAMPLE_CORPUS, load_tokenizer
from balprune.save import save_state_dict

TINY = PRESETS["llama-tiny"][1]
TIMEOUT = 120  # seconds: far above a refusal, far below a hang
SEQ = 64


@pytest.fixture(scope="module")
def tiny_src(tmp_path_factory) -> Path:
    return write_example("llama-tiny", tmp_path_factory.mktemp("src") / "tiny")


@pytest.fixture
def tiny(tmp_path, tiny_src) -> Path:
    """A private copy of the llama-tiny example folder (config, one shard, index, tokenizer.json)."""
    return Path(shutil.copytree(tiny_src, tmp_path / "tiny"))


@pytest.fixture
def corpus(tmp_path) -> Path:
    p = tmp_path / "corpus.txt"
    p.write_text(EXAMPLE_CORPUS * 2)
    return p


def _eval_json(cli, *args) -> dict:
    r = cli("eval", *map(str, args), "--json")
    assert r.code == 0, r.err
    out = json.loads(r.out)
    assert out["schema"] == "balprune.eval/1"
    return out


def _direct_nll(lm: ReferenceLM, ids: torch.Tensor, seq_len: int) -> tuple[float, int]:
    """Mean next-token NLL over consecutive windows, from the reference logits: log-softmax in float64 and the
    target's log-probability gathered by hand (independent of eval's cross_entropy path)."""
    windows = len(ids) // seq_len
    total = 0.0
    for k in range(windows):
        w = ids[k * seq_len:(k + 1) * seq_len]
        logp = lm(w[None])[0].double().log_softmax(-1)
        total -= float(logp[torch.arange(seq_len - 1), w[1:]].sum())
    return total / (windows * (seq_len - 1)), windows




# --------------------------------------------------------------------------- the figure is right


def test_eval_equals_exp_of_cross_entropy_from_reference_logits(cli, tiny, corpus):
    res = _eval_json(cli, tiny, "--data", corpus, "--seq-len", SEQ)
    ids = torch.tensor(load_tokenizer(tiny).encode(corpus.read_text()).ids)
    nll, windows = _direct_nll(ReferenceLM.from_folder(tiny), ids, SEQ)
    assert res["windows"] == windows == len(ids) // SEQ >= 5
    assert res["tokens"] == windows * SEQ and res["predictions"] == windows * (SEQ - 1) and res["seq_len"] == SEQ
    assert res["nll_mean"] == pytest.approx(nll, rel=1e-6)
    assert res["perplexity"] == pytest.approx(math.exp(nll), rel=1e-6)
    assert res["data_sha256"] == hashlib.sha256(corpus.read_bytes()).hexdigest()
    assert (res["model"], res["data"], res["dtype"], res["device"]) == (str(tiny), str(corpus), "float32", "cpu")
    # --max-tokens keeps the first N tokens: three windows
    short = _eval_json(cli, tiny, "--data", corpus, "--seq-len", SEQ, "--max-tokens", 3 * SEQ + 5)
    nll3, _ = _direct_nll(ReferenceLM.from_folder(tiny), ids[:3 * SEQ], SEQ)
    assert short["windows"] == 3 and short["nll_mean"] == pytest.approx(nll3, rel=1e-6)


def test_ids_text_npy_and_text_give_the_same_figure(cli, tiny, corpus, tmp_path):
    ids = load_tokenizer(tiny).encode(corpus.read_text()).ids
    (tmp_path / "c.ids").write_text("\n".join(map(str, ids)))
    np.save(tmp_path / "c.npy", np.array(ids, dtype=np.uint16))
    figures = {json.dumps({k: v for k, v in _eval_json(cli, tiny, "--data", d, "--seq-len", SEQ).items()
                           if k not in ("data", "data_sha256")})
               for d in (corpus, tmp_path / "c.ids", tmp_path / "c.npy")}
    assert len(figures) == 1


def test_plain_output_line_and_determinism(cli, tiny, corpus):
    a = cli("eval", str(tiny), "--data", str(corpus), "--seq-len", str(SEQ))
    b = cli("eval", str(tiny), "--data", str(corpus), "--seq-len", str(SEQ))
    assert a.code == b.code == 0 and a.out == b.out and a.err == b.err == ""
    res = _eval_json(cli, tiny, "--data", corpus, "--seq-len", SEQ)
    assert a.out.strip() == (f"perplexity {res['perplexity']:.4f} over {res['tokens']} tokens "
                             f"({res['windows']} windows of {SEQ})")


def test_near_uniform_head_gives_the_vocabulary_size_and_a_sharp_wrong_one_more(cli, tmp_path):
    """lm_head scaled to ~0: every logit ~equal, perplexity = vocab size. Scaled up: confident random
    predictions, far worse than uniform. Both fail if the loss is not a log-softmax of the right logits."""
    cfg = replace(TINY, tie_word_embeddings=False)
    ids = torch.randint(0, cfg.vocab_size, (20 * SEQ,), generator=torch.Generator().manual_seed(0))
    data = tmp_path / "ids.npy"
    np.save(data, ids.numpy().astype(np.int32))

    def scaled(factor):
        return lambda n, s, d: random_tensor(n, s, d, 0) * (factor if n == "lm_head.weight" else 1)

    flat = write_hf_folder(cfg, tmp_path / "flat", tensor_fn=scaled(1e-4))
    sharp = write_hf_folder(cfg, tmp_path / "sharp", tensor_fn=scaled(200.0))
    ppl_flat = _eval_json(cli, flat, "--data", data, "--seq-len", SEQ)["perplexity"]
    ppl_sharp = _eval_json(cli, sharp, "--data", data, "--seq-len", SEQ)["perplexity"]
    assert abs(ppl_flat / cfg.vocab_size - 1) < 1e-4, ppl_flat
    assert ppl_sharp > 3 * cfg.vocab_size, ppl_sharp


def test_nll_equals_transformers_loss(cli, tiny, corpus):
    tf = transformers_or_skip()
    res = _eval_json(cli, tiny, "--data", corpus, "--seq-len", SEQ)
    ids = torch.tensor(load_tokenizer(tiny).encode(corpus.read_text()).ids)
    model = tf.AutoModelForCausalLM.from_pretrained(tiny, attn_implementation="eager", dtype=torch.float32).eval()
    windows = ids[: res["windows"] * SEQ].view(-1, SEQ)
    with torch.no_grad():
        losses = [float(model(input_ids=w[None], labels=w[None]).loss) for w in windows]
    assert res["nll_mean"] == pytest.approx(sum(losses) / len(losses), rel=1e-4)


def test_packed_and_unpacked_files_with_like(cli, tiny, corpus, tmp_path):
    packed, dense = tmp_path / "p.safetensors", tmp_path / "d.safetensors"
    assert cli("prune", str(tiny), "--sparsity", "0.5", "--blocks", "4", "-o", str(packed), "--json").code == 0
    assert cli("unpack", str(packed), "-o", str(dense)).code == 0
    a = _eval_json(cli, packed, "--like", tiny, "--data", corpus, "--seq-len", SEQ)
    b = _eval_json(cli, dense, "--like", tiny, "--data", corpus, "--seq-len", SEQ)
    full = _eval_json(cli, tiny, "--data", corpus, "--seq-len", SEQ)
    assert {k: v for k, v in a.items() if k != "model"} == {k: v for k, v in b.items() if k != "model"}
    ids = torch.tensor(load_tokenizer(tiny).encode(corpus.read_text()).ids)
    masked = ReferenceLM.from_checkpoint(read_config(tiny), open_checkpoint(dense))
    assert float((masked.model.layers[0].mlp.up_proj.weight == 0).float().mean()) == 0.5
    assert a["nll_mean"] == pytest.approx(_direct_nll(masked, ids, SEQ)[0], rel=1e-6)
    assert a["nll_mean"] != full["nll_mean"]
    # pruned from the folder, the packed file records its config.json and tokenizer.json: no --like needed
    alone = _eval_json(cli, packed, "--data", corpus, "--seq-len", SEQ)
    assert {k: v for k, v in alone.items() if k != "model"} == {k: v for k, v in a.items() if k != "model"}


def test_a_packed_file_with_a_hostile_recorded_config_is_refused(cli, tiny, corpus, tmp_path):
    """The recorded config.json is read as hostile as a folder's: a bad field is one line, exit 4."""
    import json

    from balprune import container

    packed = tmp_path / "p.safetensors"
    assert cli("prune", str(tiny), "--sparsity", "0.5", "--blocks", "4", "-o", str(packed), "--json").code == 0
    parsed = container.parse_file(packed)
    meta = dict(parsed.metadata)
    cfg = json.loads(meta["hf:config.json"])
    cfg["num_hidden_layers"] = 10**12
    meta["hf:config.json"] = json.dumps(cfg)
    bad = tmp_path / "bad.safetensors"
    from safetensors.torch import load_file, save_file

    save_file(load_file(packed), bad, metadata=meta)
    refused(cli, tmp_path, [bad, "--data", corpus, "--seq-len", SEQ], 4, "bad.safetensors", "num_hidden_layers")


def test_bfloat16_is_close_to_float32(cli, tiny, corpus):
    f32 = _eval_json(cli, tiny, "--data", corpus, "--seq-len", SEQ)
    bf16 = _eval_json(cli, tiny, "--data", corpus, "--seq-len", SEQ, "--dtype", "bfloat16")
    assert bf16["dtype"] == "bfloat16" and bf16["nll_mean"] == pytest.approx(f32["nll_mean"], rel=1e-2)


def test_explicit_tokenizer_is_used(cli, tiny, corpus, tmp_path):
    """--tokenizer wins over the folder's: with the folder's tokenizer removed, text needs it."""
    moved = tmp_path / "tok"
    moved.mkdir()
    (tiny / "tokenizer.json").rename(moved / "tokenizer.json")
    a = _eval_json(cli, tiny, "--data", corpus, "--seq-len", SEQ, "--tokenizer", moved)
    b = _eval_json(cli, tiny, "--data", corpus, "--seq-len", SEQ, "--tokenizer", moved / "tokenizer.json")
    assert a == b and a["windows"] >= 5


# --------------------------------------------------------------------------- refusals


def refused(cli, tmp_path: Path, args: list, code: int, *mentions: str) -> str:
    before = listing(tmp_path)
    start = time.monotonic()
    r = cli("eval", *map(str, args))
    assert r.out == ""
    return assert_refused(r.code, r.out, r.err, code=code, mentions=mentions, folder=tmp_path, before=before,
                          started=start, timeout=TIMEOUT)


def _npy(path: Path, arr: np.ndarray, **kw) -> Path:
    np.save(path, arr, **kw)
    return path


@pytest.mark.parametrize("case", ["float npy", "2-D npy", "out of vocab", "negative id", "empty", "blank",
                                  "non-UTF-8", "too few", "truncated npy", "long id"])
def test_bad_data_refused(cli, tiny, tmp_path, case):
    d = tmp_path / "data.ids"
    mentions: tuple[str, ...]
    if case == "float npy":
        d = _npy(tmp_path / "d.npy", np.ones(300, dtype=np.float32))
        mentions = ("d.npy", "'<f4'", "not an integer dtype")
    elif case == "2-D npy":
        d = _npy(tmp_path / "d.npy", np.ones((10, 30), dtype=np.int64))
        mentions = ("d.npy", "(10, 30)", "1-D")
    elif case == "out of vocab":
        d.write_text(" ".join(["7"] * 100 + ["512"] + ["7"] * 100))
        mentions = ("data.ids", "token id 512 at position 100", "[0, 512)")
    elif case == "negative id":
        d.write_text("3 4 -7 5")
        mentions = ("data.ids", "token id -7")
    elif case == "empty":
        d.write_bytes(b"")
        mentions = ("data.ids", "no tokens")
    elif case == "blank":
        d.write_text("\n \n\t\n")
        mentions = ("data.ids", "no tokens")
    elif case == "non-UTF-8":
        d = tmp_path / "latin1.txt"
        d.write_bytes("déjà vu, naïve café ".encode("latin-1") * 20)
        mentions = ("latin1.txt", "UTF-8", "byte 1")
    elif case == "too few":
        d.write_text(" ".join(["1"] * (SEQ - 1)))
        mentions = ("data.ids", f"holds {SEQ - 1} tokens", f"window of {SEQ}")
    elif case == "truncated npy":
        d = _npy(tmp_path / "d.npy", np.arange(300, dtype=np.int32))
        d.write_bytes(d.read_bytes()[:-10])
        mentions = ("d.npy", "header claims 300 x 4 bytes")
    else:
        d.write_text("1 2 " + "1" * 40)
        mentions = ("data.ids", "40 characters")
    refused(cli, tmp_path, [tiny, "--data", d, "--seq-len", SEQ], 4, *mentions)


def test_pickled_object_array_never_unpickled(cli, tiny, tmp_path):
    canary = tmp_path / "canary"

    class Payload:
        def __reduce__(self):
            return (open, (str(canary), "w"))

    d = _npy(tmp_path / "evil.npy", np.array([Payload(), 1], dtype=object), allow_pickle=True)
    assert not canary.exists()
    refused(cli, tmp_path, [tiny, "--data", d], 4, "evil.npy", "'|O'", "not an integer dtype")
    assert not canary.exists()


@pytest.mark.parametrize("where", ["--tokenizer", "folder"])
@pytest.mark.parametrize("body,mentions", [
    (b"garbage", ("not valid JSON",)),
    (b'{"version": "1.0", "model": {"type": "Nonsense"}}', ("not a valid tokenizer.json",)),
    (b"[" * 100 + b"]" * 100, ("nested 100 levels",)),
])
def test_bad_tokenizer_refused(cli, tiny, corpus, tmp_path, where, body, mentions):
    if where == "folder":
        (tiny / "tokenizer.json").write_bytes(body)
        args = [tiny, "--data", corpus]
        name = "tiny/tokenizer.json"
    else:
        (tmp_path / "bad.json").write_bytes(body)
        args = [tiny, "--data", corpus, "--tokenizer", tmp_path / "bad.json"]
        name = "bad.json"
    refused(cli, tmp_path, args, 4, name, *mentions)


def test_text_without_a_tokenizer_is_a_usage_error(cli, tiny, corpus, tmp_path):
    (tiny / "tokenizer.json").unlink()
    refused(cli, tmp_path, [tiny, "--data", corpus], 2, "corpus.txt", "is text", "--tokenizer")


def test_non_regular_inputs_refused_without_hanging(cli, tiny, corpus, tmp_path):
    zero = tmp_path / "zero.npy"
    zero.symlink_to("/dev/zero")
    refused(cli, tmp_path, [tiny, "--data", zero], 4, "zero.npy", "character device")
    refused(cli, tmp_path, [tiny, "--data", tmp_path], 4, "folder")
    os.mkfifo(tmp_path / "fifo.txt")
    before = listing(tmp_path)
    start = time.monotonic()
    p = run_subprocess("eval", tiny, "--data", tmp_path / "fifo.txt", timeout=TIMEOUT)  # a hang would time out
    assert_refused(p.returncode, p.stdout, p.stderr, code=4, mentions=("fifo.txt", "FIFO"), folder=tmp_path,
                   before=before, started=start, timeout=TIMEOUT)
    (tiny / "tokenizer.json").unlink()
    os.mkfifo(tiny / "tokenizer.json")
    refused(cli, tmp_path, [tiny, "--data", corpus], 4, "tokenizer.json", "FIFO")


def test_control_characters_in_names_are_escaped(cli, tiny, tmp_path):
    d = tmp_path / "evil\x1b[31mname.txt"
    d.write_bytes(b"\xff\xfe not utf-8")
    line = refused(cli, tmp_path, [tiny, "--data", d], 4, "UTF-8")
    assert "\x1b" not in line


@pytest.mark.parametrize("opts,mentions", [
    (["--seq-len", "1"], ("--seq-len", ">= 2")), (["--seq-len", "2.5"], ("--seq-len",)),
    (["--seq-len", str((1 << 20) + 1)], ("--seq-len", "at most")), (["--max-tokens", "0"], ("--max-tokens",)),
    (["--dtype", "float64"], ("--dtype", "float64")), (["--device", "tpu"], ("--device", "tpu")),
])
def test_bad_options_are_usage_errors_before_any_file_is_read(cli, tmp_path, opts, mentions):
    # neither the model nor the data exists: a usage error is found first
    refused(cli, tmp_path, [tmp_path / "no-model", "--data", tmp_path / "no-data", *opts], 2, *mentions)


def test_window_beyond_the_models_positions_is_a_usage_error(cli, tiny, tmp_path):
    d = tmp_path / "ids.txt"
    d.write_text(" ".join(["5"] * 5000))
    refused(cli, tmp_path, [tiny, "--data", d, "--seq-len", "4096"], 2, "--seq-len 4096",
            f"max_position_embeddings ({TINY.max_position_embeddings})")


def test_cuda_without_a_gpu_is_exit_6(cli, tiny, corpus, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present: this checks the machine without one")
    refused(cli, tmp_path, [tiny, "--data", corpus, "--device", "cuda"], 6, "--device cuda", "no CUDA device")


def test_single_file_model_needs_like_and_a_matching_layout(cli, tiny, corpus, tmp_path):
    other = tmp_path / "other.safetensors"
    save_state_dict(small_state_dict(), other)
    refused(cli, tmp_path, [other, "--data", corpus], 2, "other.safetensors", "--like")
    refused(cli, tmp_path, [other, "--like", tiny, "--data", corpus], 4, "other.safetensors",
            "'model.embed_tokens.weight' is missing")
    refused(cli, tmp_path, [tiny, "--like", tiny, "--data", corpus], 2, "--like", "drop --like")
    refused(cli, tmp_path, [other, "--like", corpus, "--data", corpus], 4, "--like", "not a folder")
    refused(cli, tmp_path, [tmp_path / "missing", "--data", corpus], 4, "missing", "does not exist")
    refused(cli, tmp_path, [tmp_path / "missing.safetensors", "--like", tiny, "--data", corpus], 4,
            "missing.safetensors", "does not exist")


def test_model_and_window_that_do_not_fit_in_memory(cli, tiny, tmp_path, monkeypatch):
    d = tmp_path / "ids.txt"
    d.write_text(" ".join(["5"] * 5000))
    monkeypatch.setattr("balprune.safeio.memory_available", lambda: 4 << 20)
    line = refused(cli, tmp_path, [tiny, "--data", d, "--seq-len", "2048"], 4, "windows of 2048 tokens", "MiB",
                   "4.0 MiB of memory is available", "--seq-len")
    assert "needs" in line
    ok = cli("eval", str(tiny), "--data", str(d), "--seq-len", "64")
    assert ok.code == 0, ok.err  # the same model fits with short windows


def test_non_finite_loss_refused(cli, tmp_path):
    def nan_norm(n, s, d):
        t = random_tensor(n, s, d, 0)
        return t * float("nan") if n == "model.norm.weight" else t

    folder = write_hf_folder(TINY, tmp_path / "nan", tensor_fn=nan_norm)
    d = tmp_path / "ids.txt"
    d.write_text(" ".join(["5"] * 200))
    refused(cli, tmp_path, [folder, "--data", d, "--seq-len", SEQ], 4, "no finite perplexity", "NaN")
