"""Perplexity of a Llama-family model on a data file: what ``balprune eval`` computes.

The model is the project's reference model (llm.reference.ReferenceLM) on the weights of

- an HF folder (config.json + safetensors, ``family.open_llm``), or
- one safetensors file with the config of another folder (``like``): a plain dense file (``unpack``'s
  output, or any file holding the folder's tensor names) or a packed file written by ``prune``, whose
  tensors are rebuilt dense-with-zeros by ``formats.packed_file`` (each checked completely as it is
  read, exactly as ``unpack`` would write it); a packed file pruned from an HF folder needs no ``like``:
  it records the folder's config.json and tokenizer.json (formats.hf_record).

The data is read by ``llm.text.read_token_ids`` (token ids, or text through the tokenizer: by default
the model folder's, ``like``'s, or the packed file's recorded tokenizer.json) and cut by ``llm.text.eval_windows`` into
consecutive non-overlapping windows of ``seq_len`` tokens, the last partial one dropped. Each window is
one batch-1 forward from an empty context; its ``seq_len - 1`` next-token predictions are scored, and

    nll_mean   = sum of every window's next-token negative log-likelihoods / (windows x (seq_len - 1))
    perplexity = exp(nll_mean)

which is the WikiText protocol of SparseGPT, Wanda and GPTQ (their mean of per-window mean losses:
the same number, each window scoring the same count). Log-softmax in float32 whatever ``dtype``; the
sums are accumulated in float64 (math.fsum), in window order, so the same files give the same figure.

Before any weight is loaded: the data is read and cut, the model's weights and one window's
activations are checked against the memory available (exit 4 with the figures; on CUDA against the
GPU's free memory, exit 7), so a model or a --seq-len that cannot fit is refused, not OOM-killed.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch.nn import functional as F

from .. import container, safeio
from ..checkpoint import Checkpoint, SourceTensor, file_sha256, open_checkpoint
from ..errors import GpuRuntimeError, InvalidInputError, UsageError
from ..values import MAX_SEQ_LEN  # the one bound of --seq-len (calibration and evaluation windows)
from .examples import folder_bytes
from .family import LlmConfig, check_layout, open_llm, parse_config, read_config
from .reference import ReferenceLM
from .text import RecordedTokenizer, eval_windows, read_token_ids

EVAL_SCHEMA = "balprune.eval/1"
DEFAULT_SEQ_LEN = 512

#: Largest mean NLL whose exp is a finite float64 (a larger one is reported as an overflow, never as inf).
_MAX_NLL = 709.0

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class EvalResult:
    """One evaluation (``--json``: schema balprune.eval/1). ``tokens`` = windows x seq_len (the tokens
    read); ``predictions`` = windows x (seq_len - 1) (the next tokens scored, what nll_mean averages)."""

    model: str
    data: str
    data_sha256: str
    tokens: int
    windows: int
    seq_len: int
    predictions: int
    nll_mean: float
    perplexity: float
    dtype: str
    device: str

    def to_dict(self) -> dict:
        return {"schema": EVAL_SCHEMA, **asdict(self)}


class PackedCheckpoint(Checkpoint):
    """A packed file seen as the dense checkpoint it stands for: every tensor at its source name, shape and
    dtype, ``load`` giving the dense-with-zeros tensor in the source's orientation (``PackedFile.source_dense``,
    as ``unpack`` writes it: checked completely first); the manifest's aliases (tied weights) as aliases.
    Header and manifest only are read when opened."""

    def __init__(self, path: Path) -> None:
        from ..formats.packed_file import read_packed

        self._pf = read_packed(path)
        super().__init__(str(path), [path])
        entries = self._pf.manifest["tensors"]
        self.tensors = tuple(SourceTensor(name, e["dtype"], self._pf.source_shape(name), self._pf.dense_bytes(name))
                             for name, e in entries.items())
        self.aliases = dict(self._pf.manifest["aliases"])
        self._check_names()

    def load(self, name: str) -> torch.Tensor:
        return self._pf.source_dense(self.aliases.get(name, name))

    @property
    def packed_file(self):
        """The formats.packed_file.PackedFile underneath (the packed objects themselves: the decode runtime)."""
        return self._pf

    def hf_files(self):
        """The HF files the packed file records (formats.hf_record.HfFiles, checked), or None."""
        return self._pf.hf_files()


def is_packed(path: str | os.PathLike[str]) -> bool:
    """Whether a safetensors file is balprune's packed format (its metadata names it; header read only)."""
    from ..formats.spec import FORMAT_NAME

    metadata = container.parse_file(path).metadata
    return bool(metadata) and metadata.get("format") == FORMAT_NAME


def open_model(model: str | os.PathLike[str], like: str | os.PathLike[str] | None = None
               ) -> tuple[LlmConfig, Checkpoint, Path | RecordedTokenizer | None]:
    """(config, checkpoint, the tokenizer that comes with the config or None) of an eval MODEL; headers
    only are read.

    MODEL a folder: its own config.json and tokenizer.json (``like`` must be None: UsageError, exit 2).
    MODEL a file: a packed file, or a dense checkpoint ``open_checkpoint`` reads (safetensors; a torch
    state dict is read as safely as ``prune`` reads it), whose config is ``like``'s config.json -- or,
    without ``like``, the config.json (and tokenizer.json) a packed file pruned from an HF folder
    recorded (formats.hf_record); a file with neither is a UsageError (exit 2). The checkpoint's
    tensors are checked against the config's layout (exit 4 naming the first missing, extra or
    misshaped tensor).
    """
    m = Path(model)
    if m.is_dir():
        if like is not None:
            raise UsageError(f"--like gives the config of a single file; {m} is a folder with its own config.json",
                             hint="drop --like")
        cfg, ckpt = open_llm(m)
        return cfg, ckpt, _folder_tokenizer(m)
    safeio.check_regular(m, "model")
    if like is None:
        recorded = PackedCheckpoint(m) if m.suffix == ".safetensors" and is_packed(m) else None
        hf = None if recorded is None else recorded.hf_files()
        if hf is None:
            raise UsageError(f"{m} is a single file without a recorded config.json: pass --like FOLDER naming the "
                             "HF folder whose config.json it follows")
        cfg = parse_config(hf.config, f"{m}: recorded config.json")
        check_layout(cfg, recorded, str(m))
        tok = hf.texts.get("tokenizer.json")
        return cfg, recorded, None if tok is None else RecordedTokenizer(tok, f"{m}: recorded tokenizer.json")
    folder = Path(like)
    if not folder.is_dir():
        raise InvalidInputError(f"--like {folder}: not a folder (an HF causal-LM folder holding config.json)")
    cfg = read_config(folder)
    packed = m.suffix == ".safetensors" and is_packed(m)
    ckpt = PackedCheckpoint(m) if packed else open_checkpoint(m)  # open_checkpoint: dense files of every kind
    check_layout(cfg, ckpt, str(m))
    return cfg, ckpt, _folder_tokenizer(folder)


def _folder_tokenizer(folder: Path) -> Path | None:
    """The folder's tokenizer.json when it holds an entry of that name: a dangling or looping link is still
    its tokenizer (reading it says what is wrong, exit 4), not an absent one (exit 2, "give --tokenizer")."""
    path = folder / "tokenizer.json"
    return path if os.path.lexists(path) else None


def forward_bytes(cfg: LlmConfig, seq_len: int, dtype: torch.dtype) -> int:
    """Peak working memory of one batch-1 window's forward and loss, beyond the weights (an upper estimate):
    the attention scores and probabilities of all heads in float32 (the mask is float32), the MLP's three
    intermediate activations, a few hidden states, and the float32 logits with their log-softmax."""
    item = torch.empty((), dtype=dtype).element_size()
    t = seq_len
    attention = 3 * cfg.num_attention_heads * t * t * 4
    mlp = 3 * t * cfg.intermediate_size * max(item, 4)
    hidden = 8 * t * max(cfg.hidden_size, cfg.q_dim) * 4
    logits = 3 * t * cfg.vocab_size * 4
    return attention + mlp + hidden + logits



def kv_cache_bytes(cfg: LlmConfig, positions: int, dtype: torch.dtype) -> int:
    """Bytes of a static KV cache of ``positions`` for batch 1 (keys and values of every layer)."""
    item = torch.empty((), dtype=dtype).element_size()
    return 2 * cfg.num_hidden_layers * cfg.kv_dim * positions * item


def check_model_memory(cfg: LlmConfig, dtype: torch.dtype, device: torch.device, working: int, what: str,
                       hint: str) -> None:
    """The weights in ``dtype`` plus ``working`` bytes must fit where they will live (safeio.check_fits_device:
    exit 4 on the CPU, exit 7 on a GPU), naming ``what`` with both figures."""
    need = folder_bytes(cfg, dtype) + working  # the weights in dtype: what an HF folder of them holds
    safeio.check_fits_device(need, device, f"{what} (weights in {dtype} plus activations)", hint=hint)



def window_nll_sums(lm: ReferenceLM, windows: torch.Tensor,
                    progress: Callable[[int, int], None] | None = None) -> list[float]:
    """Per window [W, S] int64: the sum of its S - 1 next-token negative log-likelihoods (float32 log-softmax
    of ``lm``'s logits, summed in float64), one batch-1 forward per window, in order."""
    sums = []
    for i, w in enumerate(windows):
        ids = w[None].to(lm.device)
        logits = lm(ids)[0, :-1]
        nll = F.cross_entropy(logits, ids[0, 1:], reduction="none")
        sums.append(float(nll.to(torch.float64).sum()))
        if progress is not None:
            progress(i + 1, len(windows))
    return sums


def evaluate(model: str | os.PathLike[str], data: str | os.PathLike[str], *, like: str | os.PathLike[str] | None = None,
             tokenizer: str | os.PathLike[str] | None = None, seq_len: int = DEFAULT_SEQ_LEN,
             max_tokens: int | None = None, dtype: str = "float32", device: torch.device | str = "cpu",
             progress: Callable[[int, int], None] | None = None) -> EvalResult:
    """Perplexity of ``model`` on ``data`` (module docstring); nothing is written.

    ``tokenizer`` defaults to the tokenizer.json that comes with the config (``open_model``; used only for
    text data).
    ``seq_len`` may not exceed the config's max_position_embeddings (exit 2, as calibration).
    Order: the model's config and headers, the data (read, tokenized, cut), the memory checks, then the
    weights and the forward passes. Raises InvalidInputError (exit 4) for bad files or a non-finite loss,
    UsageError (exit 2) for bad options or text without a tokenizer, GpuRuntimeError (exit 7) on a GPU
    failure.
    """
    if dtype not in DTYPES:
        raise UsageError(f"--dtype: expected one of {', '.join(DTYPES)}, got {dtype!r}")
    if not isinstance(seq_len, int) or isinstance(seq_len, bool) or not 2 <= seq_len <= MAX_SEQ_LEN:
        raise UsageError(f"--seq-len must be an integer in [2, {MAX_SEQ_LEN}] (a window scores seq_len - 1 "
                         f"next tokens), got {seq_len!r}")
    torch_dtype, dev = DTYPES[dtype], torch.device(device)
    cfg, ckpt, model_tokenizer = open_model(model, like)
    if seq_len > cfg.max_position_embeddings:  # as calibration does: positions the model was never given
        raise UsageError(f"--seq-len {seq_len} is over the model's max_position_embeddings "
                         f"({cfg.max_position_embeddings})")
    ids = read_token_ids(data, tokenizer=model_tokenizer if tokenizer is None else Path(tokenizer),
                         vocab_size=cfg.vocab_size)
    windows = eval_windows(ids, seq_len=seq_len, max_tokens=max_tokens, what=f"data {data}")
    digest = file_sha256(data, "data")
    check_model_memory(cfg, torch_dtype, dev, forward_bytes(cfg, seq_len, torch_dtype),
                       f"evaluating windows of {seq_len} tokens",
                       "use a smaller --seq-len or --dtype bfloat16" + (", or --device cpu" if dev.type == "cuda" else ""))
    try:
        lm = ReferenceLM.from_checkpoint(cfg, ckpt, dtype=torch_dtype, device=dev)
        sums = window_nll_sums(lm, windows, progress)
    except torch.cuda.OutOfMemoryError as exc:
        torch.cuda.empty_cache()
        raise GpuRuntimeError(f"out of GPU memory evaluating {model} on {dev}: {str(exc).splitlines()[0][:200]}",
                              hint="use a smaller --seq-len, --dtype bfloat16, or --device cpu") from None
    predictions = windows.shape[0] * (seq_len - 1)
    nll_mean = math.fsum(sums) / predictions
    if not math.isfinite(nll_mean) or nll_mean > _MAX_NLL:
        raise InvalidInputError(f"{model}: the mean next-token loss ({nll_mean}) in {dtype} has no finite "
                                "perplexity: the weights hold NaN/Inf or huge values, or the activations overflow "
                                "this dtype",
                                hint="check the weights, or try --dtype float32")
    return EvalResult(model=str(model), data=str(data), data_sha256=digest, tokens=windows.numel(),
                      windows=windows.shape[0], seq_len=seq_len, predictions=predictions, nll_mean=nll_mean,
                      perplexity=math.exp(nll_mean), dtype=dtype, device=str(dev))
