"""`llama-lm`: a small Llama-family causal LM with a BPE tokenizer trained here, metric perplexity.

The model is the project's own Llama-family model (balprune.llm.reference.ReferenceLM, made
trainable): its parameters carry the Hugging Face names (``model.layers.N.self_attn.q_proj.weight``
...), so every pruned or packed output of finetune / sweep / sensitivity is LLM-shaped, and
``export_hf_folder`` writes the trained model as an HF folder (config.json with model_type llama,
tokenizer.json, safetensors shards with ``format: pt`` metadata, through llm.examples'
folder writer) that ``balprune prune FOLDER``, ``balprune eval`` and ``llm.family.open_llm`` read.

Text (each document is ``<s>``, its tokens, ``</s>``):

- without --data: the ``.py`` sources of the running Python's standard library, the file list of
  lstm-lm (``lstm_lm.stdlib_files``: sorted relative paths, tests and the like left out) and its
  split rule (CRC32 of the relative path: 1 in 20 valid, 1 in 20 test), one document per file,
  each split capped at its character budget (``max_train_chars``, ``max_eval_chars``);
- with --data DIR: the three files of one of the layouts in ``TEXT_LAYOUTS`` (PTB's
  ``ptb.{train,valid,test}.txt``, WikiText's ``wiki.{train,valid,test}.tokens`` or ``.raw``), one
  document per file, each read up to its character budget only (a 500 MB WikiText-103 file is not
  read whole), as strict UTF-8.

Tokenizer: llm.text's byte-level BPE (``train_bpe_tokenizer``: 256 bytes, ``<unk>`` ``<s>`` ``</s>``
at ids 0-2, which config.json's bos / eos ids name, then merges up to ``vocab_size``) trained on the
training text only. The same text and options give a byte-identical tokenizer.json (checked across
processes and thread counts in the tests).

Training batches are ``batch_size`` windows of ``seq_len`` tokens at random offsets of the
training ids; the loss is the mean next-token cross-entropy over the ``seq_len - 1`` predictions
of each window. Evaluation cuts a split into llm.text's ``eval_windows`` (consecutive,
non-overlapping windows of ``seq_len``, the last partial one dropped: the WikiText protocol that
``balprune eval`` uses) and reports perplexity = exp(mean next-token cross-entropy over every
prediction of every window).
"""

from __future__ import annotations

import codecs
import hashlib
import math
import os
import sysconfig
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from .. import safeio
from ..errors import ConfigError, InvalidInputError, UsageError
from ..llm import text as llm_text
from ..llm.family import LlmConfig, expected_tensors
from ..llm.reference import ReferenceLM
from .base import Option, Task, TaskSpec, evaluation_batches
from .lstm_lm import stdlib_files

#: --data layouts, tried in this order: the first whose train file exists is the one read.
TEXT_LAYOUTS: tuple[dict[str, str], ...] = (
    {"train": "ptb.train.txt", "valid": "ptb.valid.txt", "test": "ptb.test.txt"},
    {"train": "wiki.train.tokens", "valid": "wiki.valid.tokens", "test": "wiki.test.tokens"},
    {"train": "wiki.train.raw", "valid": "wiki.valid.raw", "test": "wiki.test.raw"},
)
SPLITS = ("train", "valid", "test")
#: Bytes of the byte-level alphabet plus the special tokens: the smallest vocabulary there is.
MIN_VOCAB = 256 + len(llm_text.SPECIAL_TOKENS)
#: Largest standard-library source file read (the biggest are ~0.5 MB); a larger one is skipped.
MAX_STDLIB_FILE_BYTES = 16 << 20
#: Text is tokenised in pieces of about this many characters, cut after a newline, so a huge
#: document never becomes one huge list of encodings.
CHUNK_CHARS = 1 << 20
#: Memory a character of text costs while it is read and tokenised: the text itself (up to 4 bytes
#: a character), the int64 ids (at most one token a character) and the tokenizer's work per piece.
BYTES_PER_CHAR = 16
#: RMSNorm epsilon and RoPE base of the model (Llama 2's values).
RMS_NORM_EPS = 1e-5
ROPE_THETA = 10000.0
#: Standard deviation of the initial weights (transformers' initializer_range for Llama).
INIT_STD = 0.02


@dataclass(frozen=True)
class Corpus:
    """The text of each split as documents, and where it came from."""

    documents: dict[str, list[str]]
    source: str


def stdlib_split(relative_path: str) -> str:
    """The split of a standard-library file: lstm-lm's rule, so both tasks hold out the same files."""
    bucket = zlib.crc32(relative_path.encode()) % 20
    return "valid" if bucket == 0 else "test" if bucket == 1 else "train"


def _check_text_memory(chars: int, what: str) -> None:
    safeio.check_fits_memory(BYTES_PER_CHAR * chars, f"{what}: reading and tokenising {chars:,} characters",
                             hint="lower max_train_chars / max_eval_chars in [task]", error=ConfigError)


def stdlib_text(caps: dict[str, int]) -> Corpus:
    """The standard library's sources as documents per split (module docstring), ``caps`` characters each."""
    root, files = stdlib_files()
    available = 0  # ~10 MB: a cap far above it reads no more than this
    for p in files:
        try:
            available += p.stat().st_size
        except OSError:
            pass  # skipped below as well
    _check_text_memory(min(sum(caps.values()), available), "llama-lm standard-library text")
    docs: dict[str, list[str]] = {s: [] for s in SPLITS}
    size = dict.fromkeys(SPLITS, 0)
    for p in files:
        split = stdlib_split(p.relative_to(root).as_posix())
        if size[split] >= caps[split]:
            if all(size[s] >= caps[s] for s in SPLITS):
                break
            continue
        try:  # the running Python's own files, but still read as any file is: regular, size-capped
            text = safeio.read_regular(p, "standard-library source", max_bytes=MAX_STDLIB_FILE_BYTES)
        except InvalidInputError:
            continue  # unreadable or not a regular file: not part of the corpus (the digest records what is)
        doc = text.decode("utf-8", errors="replace")[: caps[split] - size[split]]
        if doc:
            docs[split].append(doc)
            size[split] += len(doc)
    return Corpus(docs, f"python {sysconfig.get_python_version()} standard library sources ({root})")


def read_text_prefix(path: Path, max_chars: int, what: str) -> str:
    """The first ``max_chars`` characters of a UTF-8 text file, reading at most 4 bytes a character.

    A regular file only (safeio.open_regular); InvalidInputError (exit 4) for bytes that are not
    UTF-8 (a multi-byte character cut by the byte limit is not an error: it is left out).
    """
    with safeio.open_regular(path, what) as f:
        try:
            data = f.read(4 * max_chars)
        except OSError as exc:
            raise InvalidInputError(f"{what} {path}: cannot read: {exc.strerror or exc}") from None
    try:
        text = codecs.getincrementaldecoder("utf-8")().decode(data, final=False)
    except UnicodeDecodeError as exc:
        raise InvalidInputError(f"{what} {path} is not UTF-8 text (byte {exc.start})") from None
    return text[:max_chars]


def folder_text(folder: Path, caps: dict[str, int]) -> Corpus:
    """The three files of the first layout of TEXT_LAYOUTS whose train file ``folder`` holds, as documents."""
    folder = Path(folder)
    if not folder.is_dir():
        raise InvalidInputError(f"--data {folder}: not a folder",
                                hint=f"give the folder holding {TEXT_LAYOUTS[0]['train']} or {TEXT_LAYOUTS[1]['train']}")
    layout = next((lay for lay in TEXT_LAYOUTS if (folder / lay["train"]).exists()), None)
    if layout is None:
        names = " or ".join(", ".join(lay.values()) for lay in TEXT_LAYOUTS)
        raise InvalidInputError(f"--data {folder}: no text to read; llama-lm reads {names}")
    docs: dict[str, list[str]] = {}
    for split in SPLITS:
        path = folder / layout[split]
        if not path.exists():
            raise InvalidInputError(f"{path} is missing: llama-lm reads {', '.join(layout.values())} from --data")
        size = safeio.check_regular(path, "--data file").stat().st_size
        _check_text_memory(min(size, caps[split]), f"--data file {path}")
        text = read_text_prefix(path, caps[split], "--data file")
        if not text.strip():
            raise InvalidInputError(f"{path}: no text")
        docs[split] = [text]
    return Corpus(docs, f"text files {', '.join(layout.values())} in {folder}")


def _chunks(document: str):
    """Pieces of at most about CHUNK_CHARS characters, each cut after a newline where there is one."""
    start = 0
    while start < len(document):
        stop = start + CHUNK_CHARS
        if stop < len(document):
            cut = document.rfind("\n", start, stop)
            stop = cut + 1 if cut > start else stop
        yield document[start:stop]
        start = stop


def train_tokenizer(documents: list[str], vocab_size: int):
    """llm.text's byte-level BPE trained on ``documents``, cut into pieces as they are encoded."""
    return llm_text.train_bpe_tokenizer([c for d in documents for c in _chunks(d)], vocab_size)


def encode_documents(tokenizer, documents: list[str]) -> torch.Tensor:
    """The ids of ``documents`` (1-D int64): each is ``<s>``, its pieces' tokens, ``</s>``."""
    bos, eos = (torch.tensor([tokenizer.token_to_id(t)], dtype=torch.int64) for t in llm_text.SPECIAL_TOKENS[1:3])
    parts: list[torch.Tensor] = []
    for doc in documents:
        parts.append(bos)
        pieces = list(_chunks(doc))
        for i in range(0, len(pieces), 64):  # a bounded batch of encodings alive at a time
            batch = tokenizer.encode_batch(pieces[i:i + 64], add_special_tokens=False)  # <s> once, not per piece
            parts += [torch.tensor(e.ids, dtype=torch.int64) for e in batch]
        parts.append(eos)
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.int64)


def intermediate_size(o: dict) -> int:
    """The MLP width: the option, or (0) 8/3 x hidden rounded up to a multiple of 64 (Llama's rule of thumb)."""
    return o["intermediate"] or -(-8 * o["hidden"] // (3 * 64)) * 64


def llm_config(o: dict, vocab: int) -> LlmConfig:
    """The model's LlmConfig from the task options and the tokenizer's vocabulary.

    ConfigError (exit 4) naming the [task] options when they build no Llama model (heads that do not
    divide hidden, an odd head dimension, kv heads that do not divide heads).
    """
    hidden, heads, kv = o["hidden"], o["heads"], o["kv_heads"]
    if hidden % heads:
        raise ConfigError(f"llama-lm [task] heads: {heads} must divide hidden ({hidden})")
    if (hidden // heads) % 2:
        raise ConfigError(f"llama-lm [task] heads: hidden / heads = {hidden // heads} must be even (RoPE rotates pairs)")
    if heads % kv:
        raise ConfigError(f"llama-lm [task] kv_heads: {kv} must divide heads ({heads})")
    return LlmConfig(model_type="llama", vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate_size(o),
                     num_hidden_layers=o["layers"], num_attention_heads=heads, num_key_value_heads=kv,
                     head_dim=hidden // heads, rms_norm_eps=RMS_NORM_EPS, rope_theta=ROPE_THETA, rope_scaling=None,
                     tie_word_embeddings=o["tie_embeddings"], attention_bias=False,
                     max_position_embeddings=o["seq_len"], torch_dtype="float32")


class LlamaLm(ReferenceLM):
    """ReferenceLM, trainable: every parameter (norm weights included) takes gradients, and
    ``forward(input_ids [B, T] int64) -> logits [B, T, vocab] float32`` records the graph.

    Weights start as transformers initialises a Llama model: N(0, INIT_STD) for the embedding and
    every linear, ones for the norms (the caller seeds torch's generator).
    """

    def __init__(self, cfg: LlmConfig) -> None:
        super().__init__(cfg, torch.float32)
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, 0.0, INIT_STD)
        for p in self.parameters():
            p.requires_grad_(True)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.logits(input_ids)  # ReferenceLM.forward runs under no_grad; training needs gradients


def next_token_loss(logits: torch.Tensor, ids: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy of each window's tokens 1.. given the logits at 0..: logits [B, T, V], ids [B, T]."""
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction=reduction)


class LlamaLmTask(Task):
    name = "llama-lm"
    metric = "perplexity"
    higher_is_better = False
    splits = ("valid", "test")

    def __init__(self, options: dict, data: Path | None) -> None:
        self.o = options
        llm_config(options, MIN_VOCAB)  # the options' own consistency, before any text is read
        caps = {"train": options["max_train_chars"], "valid": options["max_eval_chars"],
                "test": options["max_eval_chars"]}
        corpus = stdlib_text(caps) if data is None else folder_text(data, caps)
        self.source = corpus.source
        tokenizer = train_tokenizer(corpus.documents["train"], options["vocab_size"])
        #: tokenizer.json, exactly as export_hf_folder writes it (byte-identical for identical text and options)
        self.tokenizer_json: bytes = (tokenizer.to_str(pretty=True) + "\n").encode()
        self.config = llm_config(options, tokenizer.get_vocab_size())
        self.ids = {s: encode_documents(tokenizer, corpus.documents[s]) for s in SPLITS}
        seq = options["seq_len"]
        for split, ids in self.ids.items():
            if len(ids) < seq:
                raise InvalidInputError(f"llama-lm: the {split} split has {len(ids)} tokens, fewer than seq_len ({seq})",
                                        hint="give more text or a smaller seq_len")
        h = hashlib.sha256()
        for s in SPLITS:
            h.update(s.encode())
            h.update(self.ids[s].numpy().tobytes())
        h.update(self.tokenizer_json)
        self.digest = h.hexdigest()[:16]

    def windows(self, split: str) -> torch.Tensor:
        """The evaluation windows of ``split``: [N, seq_len] int64, consecutive, the partial tail dropped."""
        return llm_text.eval_windows(self.ids[split], seq_len=self.o["seq_len"], what=f"llama-lm's {split} split")

    def build_model(self) -> nn.Module:
        return LlamaLm(self.config)

    def batch(self, generator, batch_size):
        data, seq = self.ids["train"], self.o["seq_len"]
        starts = torch.randint(0, len(data) - seq + 1, (batch_size,), generator=generator)
        return torch.stack([data[s:s + seq] for s in starts.tolist()])  # [batch, seq_len]

    def loss(self, model, batch, device):
        ids = batch.to(device)
        return next_token_loss(model(ids), ids)

    @torch.no_grad()
    def evaluate(self, model, split, device):
        was_training = model.training
        model.eval()
        windows = self.windows(split)
        total, count = 0.0, 0
        for start, stop in evaluation_batches(len(windows), self.o["eval_batch_size"]):
            ids = windows[start:stop].to(device)
            total += next_token_loss(model(ids), ids, reduction="sum").item()
            count += ids[:, 1:].numel()
        model.train(was_training)
        loss = total / count
        return {"perplexity": math.exp(min(loss, 700.0)), "loss": loss}

    def describe(self) -> dict:
        c = self.config
        return {"data": self.source, "digest": self.digest, "vocab": c.vocab_size,
                **{f"{s}_tokens": len(t) for s, t in self.ids.items()},
                "layers": c.num_hidden_layers, "hidden": c.hidden_size, "heads": c.num_attention_heads,
                "kv_heads": c.num_key_value_heads, "intermediate": c.intermediate_size, "seq_len": self.o["seq_len"],
                "tie_embeddings": c.tie_word_embeddings}

    def data_id(self) -> str:
        return self.digest

    def hf_files(self):
        """config.json and tokenizer.json exactly as ``export_hf_folder`` writes them: a fine-tuning run's
        packed file carries them, so ``balprune unpack RUN/PACKED --hf-folder DIR`` gives the folder."""
        from ..formats import hf_record
        from ..llm.examples import config_json

        texts = {"config.json": config_json(self.config), "tokenizer.json": self.tokenizer_json.decode()}
        return hf_record.parse_texts({hf_record.metadata_key(n): t for n, t in texts.items()}, "task llama-lm")

    def export_hf_folder(self, model: nn.Module, folder: str | os.PathLike[str], *, force: bool = False) -> Path:
        """Write ``model`` (this task's LlamaLm, trained, maybe pruned) as an HF causal-LM folder.

        llm.examples.write_hf_folder with this model's weights (float32) and tokenizer.json: config.json
        (model_type llama), the shards with ``format: pt`` metadata and their index. A new folder
        appears complete or not at all; an existing non-empty one is refused (OutputError, exit 5)
        unless ``force``, which replaces the files written here, each atomically. Returns the folder.
        """
        from ..llm.examples import write_hf_folder

        state = {k: v.detach() for k, v in model.state_dict().items()}
        for name, shape in expected_tensors(self.config).items():
            if name not in state or tuple(state[name].shape) != shape:
                raise UsageError(f"export: the model does not fit task llama-lm's configuration ({name})")

        def tensor(name, shape, dtype):
            return state[name].to(device="cpu", dtype=dtype).contiguous()

        return write_hf_folder(self.config, folder, force=force, tensor_fn=tensor, tokenizer_json=self.tokenizer_json)


def export_run(recipe_path: str | os.PathLike[str], checkpoint: str | os.PathLike[str],
               folder: str | os.PathLike[str], *, data: str | os.PathLike[str] | None = None,
               force: bool = False) -> Path:
    """The model of a llama-lm fine-tuning checkpoint (a run's ``checkpoint.pt`` or a sweep's
    ``dense.pt``) as an HF folder (``LlamaLmTask.export_hf_folder``).

    The task is rebuilt from the recipe and ``data`` (the same text and options give the same
    tokenizer), and the checkpoint must have been trained on exactly that data. UsageError (exit 2)
    for a recipe of another task; InvalidInputError (exit 4) for a checkpoint that is not one of this
    recipe's; UnsafeInputError (exit 3) for a folder that would replace an input.
    """
    from ..finetune.recipe import load_recipe
    from ..finetune.run import load_checkpoint
    from ..iopaths import check_io
    from . import make_task

    recipe = load_recipe(recipe_path)
    if recipe.task.name != SPEC.name:
        raise UsageError(f"{recipe_path}: a recipe of task {recipe.task.name!r}; export_run writes llama-lm models")
    out = Path(folder)
    written = {"config.json", "tokenizer.json", "model.safetensors.index.json", "model-00001-of-00001.safetensors"}
    if out.is_dir():  # with force, every shard of an earlier export is replaced too
        written |= {p.name for p in out.glob("model-*-of-*.safetensors")}
    check_io(inputs=[("recipe", recipe.path), ("checkpoint", checkpoint), ("--data", data)],
             outputs=[("folder", out / n) for n in sorted(written)])
    task = make_task(recipe.task, recipe.task_options, None if data is None else Path(data))
    state = load_checkpoint(Path(checkpoint))
    if state["data_id"] != task.data_id():
        raise InvalidInputError(f"{checkpoint}: trained on other data than this recipe reads now",
                                hint="pass the --data the run was given")
    with torch.random.fork_rng(devices=[]):
        model = task.build_model()
    try:
        model.load_state_dict(state["model"])
    except (RuntimeError, KeyError, ValueError, TypeError) as exc:
        raise InvalidInputError(f"{checkpoint}: does not hold this recipe's model ({str(exc).splitlines()[0][:200]})") \
            from None
    return task.export_hf_folder(model, out, force=force)


def _factory(options: dict, data: Path | None) -> Task:
    return LlamaLmTask(options, data)


def _model_params(o: dict) -> int:
    """Parameters at the vocabulary cap: embedding, per layer q/k/v/o + SwiGLU + 2 norms, final norm, head.

    Also checks the options build a Llama model at all (ConfigError), so a recipe is refused when it
    is read, before any text is.
    """
    return sum(math.prod(s) for s in expected_tensors(llm_config(o, o["vocab_size"])).values())


SPEC = TaskSpec(
    name="llama-lm",
    description="small Llama-family causal LM with a BPE tokenizer trained here (perplexity); "
                "PTB / WikiText text files from --data, else Python stdlib sources",
    options={
        "layers": Option(4, 1, "decoder layers", maximum=64),
        "hidden": Option(256, 8, "hidden size (embedding width)", maximum=8192),
        "heads": Option(4, 1, "attention heads (must divide hidden)", maximum=128),
        "kv_heads": Option(2, 1, "key/value heads (grouped-query attention; must divide heads)", maximum=128),
        "intermediate": Option(0, 0, "SwiGLU width (0: 8/3 x hidden rounded up to a multiple of 64)", maximum=32768),
        "seq_len": Option(128, 2, "tokens per training and evaluation window", maximum=4096),
        "vocab_size": Option(4096, MIN_VOCAB, "BPE vocabulary cap (256 bytes, 3 special tokens, merges)",
                             maximum=1 << 17),
        "tie_embeddings": Option(False, None, "share the embedding with the output head (Llama-3.2 style)"),
        "max_train_chars": Option(8_000_000, 1000, "training text read at most (characters)", maximum=1 << 30),
        "max_eval_chars": Option(400_000, 1000, "valid / test text read at most (characters, each)", maximum=1 << 28),
        "eval_batch_size": Option(16, 1, "evaluation windows per forward pass", maximum=4096),
    },
    data="optional",
    data_help="a folder with ptb.{train,valid,test}.txt or wiki.{train,valid,test}.tokens / .raw "
              "(without it: Python stdlib sources)",
    factory=_factory,
    model_params=_model_params,
    # the ids of seq_len + 1 tokens per sample (int64), and the logits over the vocabulary cap (float32)
    batch_bytes=lambda o, b: b * (o["seq_len"] + 1) * 8 + b * o["seq_len"] * o["vocab_size"] * 4,
)
