"""`lstm-lm`: the paper's 2-layer LSTM language model, metric perplexity.

Data: PTB-format text (``ptb.train.txt``, ``ptb.valid.txt``, ``ptb.test.txt``: whitespace-separated
words, one sentence per line, ``<eos>`` appended per line) from ``--data DIR``. Without --data,
a corpus every machine has: the ``.py`` sources of the running Python's standard library
(tests, idlelib, site-packages and the like left out), read in sorted path order, each file
assigned to train / valid / test by the CRC32 of its relative path (1 in 20 valid, 1 in 20 test),
tokenised by one regular expression (identifiers, numbers as ``N`` as in PTB, single
punctuation characters), ``<eos>`` per non-blank line, each split capped at its token budget.
So the corpus is fixed for a given Python version (its digest is recorded with the metrics).

Vocabulary: the ``vocab_size - 1`` most frequent training words (ties: alphabetical) plus
``<unk>``. Training batches are ``batch_size`` windows of ``bptt + 1`` tokens at random offsets
(state reset per batch); evaluation runs the split in ``eval_batch_size`` contiguous streams,
carrying the LSTM state across windows. Perplexity = exp(mean token cross-entropy).
"""

from __future__ import annotations

import hashlib
import math
import re
import sysconfig
import zlib
from collections import Counter
from pathlib import Path

import torch
from torch import nn

from .. import safeio
from ..errors import InvalidInputError
from .base import Option, Task, TaskSpec

_TOKEN = re.compile(r"[A-Za-z_][A-Za-z_0-9]*|\d[\d_]*(?:\.\d+)?|\S")
_EXCLUDED_DIRS = {"test", "tests", "idlelib", "lib2to3", "site-packages", "dist-packages", "turtledemo",
                  "__pycache__", "ensurepip", "venv", "tkinter", "pydoc_data"}
PTB_FILES = {"train": "ptb.train.txt", "valid": "ptb.valid.txt", "test": "ptb.test.txt"}
#: Largest PTB-format file read (PTB's train split is 5 MB, WikiText-103's 540 MB).
MAX_TEXT_FILE_BYTES = 2 << 30


class LstmLm(nn.Module):
    """Embedding, LSTM (hidden H, ``layers`` deep), dropout, decoder: the names of balprune.examples' lstm-lm."""

    def __init__(self, vocab: int, hidden: int, layers: int, dropout: float) -> None:
        super().__init__()
        self.embedding = nn.Embedding(vocab, hidden)
        self.lstm = nn.LSTM(hidden, hidden, num_layers=layers, dropout=dropout if layers > 1 else 0.0)
        self.drop = nn.Dropout(dropout)
        self.decoder = nn.Linear(hidden, vocab)
        nn.init.uniform_(self.embedding.weight, -0.1, 0.1)
        nn.init.uniform_(self.decoder.weight, -0.1, 0.1)
        nn.init.zeros_(self.decoder.bias)

    def forward(self, tokens: torch.Tensor, state=None):
        out, state = self.lstm(self.drop(self.embedding(tokens)), state)
        return self.decoder(self.drop(out)), state


def tokenize_line(line: str) -> list[str]:
    """One source line -> tokens (numbers become ``N``), empty for blank lines."""
    return ["N" if t[0].isdigit() else t for t in _TOKEN.findall(line)]


def stdlib_files() -> tuple[Path, list[Path]]:
    """(stdlib root, its .py files in sorted relative-path order, excluded folders left out)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for p in root.rglob("*.py"):
        parts = p.relative_to(root).parts
        if any(part in _EXCLUDED_DIRS for part in parts[:-1]):
            continue
        files.append(p)
    return root, sorted(files, key=lambda p: p.relative_to(root).as_posix())


def stdlib_corpus(max_train: int, max_eval: int) -> tuple[dict[str, list[str]], str]:
    """Token lists per split from the standard library's sources (module docstring), and their source."""
    root, files = stdlib_files()
    caps = {"train": max_train, "valid": max_eval, "test": max_eval}
    out: dict[str, list[str]] = {"train": [], "valid": [], "test": []}
    for p in files:
        rel = p.relative_to(root).as_posix()
        bucket = zlib.crc32(rel.encode()) % 20
        split = "valid" if bucket == 0 else "test" if bucket == 1 else "train"
        if len(out[split]) >= caps[split]:
            if all(len(out[s]) >= caps[s] for s in out):
                break
            continue
        try:
            text = p.read_text(encoding="utf-8", errors="replace")
        except OSError:
            continue
        tokens = out[split]
        for line in text.splitlines():
            words = tokenize_line(line)
            if words:
                tokens.extend(words)
                tokens.append("<eos>")
        del tokens[caps[split]:]
    return out, f"python {sysconfig.get_python_version()} standard library sources ({root})"


def ptb_corpus(folder: Path, max_train: int, max_eval: int) -> tuple[dict[str, list[str]], str]:
    """Token lists from PTB-format files in ``folder``; InvalidInputError naming a missing or empty file."""
    folder = Path(folder)
    if not folder.is_dir():
        raise InvalidInputError(f"--data {folder}: not a folder", hint=f"give the folder holding {PTB_FILES['train']}")
    out: dict[str, list[str]] = {}
    for split, fname in PTB_FILES.items():
        path = folder / fname
        if not path.exists():
            raise InvalidInputError(f"{path} is missing: lstm-lm reads {', '.join(PTB_FILES.values())} from --data")
        # A regular file only (a FIFO or device would hang or never end), read whole up to the cap.
        text = safeio.read_text(path, "--data file", max_bytes=MAX_TEXT_FILE_BYTES)
        tokens: list[str] = []
        cap = max_train if split == "train" else max_eval
        for line in text.splitlines():
            words = line.split()
            if words:
                tokens.extend(words)
                tokens.append("<eos>")
            if len(tokens) >= cap:
                break
        del tokens[cap:]
        if len(tokens) < 2:
            raise InvalidInputError(f"{path}: no text")
        out[split] = tokens
    return out, f"PTB-format text in {folder}"


def build_vocab(train: list[str], size: int) -> list[str]:
    """The ``size - 1`` most frequent words (ties alphabetical), then ``<unk>``."""
    counts = Counter(train)
    counts.pop("<unk>", None)
    words = sorted(counts, key=lambda w: (-counts[w], w))[: size - 1]
    return words + ["<unk>"]


class LstmLmTask(Task):
    name = "lstm-lm"
    metric = "perplexity"
    higher_is_better = False
    splits = ("valid", "test")

    def __init__(self, options: dict, data: Path | None) -> None:
        self.o = options
        max_eval = options["max_eval_tokens"]
        if data is None:
            corpus, self.source = stdlib_corpus(options["max_train_tokens"], max_eval)
        else:
            corpus, self.source = ptb_corpus(data, options["max_train_tokens"], max_eval)
        for split, toks in corpus.items():
            if len(toks) < options["bptt"] + 2:
                raise InvalidInputError(f"lstm-lm: the {split} split has {len(toks)} tokens, fewer than bptt + 2")
        self.vocab = build_vocab(corpus["train"], options["vocab_size"])
        index = {w: i for i, w in enumerate(self.vocab)}
        unk = index["<unk>"]
        self.ids = {s: torch.tensor([index.get(w, unk) for w in toks], dtype=torch.int64) for s, toks in corpus.items()}
        h = hashlib.sha256()
        for s in ("train", "valid", "test"):
            h.update(s.encode())
            h.update(self.ids[s].numpy().tobytes())
        h.update("\n".join(self.vocab).encode())
        self.digest = h.hexdigest()[:16]

    def build_model(self) -> nn.Module:
        return LstmLm(len(self.vocab), self.o["hidden"], self.o["layers"], self.o["dropout"])

    def batch(self, generator, batch_size):
        data = self.ids["train"]
        bptt = self.o["bptt"]
        starts = torch.randint(0, len(data) - bptt - 1, (batch_size,), generator=generator)
        window = torch.stack([data[s:s + bptt + 1] for s in starts.tolist()], dim=1)  # [bptt + 1, batch]
        return window[:-1], window[1:]

    def loss(self, model, batch, device):
        x, y = batch
        logits, _ = model(x.to(device))
        return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.to(device).reshape(-1))

    @torch.no_grad()
    def evaluate(self, model, split, device):
        was_training = model.training
        model.eval()
        data = self.ids[split]
        streams = self.o["eval_batch_size"]
        per = (len(data) - 1) // streams
        if per < 1:
            streams, per = 1, len(data) - 1
        x_all = data[: streams * per].reshape(streams, per).t()
        y_all = data[1: streams * per + 1].reshape(streams, per).t()
        total, count, state = 0.0, 0, None
        for i in range(0, per, self.o["bptt"]):
            x = x_all[i:i + self.o["bptt"]].to(device)
            y = y_all[i:i + self.o["bptt"]].to(device)
            logits, state = model(x, state)
            total += nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1),
                                                 reduction="sum").item()
            count += y.numel()
        model.train(was_training)
        loss = total / count
        return {"perplexity": math.exp(min(loss, 700.0)), "loss": loss}

    def describe(self) -> dict:
        return {"data": self.source, "digest": self.digest, "vocab": len(self.vocab),
                **{f"{s}_tokens": len(t) for s, t in self.ids.items()},
                **{k: self.o[k] for k in ("hidden", "layers", "bptt", "dropout")}}

    def data_id(self) -> str:
        return self.digest


def _factory(options: dict, data: Path | None) -> Task:
    return LstmLmTask(options, data)


def _model_params(o: dict) -> int:
    """Parameters of LstmLm at the vocabulary cap: embedding, LSTM layers (4 gates), decoder."""
    h, v = o["hidden"], o["vocab_size"]
    return v * h + o["layers"] * (4 * h * 2 * h + 2 * 4 * h) + h * v + v


SPEC = TaskSpec(
    name="lstm-lm",
    description="2-layer LSTM language model (perplexity); PTB-format text from --data, else Python stdlib sources",
    options={
        "hidden": Option(320, 1, "hidden and embedding width (paper: 1500)", maximum=1 << 15),
        "layers": Option(2, 1, "LSTM layers", maximum=256),
        "vocab_size": Option(10000, 2, "vocabulary cap, <unk> included", maximum=1 << 24),
        "bptt": Option(35, 1, "tokens per training window", maximum=1 << 20),
        "dropout": Option(0.0, 0.0, "dropout on embeddings, between LSTM layers and before the decoder", maximum=1.0),
        "max_train_tokens": Option(1_000_000, 100, "training tokens read at most", maximum=1 << 36),
        "max_eval_tokens": Option(100_000, 100, "valid / test tokens read at most", maximum=1 << 36),
        "eval_batch_size": Option(10, 1, "contiguous evaluation streams", maximum=1 << 20),
    },
    data="optional",
    data_help="a folder with ptb.train.txt, ptb.valid.txt and ptb.test.txt (without it: Python stdlib sources)",
    factory=_factory,
    model_params=_model_params,
    # the ids of bptt + 1 tokens per sample (int64), and the logits over the vocabulary cap (float32)
    batch_bytes=lambda o, b: b * (o["bptt"] + 1) * 8 + b * o["bptt"] * o["vocab_size"] * 4,
)
