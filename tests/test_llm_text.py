"""llm.text: token ids from .npy / ids text / tokenized text, calibration and evaluation windows, and the
example folders' tokenizer (deterministic, ids below the vocabulary). The refusals through the real CLI
are in test_llm_eval.py."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from helpers import REPO
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer

from balprune.errors import InvalidInputError, UsageError
from balprune.llm import text
from balprune.llm.examples import PRESETS, write_example
from balprune.llm.text import (
    EXAMPLE_CORPUS,
    eval_windows,
    example_tokenizer_json,
    load_tokenizer,
    read_token_ids,
    token_windows,
)

IDS = [5, 0, 17, 511, 3, 3, 42]


@pytest.fixture(scope="module")
def tokenizer_file(tmp_path_factory):
    p = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    p.write_bytes(example_tokenizer_json(512))
    return p


# --------------------------------------------------------------------------- reading ids


@pytest.mark.parametrize("layout", ["1 2 3", "one per line", "tabs and CRLF", "leading zeros and blank lines"])
def test_ids_text_layouts(tmp_path, layout):
    body = {"1 2 3": " ".join(map(str, IDS)),
            "one per line": "\n".join(map(str, IDS)) + "\n",
            "tabs and CRLF": "\t".join(map(str, IDS[:3])) + "\r\n" + "\r\n".join(map(str, IDS[3:])),
            "leading zeros and blank lines": "\n\n" + " ".join(f"00{i}" for i in IDS) + "\n\n\f\v"}[layout]
    p = tmp_path / "data.ids"
    p.write_text(body, newline="")
    ids = read_token_ids(p, vocab_size=512)
    assert ids.dtype == torch.int64 and ids.dim() == 1 and ids.tolist() == IDS


@given(st.lists(st.integers(0, 10**6), min_size=1, max_size=300),
       st.lists(st.sampled_from([" ", "\n", "\t", "\r\n", "  \n "]), min_size=1, max_size=4))
@settings(max_examples=60, deadline=None)
def test_ids_text_parse_matches_split_across_chunks(tmp_path_factory, values, seps):
    """Whatever the separators, and with a parse chunk of 7 bytes (so ids straddle chunk cuts), the ids are
    those of a plain split."""
    body = "".join(str(v) + seps[i % len(seps)] for i, v in enumerate(values))
    p = tmp_path_factory.mktemp("h") / "x.txt"
    p.write_text(body, newline="")
    old = text._PARSE_CHUNK
    text._PARSE_CHUNK = 7
    try:
        ids = read_token_ids(p)
    finally:
        text._PARSE_CHUNK = old
    assert ids.tolist() == [int(w) for w in body.split()]


@pytest.mark.parametrize("dtype", ["int8", "uint8", "int16", "uint16", "<i4", ">i4", "int64", ">u8"])
def test_npy_every_integer_dtype(tmp_path, dtype):
    p = tmp_path / "ids.npy"
    np.save(p, np.array([v % 100 for v in IDS], dtype=dtype))
    assert read_token_ids(p, vocab_size=512).tolist() == [v % 100 for v in IDS]


def test_npy_magic_decides_not_the_suffix(tmp_path):
    p = tmp_path / "ids.bin"
    with open(p, "wb") as f:
        np.save(f, np.array(IDS, dtype=np.int32))
    assert read_token_ids(p, vocab_size=512).tolist() == IDS
    fake = tmp_path / "ids.npy"  # named .npy without the magic: refused as a bad .npy, not read as ids text
    fake.write_text("1 2 3")
    with pytest.raises(InvalidInputError, match="not a valid .npy"):
        read_token_ids(fake)


def test_npy_version_2_reads(tmp_path):
    p = tmp_path / "v2.npy"
    arr = np.array(IDS, dtype=np.int64)
    with open(p, "wb") as f:
        np.lib.format.write_array(f, arr, version=(2, 0))
    assert read_token_ids(p).tolist() == IDS


@pytest.mark.parametrize("case,match", [
    ("float", "not an integer dtype"), ("bool", "not an integer dtype"), ("2d", "must be 1-D"),
    ("object", "not an integer dtype"), ("truncated", "header claims"), ("padded", "header claims"),
    ("huge claim", "header claims"), ("version 3", "version 3.0"), ("garbage header", "not a valid .npy"),
    ("structured", "not an integer dtype"),
])
def test_npy_refusals(tmp_path, case, match):
    p = tmp_path / "bad.npy"
    if case == "float":
        np.save(p, np.array([1.0, 2.0]))
    elif case == "bool":
        np.save(p, np.array([True, False]))
    elif case == "2d":
        np.save(p, np.zeros((2, 3), dtype=np.int64))
    elif case == "object":
        np.save(p, np.array([1, "x"], dtype=object), allow_pickle=True)
    elif case == "structured":
        np.save(p, np.zeros(3, dtype=[("a", "<i4"), ("b", "<i4")]))
    else:
        np.save(p, np.arange(10, dtype=np.int32))
        data = p.read_bytes()
        if case == "truncated":
            data = data[:-4]
        elif case == "padded":
            data += b"\0" * 4
        elif case == "huge claim":
            data = data.replace(b"(10,)", b"(10000000000000,)".ljust(5)).replace(b" " * 12 + b"\n", b"\n")
            assert b"10000000000000" in data
        elif case == "version 3":
            data = data[:6] + b"\x03\x00" + data[8:]
        elif case == "garbage header":
            data = data[:10] + b"{'descr': nonsense" + data[28:]
        p.write_bytes(data)
    with pytest.raises(InvalidInputError, match=match) as exc:
        read_token_ids(p)
    assert str(p) in exc.value.one_line()


def test_out_of_vocabulary_and_negative_ids(tmp_path):
    p = tmp_path / "ids.txt"
    p.write_text("1 2 511 512 3")
    assert read_token_ids(p, vocab_size=513).tolist() == [1, 2, 511, 512, 3]
    with pytest.raises(InvalidInputError, match=r"token id 512 at position 3, outside the vocabulary \[0, 512\)"):
        read_token_ids(p, vocab_size=512)
    p.write_text("4\n-1\n")
    with pytest.raises(InvalidInputError, match="token id -1 at position 1"):
        read_token_ids(p, vocab_size=512)
    q = tmp_path / "big.npy"  # uint64 beyond int64: refused in its own dtype, never wrapped to a negative id
    np.save(q, np.array([7, 2**64 - 1], dtype=np.uint64))
    with pytest.raises(InvalidInputError, match=f"token id {2**64 - 1} at position 1"):
        read_token_ids(q)
    r = tmp_path / "long.ids"
    r.write_text("1 " + "9" * 30)
    with pytest.raises(InvalidInputError, match="30 characters long"):
        read_token_ids(r)


@pytest.mark.parametrize("body", [b"", b"  \n\t \n"])
def test_no_tokens_refused(tmp_path, body):
    p = tmp_path / "empty.txt"
    p.write_bytes(body)
    with pytest.raises(InvalidInputError, match="holds no tokens"):
        read_token_ids(p)


def test_text_is_tokenized_whole_with_a_leading_bos(tmp_path, tokenizer_file):
    sample = "Balanced sparsity keeps k weights per block.\nPerplexity 12.5 -- ünïcödé 日本語!\n"
    p = tmp_path / "t.txt"
    p.write_text(sample)
    ids = read_token_ids(p, tokenizer=tokenizer_file, vocab_size=512)
    assert ids[0].item() == 1  # <s>, from the tokenizer's post-processor
    tok = Tokenizer.from_file(str(tokenizer_file))
    assert ids.tolist() == tok.encode(sample).ids
    assert tok.decode(ids.tolist()) == sample  # byte-level: lossless, every byte of the file is in the ids
    # the folder holding tokenizer.json works as well as the file
    assert read_token_ids(p, tokenizer=tokenizer_file.parent, vocab_size=512).tolist() == ids.tolist()
    # a word with a minus inside is text, not ids
    q = tmp_path / "words.txt"
    q.write_text("12 1-2 3")
    assert read_token_ids(q, tokenizer=tokenizer_file).tolist() == tok.encode("12 1-2 3").ids


def test_text_refusals(tmp_path, tokenizer_file):
    p = tmp_path / "t.txt"
    p.write_text("plain words")
    with pytest.raises(UsageError) as exc:
        read_token_ids(p)
    assert "no tokenizer was given (pass --tokenizer" in exc.value.one_line()
    p.write_bytes(b"caf\xe9 latin-1 text")
    with pytest.raises(InvalidInputError, match=r"neither token ids nor UTF-8 text \(byte 3\)"):
        read_token_ids(p, tokenizer=tokenizer_file)
    p.write_text("plain words")
    with pytest.raises(InvalidInputError, match="outside the vocabulary"):  # tokenizer larger than the model
        read_token_ids(p, tokenizer=tokenizer_file, vocab_size=300)


@pytest.mark.parametrize("body,match", [
    (b"garbage", "not valid JSON"), (b'{"a": 1}', "not a valid tokenizer.json"), (b"[1, 2]", "JSON object"),
    (b"[" * 200 + b"]" * 200, "nested"), (b'{"model": 1, "model": 2}', "duplicate key"),
    (b"\xff\xfe{}", "not UTF-8"),
])
def test_bad_tokenizer_json(tmp_path, body, match):
    bad = tmp_path / "tokenizer.json"
    bad.write_bytes(body)
    with pytest.raises(InvalidInputError, match=match) as exc:
        load_tokenizer(tmp_path)
    assert str(bad) in exc.value.one_line()


def test_ids_files_never_read_the_tokenizer(tmp_path):
    p = tmp_path / "ids.txt"
    p.write_text("1 2 3")
    garbage = tmp_path / "tokenizer.json"
    garbage.write_text("garbage")
    assert read_token_ids(p, tokenizer=garbage).tolist() == [1, 2, 3]


def test_size_caps(tmp_path, monkeypatch, tokenizer_file):
    p = tmp_path / "ids.txt"
    p.write_text("1 2 3 4 5 6 7 8 9")
    monkeypatch.setattr(text, "MAX_IDS_FILE_BYTES", 10)
    with pytest.raises(InvalidInputError, match="over the 10-byte limit"):
        read_token_ids(p)
    monkeypatch.setattr(text, "MAX_IDS_FILE_BYTES", 1 << 20)
    monkeypatch.setattr(text, "MAX_TOKENIZE_BYTES", 8)
    p.write_text("some text to tokenize")
    with pytest.raises(InvalidInputError, match="over the 8-byte limit for tokenizing"):
        read_token_ids(p, tokenizer=tokenizer_file)


def test_non_regular_files_refused_before_reading(tmp_path):
    fifo = tmp_path / "fifo.ids"
    os.mkfifo(fifo)
    with pytest.raises(InvalidInputError, match="FIFO"):
        read_token_ids(fifo)
    link = tmp_path / "zero.npy"
    link.symlink_to("/dev/zero")
    with pytest.raises(InvalidInputError, match="character device"):
        read_token_ids(link)
    with pytest.raises(InvalidInputError, match="folder"):
        read_token_ids(tmp_path)


# --------------------------------------------------------------------------- windows


def test_token_windows_are_seeded_slices():
    ids = torch.arange(1000, dtype=torch.int64) * 3
    w = token_windows(ids, samples=16, seq_len=50, seed=7)
    assert w.shape == (16, 50) and w.dtype == torch.int64
    starts = w[:, 0] // 3
    assert torch.equal(w, (starts[:, None] + torch.arange(50)[None, :]) * 3)  # contiguous slices of ids
    assert int(starts.min()) >= 0 and int(starts.max()) <= 1000 - 50 - 1
    assert torch.equal(w, token_windows(ids, samples=16, seq_len=50, seed=7))
    assert not torch.equal(w, token_windows(ids, samples=16, seq_len=50, seed=8))
    # the same draw in a fresh process (torch.Generator, not global state)
    code = ("import torch; from balprune.llm.text import token_windows; "
            "print(token_windows(torch.arange(1000) * 3, samples=16, seq_len=50, seed=7)[:, 0].tolist())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env=dict(os.environ, PYTHONPATH=str(REPO / "src"))).stdout
    assert out.strip() == str(w[:, 0].tolist())


def test_token_windows_edge_and_refusals():
    ids = torch.arange(11, dtype=torch.int64)
    w = token_windows(ids, samples=3, seq_len=10, seed=0)  # n = seq_len + 1: the only start is 0
    assert torch.equal(w, ids[:10].expand(3, 10))
    with pytest.raises(InvalidInputError, match="holds 11 tokens; calibration windows of 11 need at least 12"):
        token_windows(ids, samples=3, seq_len=11, seed=0, what="data x.txt")
    for kw in ({"samples": 0}, {"seq_len": 0}, {"seed": -1}, {"samples": 2.0}):
        with pytest.raises(UsageError):
            token_windows(ids, **{"samples": 1, "seq_len": 4, "seed": 0, **kw})
    with pytest.raises(ValueError):
        token_windows(ids.to(torch.int32), samples=1, seq_len=4, seed=0)


def test_eval_windows_consecutive_last_partial_dropped():
    ids = torch.arange(105, dtype=torch.int64)
    w = eval_windows(ids, seq_len=20)
    assert w.shape == (5, 20) and torch.equal(w.reshape(-1), ids[:100])
    assert eval_windows(ids, seq_len=20, max_tokens=59).shape == (2, 20)
    assert eval_windows(ids, seq_len=20, max_tokens=10**9).shape == (5, 20)
    with pytest.raises(InvalidInputError, match=r"holds 19 tokens \(--max-tokens 19\); one evaluation window of 20"):
        eval_windows(ids, seq_len=20, max_tokens=19)
    with pytest.raises(InvalidInputError, match="holds 105 tokens; one evaluation window of 200"):
        eval_windows(ids, seq_len=200)
    with pytest.raises(UsageError):
        eval_windows(ids, seq_len=20, max_tokens=0)


# --------------------------------------------------------------------------- the example tokenizer


def test_example_tokenizer_is_byte_identical_across_processes():
    code = ("import hashlib; from balprune.llm.text import example_tokenizer_json; "
            "print(hashlib.sha256(example_tokenizer_json(512)).hexdigest())")
    digests = set()
    for seed, threads in (("1", "1"), ("2", "2"), ("random", "4")):
        env = dict(os.environ, PYTHONPATH=str(REPO / "src"), PYTHONHASHSEED=seed, RAYON_NUM_THREADS=threads)
        digests.add(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                                   env=env).stdout.strip())
    digests.add(hashlib.sha256(example_tokenizer_json(512)).hexdigest())
    assert len(digests) == 1, digests


@pytest.mark.parametrize("preset", list(PRESETS))
def test_example_tokenizer_ids_below_each_preset_vocabulary(preset):
    vocab = PRESETS[preset][1].vocab_size
    tok = Tokenizer.from_str(example_tokenizer_json(vocab).decode())
    assert tok.get_vocab_size() <= vocab
    assert max(tok.get_vocab().values()) < vocab
    assert [tok.token_to_id(t) for t in ("<unk>", "<s>", "</s>")] == [0, 1, 2]
    assert tok.decode(tok.encode(EXAMPLE_CORPUS).ids) == EXAMPLE_CORPUS
    with pytest.raises(ValueError):
        example_tokenizer_json(100)  # cannot hold the byte alphabet


def test_write_example_writes_the_tokenizer(tmp_path):
    a = write_example("llama-tiny", tmp_path / "a")
    b = write_example("llama-tiny", tmp_path / "b", seed=3)
    assert (a / "tokenizer.json").read_bytes() == (b / "tokenizer.json").read_bytes() == example_tokenizer_json(512)
    tok = load_tokenizer(a)
    ids = tok.encode("The quick brown fox").ids
    assert ids[0] == 1 and max(ids) < 512 and len(ids) < len("The quick brown fox")  # merges were learned


def test_a_tokenizer_that_loads_but_cannot_encode_is_exit_4(tmp_path):
    """A WordLevel tokenizer.json whose unk_token is not in its vocabulary loads, then fails on an unknown
    word inside the Rust library: one line naming the tokenizer and the data, not a traceback."""
    from tokenizers import models, pre_tokenizers

    tok = Tokenizer(models.WordLevel(vocab={"a": 0, "b": 1}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    path = tmp_path / "tokenizer.json"
    path.write_text(tok.to_str())
    data = tmp_path / "d.txt"
    data.write_text("a b c\n")
    with pytest.raises(InvalidInputError) as e:
        read_token_ids(data, tokenizer=path)
    assert "fails to encode" in e.value.one_line() and str(path) in e.value.one_line()
    recorded = text.RecordedTokenizer(path.read_text(), "p.safetensors: recorded tokenizer.json")
    with pytest.raises(InvalidInputError, match="recorded tokenizer.json fails to encode"):
        read_token_ids(data, tokenizer=recorded)


def test_a_tokenizers_padding_and_truncation_never_rewrite_the_text(tmp_path, tokenizer_file):
    """tokenizer.json may carry padding / truncation settings (a fixed padding of 10^15 aborted the process
    in the allocator, one of 10^6 made eval score padding): the text is encoded as it is."""
    import json

    t = json.loads(tokenizer_file.read_text())
    t["padding"] = {"strategy": {"Fixed": 10**15}, "direction": "Right", "pad_to_multiple_of": None,
                    "pad_id": 0, "pad_type_id": 0, "pad_token": "x"}
    t["truncation"] = {"direction": "Right", "max_length": 2, "strategy": "LongestFirst", "stride": 0}
    hostile = tmp_path / "tokenizer.json"
    hostile.write_text(json.dumps(t))
    words = "def f(x): return x + 1\n" * 5
    plain = text.load_tokenizer(tokenizer_file).encode(words).ids
    got = text.load_tokenizer(hostile).encode(words).ids
    assert got == plain and len(got) > 2


# --------------------------------------------------------------------------- a tokenizer somebody else made


def _with(tokenizer_file, folder, **parts):
    """A copy of the example tokenizer.json with ``parts`` (normalizer=..., decoder=...) replaced."""
    import json

    t = json.loads(tokenizer_file.read_text())
    t.update(parts)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "tokenizer.json"
    path.write_text(json.dumps(t))
    return path


def _doubling(n: int, kind: str = "normalizers", typed: bool = True) -> dict:
    """A Sequence of n Replace steps, each making every 'a' two: 'a' grows 2^n-fold. Untyped steps load as
    Replace too (the library matches on their fields): a check of the JSON's "type" alone misses them."""
    step = {"pattern": {"String": "a"}, "content": "aa"} | ({"type": "Replace"} if typed else {})
    return {"type": "Sequence", kind: [step] * n}


@pytest.fixture
def little_memory(monkeypatch):
    """256 MiB available: the tokenizer child's cap (plus its interpreter's own)."""
    monkeypatch.setattr(text.safeio, "memory_available", lambda: 256 << 20)


@pytest.mark.parametrize("case", ["normalizer", "untyped-normalizer", "decoder", "template", "prepend-on-load"])
def test_a_tokenizer_that_needs_unbounded_memory_is_exit_4_not_an_abort(tmp_path, tokenizer_file, little_memory, case):
    """A tokenizer.json can make the library allocate without bound, and the Rust allocator then aborted the
    whole process with nothing on stderr (34 doubling Replace normalizers: one 'a' is 2^34 characters). The
    library runs in a child capped at the memory available: exit 4 in one line naming the file and the cap,
    by every route -- the normalizer (typed or not), the decoder, a template repeating the text 10^5 times,
    a long Prepend applied to each added token while the file loads."""
    import json

    t = json.loads(tokenizer_file.read_text())
    parts = {
        "normalizer": {"normalizer": _doubling(34)},
        "untyped-normalizer": {"normalizer": _doubling(34, typed=False)},
        "decoder": {"decoder": _doubling(34, "decoders")},
        "template": {"post_processor": {"type": "TemplateProcessing", "pair": [], "special_tokens": {},
                                        "single": [{"Sequence": {"id": "A", "type_id": 0}}] * 100_000}},
        "prepend-on-load": {"normalizer": {"type": "Prepend", "prepend": "x" * 1_000_000},
                            "added_tokens": t["added_tokens"] + [
                                {"id": 10_000 + i, "content": f"<t{i}>", "single_word": False, "lstrip": False,
                                 "rstrip": False, "normalized": True, "special": False} for i in range(5000)]},
    }[case]
    path = _with(tokenizer_file, tmp_path / case, **parts)
    codec = text.TextCodec(path)
    with pytest.raises(InvalidInputError) as e:
        if case == "decoder":
            codec.decode([load_tokenizer(tokenizer_file).token_to_id("a")] * 2, "the generated ids")
        else:
            codec.encode("a" * 2000, "the prompt")
    line = e.value.one_line()
    assert e.value.exit_code == 4 and str(path) in line and "512.0 MiB it may take" in line, line


def test_the_tokenizer_child_gives_the_librarys_own_ids_and_text(tokenizer_file):
    """Encoding and decoding through the child equal the library in this process, special tokens and all."""
    words = "def main():\n    return 1 # caf\u00e9 \u2581 \U0001f600"
    tok = load_tokenizer(tokenizer_file)
    codec = text.TextCodec(tokenizer_file)
    ids = codec.encode(words, "the prompt")
    assert ids.dtype == np.int64 and ids.tolist() == tok.encode(words).ids
    assert codec.decode(ids.tolist(), "the ids") == tok.decode(ids.tolist(), skip_special_tokens=True)
    assert codec.encode("", "nothing").tolist() == tok.encode("").ids


def test_bpe_dropout_is_neutralised(tmp_path, tokenizer_file):
    """BPE dropout (a training-time regulariser) made the same text give other ids on every run (packed files
    of differing bytes, perplexities that moved): the text is always encoded without it, in the child and
    in this process alike."""
    import json

    t = json.loads(tokenizer_file.read_text())
    t["model"]["dropout"] = 0.9
    hostile = _with(tokenizer_file, tmp_path, model=t["model"])
    words = "the quick brown fox jumps over the lazy dog " * 8
    plain = load_tokenizer(tokenizer_file).encode(words).ids
    tok = load_tokenizer(hostile)
    assert tok.model.dropout is None and all(tok.encode(words).ids == plain for _ in range(3))
    assert all(text.TextCodec(hostile).encode(words, "w").tolist() == plain for _ in range(3))
