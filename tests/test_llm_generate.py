"""`balprune generate` on the CPU: the tokens are the reference model's (greedy, or seeded sampling), the
prompt and options are checked before any weight is read, and the text reaches the terminal escaped."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import listing

from balprune.llm.evaluate import PackedCheckpoint
from balprune.llm.examples import PRESETS, write_example
from balprune.llm.family import read_config
from balprune.llm.reference import ReferenceLM
from balprune.llm.text import load_tokenizer

PROMPT = "def main():\n    return 1"


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """(llama-tiny folder, its packed file at 50% balanced) shared by the module (never written to)."""
    from balprune.cli import main

    root = tmp_path_factory.mktemp("gen")
    folder = write_example("llama-tiny", root / "tiny")
    packed = root / "p.safetensors"
    assert main(["prune", str(folder), "--sparsity", "0.5", "--blocks", "4", "-o", str(packed), "--json"]) == 0
    return folder, packed


def _json(cli, *args):
    r = cli("generate", *map(str, args), "--device", "cpu", "--dtype", "float32", "--json")
    assert r.code == 0, r.err
    return json.loads(r.out)


def test_greedy_tokens_are_the_masked_reference_models(cli, files):
    folder, packed = files
    res = _json(cli, packed, "--prompt", PROMPT, "--max-new-tokens", 12)
    ids = load_tokenizer(folder).encode(PROMPT).ids
    lm = ReferenceLM.from_checkpoint(read_config(folder), PackedCheckpoint(packed))
    assert res["schema"] == "balprune.generate/1" and res["prompt_tokens"] == len(ids)
    assert res["new_tokens"] == lm.generate(ids, 12) and len(res["new_tokens"]) == 12
    assert res["text"] == load_tokenizer(folder).decode(res["new_tokens"], skip_special_tokens=True)
    assert res["runtime"].startswith("reference") and res["tokens_per_s"] > 0
    dense = _json(cli, folder, "--prompt", PROMPT, "--max-new-tokens", 12)  # the folder itself: unpruned
    assert dense["new_tokens"] == ReferenceLM.from_folder(folder).generate(ids, 12)


def test_sampling_is_seeded_and_a_tiny_top_p_is_greedy(cli, files):
    _, packed = files
    a = _json(cli, packed, "--prompt", PROMPT, "--max-new-tokens", 16, "--temperature", 1.5, "--seed", 3)
    b = _json(cli, packed, "--prompt", PROMPT, "--max-new-tokens", 16, "--temperature", 1.5, "--seed", 3)
    c = _json(cli, packed, "--prompt", PROMPT, "--max-new-tokens", 16, "--temperature", 1.5, "--seed", 4)
    greedy = _json(cli, packed, "--prompt", PROMPT, "--max-new-tokens", 16)
    nucleus = _json(cli, packed, "--prompt", PROMPT, "--max-new-tokens", 16, "--temperature", 1.5, "--top-p", 1e-9)
    assert a["new_tokens"] == b["new_tokens"] and a["new_tokens"] != c["new_tokens"]
    assert a["new_tokens"] != greedy["new_tokens"] and nucleus["new_tokens"] == greedy["new_tokens"]


@pytest.mark.parametrize("args,code,words", [
    (["--max-context", "8", "--max-new-tokens", "4"], 2, ["need", "cache positions", "the cache holds 8"]),
    (["--max-new-tokens", "0"], 2, ["--max-new-tokens"]),
    (["--temperature", "-1"], 2, ["--temperature"]),
    (["--top-p", "0"], 2, ["--top-p"]),
    (["--top-p", "1.5"], 2, ["--top-p"]),
    (["--dtype", "int8"], 2, ["--dtype"]),
])
def test_bad_options_and_overlong_prompts_are_one_line(cli, files, tmp_path, args, code, words):
    _, packed = files
    before = listing(packed.parent)
    r = cli("generate", str(packed), "--prompt", PROMPT, "--device", "cpu", *args)
    assert r.code == code and r.out == "" and len(r.err.strip().splitlines()) == 1, r.err
    assert all(w in r.err for w in words), r.err
    assert listing(packed.parent) == before


def test_no_gpu_is_exit_6_before_the_model_is_read(cli, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present: this checks the machine without one")
    r = cli("generate", str(tmp_path / "missing.safetensors"), "--prompt", "x")  # default --device cuda
    assert r.code == 6 and "no CUDA device" in r.err


def test_generated_text_is_escaped_on_the_terminal(cli, files, tmp_path):
    """A tokenizer whose generated token is an escape sequence prints it escaped, never raw."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    _, packed = files
    vocab_size = PRESETS["llama-tiny"][1].vocab_size

    def tokenizer_file(special: dict[int, str]) -> str:
        vocab = {special.get(i, f"t{i}"): i for i in range(vocab_size)}
        tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="t0"))
        tok.pre_tokenizer = pre_tokenizers.Whitespace()
        path = tmp_path / f"tok{len(special)}.json"
        path.write_text(tok.to_str())
        return str(path)

    plain = _json(cli, packed, "--prompt", "t5 t7 t9", "--tokenizer", tokenizer_file({}), "--max-new-tokens", 3)
    hostile = tokenizer_file({plain["new_tokens"][0]: "\x1b[2J\x1b]0;owned\x07"})
    r = cli("generate", str(packed), "--prompt", "t5 t7 t9", "--tokenizer", hostile, "--max-new-tokens", "3",
            "--device", "cpu", "--dtype", "float32")
    assert r.code == 0, r.err
    assert "\x1b" not in r.out and "\x07" not in r.out and "\\x1b[2J" in r.out


def test_non_finite_logits_are_exit_4_not_token_zero(cli, files, tmp_path):
    """Finite weights whose activations overflow float16 give NaN logits: one line naming the dtype, for
    greedy (argmax of NaN would be id 0) and for sampling alike; float32 runs."""
    from balprune.llm.examples import random_tensor, write_hf_folder

    def hot(name, shape, dtype):
        t = random_tensor(name, shape, dtype, 0)
        return t * 6e4 if name == "model.norm.weight" else t  # 6e4 fits float16; norm * hidden overflows

    folder = write_hf_folder(PRESETS["llama-tiny"][1], tmp_path / "hot", tensor_fn=hot)
    for extra in ((), ("--temperature", "1")):
        r = cli("generate", str(folder), "--prompt", PROMPT, "--device", "cpu", "--dtype", "float16",
                "--max-new-tokens", "3", "--tokenizer", str(files[0]), *extra)
        assert r.code == 4 and "logits are not finite in float16" in r.err and r.out == "", r.err
    assert cli("generate", str(folder), "--prompt", PROMPT, "--device", "cpu", "--dtype", "float32",
               "--max-new-tokens", "3", "--tokenizer", str(files[0])).code == 0


def test_a_tiny_temperature_is_near_greedy_not_a_crash(cli, files):
    _, packed = files
    greedy = _json(cli, packed, "--prompt", PROMPT, "--max-new-tokens", 6)
    cold = _json(cli, packed, "--prompt", PROMPT, "--max-new-tokens", 6, "--temperature", "1e-45")
    assert cold["new_tokens"] == greedy["new_tokens"]


def test_a_tokenizer_that_fails_to_decode_is_exit_4(cli, files, tmp_path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    _, packed = files
    vocab = {"x" * (i + 1): i for i in range(PRESETS["llama-tiny"][1].vocab_size)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="x"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.Strip(content="x", left=1000, right=1000)  # panics in Rust when it decodes
    path = tmp_path / "strip.json"
    path.write_text(tok.to_str())
    r = cli("generate", str(packed), "--prompt", "x xx xxx", "--tokenizer", str(path), "--device", "cpu",
            "--dtype", "float32", "--max-new-tokens", "2")
    assert r.code == 4 and "fails to decode" in r.err and len(r.err.strip().splitlines()) == 1, r.err


def test_a_tokenizer_panic_reaches_the_terminal_as_one_line(files, tmp_path):
    """The Rust library prints a panic and its backtrace straight to the process's stderr (fd 2, which the
    in-process cli fixture does not see): run as a user does, the terminal gets balprune's line alone."""
    import os
    import subprocess
    import sys

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    _, packed = files
    vocab = {"x" * (i + 1): i for i in range(PRESETS["llama-tiny"][1].vocab_size)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="x"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.Strip(content="x", left=1000, right=1000)
    path = tmp_path / "strip.json"
    path.write_text(tok.to_str())
    r = subprocess.run([sys.executable, "-m", "balprune", "generate", str(packed), "--prompt", "x xx xxx", "--tokenizer",
                        str(path), "--device", "cpu", "--dtype", "float32", "--max-new-tokens", "2"],
                       capture_output=True, text=True, timeout=300, env={**os.environ, "RUST_BACKTRACE": "1"})
    assert r.returncode == 4, r.stderr[-2000:]
    assert r.stderr.strip().splitlines() == [r.stderr.strip()] and "fails to decode" in r.stderr, r.stderr[-2000:]


def test_a_prompt_that_is_not_utf8_is_a_usage_error(tmp_path, capsys):
    """Bytes that are not UTF-8 on the command line arrive as lone surrogates: exit 2 naming --prompt,
    before any device or file is looked at."""
    from balprune.cli import main

    assert main(["generate", str(tmp_path / "none"), "--prompt", "caf\udce9", "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--prompt is not valid UTF-8" in err


def test_a_dangling_tokenizer_json_in_the_folder_is_exit_4_not_absent(cli, files, tmp_path):
    """A tokenizer.json link to nothing is the folder's tokenizer, broken (exit 4 naming it), not a missing
    one (exit 2 asking for --tokenizer)."""
    import shutil

    folder, _ = files
    copy = tmp_path / "m"
    shutil.copytree(folder, copy)
    (copy / "tokenizer.json").unlink()
    (copy / "tokenizer.json").symlink_to(tmp_path / "gone.json")
    r = cli("generate", str(copy), "--prompt", PROMPT, "--device", "cpu", "--dtype", "float32")
    assert r.code == 4 and "tokenizer.json" in r.err and len(r.err.strip().splitlines()) == 1, r.err


def test_a_tokenizer_that_gives_no_tokens_for_a_prompt_is_at_fault(cli, files, tmp_path):
    """A BPE tokenizer with an empty vocabulary drops every character: the tokenizer file is bad (exit 4),
    the user's non-empty prompt is not (it said exit 2, "give a non-empty --prompt")."""
    from tokenizers import Tokenizer, models

    _, packed = files
    path = tmp_path / "empty.json"
    path.write_text(Tokenizer(models.BPE(vocab={}, merges=[])).to_str())
    r = cli("generate", str(packed), "--prompt", "hello", "--tokenizer", str(path), "--device", "cpu")
    assert r.code == 4 and "gives no tokens for the prompt" in r.err and str(path) in r.err, r.err
