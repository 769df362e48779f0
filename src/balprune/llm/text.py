"""Text and token ids for LLMs: the one owner of "turn a data file into token ids" and of the windows cut from them.

Calibration (``prune --calibration``) and evaluation (``eval --data``) read their data through
:func:`read_token_ids` and cut it with :func:`token_windows` (random calibration samples) or
:func:`eval_windows` (consecutive perplexity windows), so both see the same tokens for the same file.

What a data file is, decided by its content (the suffix is not trusted):

- **NumPy .npy**: a file that starts with the NumPy magic (``\\x93NUMPY``), or is named ``*.npy``
  (then it must start with the magic). Format version 1.0 or 2.0, a 1-D array of a plain integer dtype
  (int8..int64, uint8..uint64, either byte order); its header is parsed and its size checked against
  the file's bytes before anything is allocated; object arrays are never unpickled.
- **token ids as text**: a file whose every whitespace-separated word (ASCII whitespace: space, tab,
  newline, CR, VT, FF) is a decimal integer of ASCII digits with an optional leading ``-``: each word
  is one id, in file order (one id per line, or several per line; at most 18 characters each). A
  negative id makes the file ids (and refused), not text.
- **text**: anything else. It must be UTF-8; it is tokenized whole, as one string, with the
  ``tokenizer.json`` given (a folder holding one, or the file itself) through the ``tokenizers``
  package (``Tokenizer.from_str`` on the file's text, never a hub download; in a memory-capped child
  process, TextCodec), with the tokenizer's
  special tokens (its post-processor, e.g. a leading BOS), as the WikiText perplexity protocol
  tokenizes its test set. A text file with no tokenizer given is a usage error (exit 2) naming
  ``--tokenizer``; the tokenizer is only read when the data is text.

Refused with InvalidInputError (exit 4), one line naming the file: non-regular files (safeio), files
over the size caps, no ids at all, ids < 0 or >= the vocabulary (``vocab_size``, else family.MAX_VOCAB),
a .npy of another dtype, rank or version, a tokenizer.json that is not strict JSON or not a tokenizer
or that needs more memory to encode the text than is available,
text that is not UTF-8.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import struct
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .. import safeio
from ..errors import InvalidInputError, UsageError
from . import tokenizer_child as _child
from .family import MAX_VOCAB
from .tokenizer_child import deterministic

#: The script every tokenizers call on a user's file runs in (TextCodec).
_CHILD = Path(_child.__file__)

#: Largest token-id file read (.npy or ids text): 1 GiB, e.g. 134M int64 ids or ~250M ids as text.
MAX_IDS_FILE_BYTES = 1 << 30
#: Largest text file tokenized (tokenizers holds ~100 bytes per token while encoding one string).
MAX_TOKENIZE_BYTES = 64 << 20
#: Largest tokenizer.json read (Llama 3's is 9 MB, Qwen's 7 MB).
MAX_TOKENIZER_BYTES = 64 << 20
#: Most digits of one id in an ids text file (10^18 - 1 < 2^63: an id never overflows int64).
MAX_ID_DIGITS = 18

_NPY_MAGIC = b"\x93NUMPY"
_IDS_CHARS = re.compile(rb"[-0-9 \t\n\r\x0b\x0c]*")
#: A '-' that does not start a word or is not followed by a digit: the file is not ids but text.
_BAD_MINUS = re.compile(rb"-(?![0-9])|(?<=[^ \t\n\r\x0b\x0c])-")
_WHITESPACE = b" \t\n\r\x0b\x0c"
#: Chunk of an ids text file parsed at once (bounded scratch memory, whatever the file size).
_PARSE_CHUNK = 4 << 20


def read_token_ids(path: str | os.PathLike[str], *, tokenizer: Path | RecordedTokenizer | None = None,
                   vocab_size: int | None = None) -> torch.Tensor:
    """The token ids a data file holds (module docstring: .npy, ids text, or text tokenized), 1-D int64.

    ``tokenizer``: a folder holding tokenizer.json, the file itself, or a RecordedTokenizer; read only
    when the file is text.
    ``vocab_size``: ids must lie in [0, vocab_size) (default: [0, family.MAX_VOCAB)).
    Raises InvalidInputError (exit 4) for bad data, UsageError (exit 2) for text with no tokenizer.
    """
    p = Path(path)
    bound = MAX_VOCAB if vocab_size is None else vocab_size
    if not isinstance(bound, int) or isinstance(bound, bool) or bound < 1:
        raise ValueError(f"vocab_size must be a positive integer, got {vocab_size!r}")
    data = safeio.read_regular(p, "data", max_bytes=MAX_IDS_FILE_BYTES)
    if data.startswith(_NPY_MAGIC) or p.suffix.lower() == ".npy":
        ids = _npy_ids(data, p)
        source = "holds"
    elif _IDS_CHARS.fullmatch(data) and not _BAD_MINUS.search(data):
        ids = _text_ids(data, p)
        source = "holds"
    else:
        if tokenizer is None:
            raise UsageError(f"data {p} is text (not only decimal token ids), and no tokenizer was given",
                             hint="pass --tokenizer FOLDER or tokenizer.json, or give token ids (.npy or ids text)")
        tokenizer = tokenizer if isinstance(tokenizer, RecordedTokenizer) else Path(tokenizer)
        ids = _tokenize(data, p, tokenizer)
        source = f"tokenized with {tokenizer_name(tokenizer)} gives"
    if ids.size == 0:
        raise InvalidInputError(f"data {p} holds no tokens", hint="give a file with at least one token")
    _check_range(ids, p, bound, source)  # in the file's own dtype: a uint64 id cannot wrap before the check
    safeio.check_fits_memory(ids.size * 8, f"data {p}: {ids.size} token ids as int64")
    ids = ids.astype(np.int64, copy=False)  # native int64 (a .npy's big-endian or narrower ids converted)
    if not ids.flags.writeable:  # a view of the file's bytes: the tensor gets its own memory
        ids = ids.copy()
    return torch.from_numpy(ids)


def _check_range(ids: np.ndarray, p: Path, bound: int, source: str) -> None:
    """Every id in [0, bound) (ids of any integer dtype): exit 4 naming the first offender and its position."""
    bad = np.flatnonzero((ids < 0) | (ids >= bound))
    if bad.size:
        at = int(bad[0])
        raise InvalidInputError(f"data {p} {source} token id {int(ids[at])} at position {at}, outside the "
                                f"vocabulary [0, {bound}) ({bad.size} such id(s))",
                                hint="use the model's own tokenizer, or ids below its vocab_size")


def _npy_ids(data: bytes, p: Path) -> np.ndarray:
    """A 1-D integer array from .npy bytes, in the file's dtype (a view of ``data``). The header is checked
    against the bytes before anything is made from it: no np.load (which allocates the claimed shape
    before it reads) and no pickles ever."""
    f = io.BytesIO(data)
    try:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
        elif version == (2, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
        else:
            raise InvalidInputError(f"data {p}: .npy format version {version[0]}.{version[1]} is not supported "
                                    "(1.0 or 2.0)")
    except InvalidInputError:
        raise
    except Exception as exc:  # numpy raises ValueError / SyntaxError / others for a malformed header
        raise InvalidInputError(f"data {p}: not a valid .npy file ({type(exc).__name__}: {str(exc)[:200]})") from None
    if dtype.hasobject or dtype.kind not in "iu" or dtype.fields is not None or dtype.subdtype is not None:
        raise InvalidInputError(f"data {p}: .npy dtype {dtype.str!r} is not an integer dtype (token ids are "
                                "int8..int64 or uint8..uint64)")
    if len(shape) != 1:
        raise InvalidInputError(f"data {p}: .npy array has shape {tuple(shape)}; token ids must be 1-D",
                                hint="flatten it (ids.reshape(-1)) and save it again")
    (count,) = shape
    offset = f.tell()
    if count * dtype.itemsize != len(data) - offset:
        raise InvalidInputError(f"data {p}: .npy header claims {count} x {dtype.itemsize} bytes, the file holds "
                                f"{len(data) - offset} after the header")
    return np.frombuffer(data, dtype=dtype, count=count, offset=offset)


def _text_ids(data: bytes, p: Path) -> np.ndarray:
    """Decimal ids separated by ASCII whitespace (the file was checked to hold nothing else), parsed in
    chunks cut at whitespace so the scratch memory stays bounded whatever the file's size."""
    # at most one id per two bytes, as int64, plus one chunk's split words and their fixed-width copy
    safeio.check_fits_memory(len(data) // 2 * 8 + min(len(data), _PARSE_CHUNK) * 40, f"data {p}: token ids as int64")
    parts: list[np.ndarray] = []
    start, n = 0, len(data)
    while start < n:
        end = min(start + _PARSE_CHUNK, n)
        if end < n:  # extend to the next whitespace so no id is cut in two
            while end < n and data[end] not in _WHITESPACE:
                end += 1
        chunk = data[start:end].split()
        if chunk:
            longest = max(chunk, key=len)
            if len(longest) > MAX_ID_DIGITS:
                raise InvalidInputError(f"data {p}: token id {longest[:24].decode()}... is {len(longest)} "
                                        f"characters long, over {MAX_ID_DIGITS}")
            parts.append(np.array(chunk, dtype=np.bytes_).astype(np.int64))
        start = end
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


@dataclass(frozen=True)
class RecordedTokenizer:
    """A tokenizer.json held as text (a packed file's record, formats.hf_record, already checked to be a
    JSON object within its cap), where a Path to one is otherwise given; ``where`` names it in errors."""

    text: str
    where: str


def _tokenizer_file(tokenizer: Path) -> Path:
    """tokenizer.json inside a folder, or the path itself."""
    return tokenizer / "tokenizer.json" if tokenizer.is_dir() else tokenizer


def tokenizer_name(tokenizer: str | os.PathLike[str] | RecordedTokenizer) -> str:
    """How errors name a tokenizer: the tokenizer.json file, or where a packed file recorded it."""
    return tokenizer.where if isinstance(tokenizer, RecordedTokenizer) else str(_tokenizer_file(Path(tokenizer)))


@contextlib.contextmanager
def native_stderr_silenced():
    """The process's file descriptor 2 pointed at the null device for the block, then restored.

    Why: a panic inside the ``tokenizers`` Rust library prints its message and a backtrace (60+ lines)
    straight to fd 2 before pyo3 raises it; balprune reports the failure in one line of its own
    (bad-inputs contract), and nothing a file provoked reaches the terminal raw."""
    sys.stderr.flush()
    saved, null = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(null, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(null)


def load_tokenizer(tokenizer: str | os.PathLike[str] | RecordedTokenizer):
    """A ``tokenizers.Tokenizer`` in THIS process, for tokenizers balprune made or a caller trusts (tests,
    the example folders); a tokenizer.json from a user goes through TextCodec, which runs the library in a
    memory-capped child. From a folder holding tokenizer.json, the file itself, or the text a packed file
    recorded; read and checked as TextCodec does (_read_tokenizer), made deterministic as its child does.
    InvalidInputError (exit 4) naming the file when it is not a tokenizer."""
    from tokenizers import Tokenizer

    path, text = _read_tokenizer(tokenizer)
    try:
        with native_stderr_silenced():
            tok = Tokenizer.from_str(text)
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as exc:  # noqa: B036 - serde's errors are Exceptions, a panic (pyo3) a BaseException
        raise InvalidInputError(f"tokenizer {path}: not a valid tokenizer.json ({str(exc)[:200]})") from None
    deterministic(tok)
    return tok


def _read_tokenizer(tokenizer: str | os.PathLike[str] | RecordedTokenizer) -> tuple[str, str]:
    """(how errors name it, its text): read through safeio (regular file, at most MAX_TOKENIZER_BYTES, strict
    JSON with bounded nesting and no duplicate keys, a JSON object); nothing is downloaded."""
    if isinstance(tokenizer, RecordedTokenizer):
        path, text = tokenizer.where, tokenizer.text
    else:
        path = str(_tokenizer_file(Path(tokenizer)))
        text = safeio.read_text(path, "tokenizer", max_bytes=MAX_TOKENIZER_BYTES)
    if not isinstance(safeio.loads_json(text, f"tokenizer {path}"), dict):
        raise InvalidInputError(f"tokenizer {path}: must hold a JSON object (a tokenizers tokenizer.json)")
    return path, text


#: Address space the tokenizer child needs beyond the memory its work may take: the interpreter and the
#: tokenizers library mapped (25 MiB measured with one thread), with room.
_CHILD_BASE_BYTES = 256 << 20


def _child_memory_limit() -> int | None:
    """The tokenizer child's address-space cap: the memory available plus the interpreter's own, within this
    process's own hard limit (which the child inherits); None when neither is known."""
    available = safeio.memory_available()
    limit = None if available is None else available + _CHILD_BASE_BYTES
    try:
        import resource

        hard = resource.getrlimit(resource.RLIMIT_AS)[1]
    except ImportError:
        return limit
    if hard != resource.RLIM_INFINITY:
        limit = hard if limit is None else min(limit, hard)
    return limit


class TextCodec:
    """A tokenizer.json somebody else made, used the one safe way: every call of the ``tokenizers`` library
    on it (load, encode, decode) runs in a child process (llm/tokenizer_child.py) whose address space is
    capped at the memory available (safeio.memory_available) plus the interpreter's own. Why: the
    library's allocations are unbounded by what a file can ask (a chain of Replace normalizers doubling a
    character, a template repeating the text, a Prepend on each added token at load), and when one fails
    the Rust allocator aborts the whole process without a word. Here such a file is exit 4 in one line,
    and so is any error or panic of the library (its stderr, a panic's backtrace, never reaches the
    terminal). Costs a process start (~0.15 s) per call.

    The file is read and checked as JSON here (_read_tokenizer); the library first parses it in the
    first call, so a file that is not a tokenizer is refused there (exit 4, "not a valid tokenizer.json")."""

    def __init__(self, source: str | os.PathLike[str] | RecordedTokenizer) -> None:
        self.source = source
        self.name, self._text = _read_tokenizer(source)

    def encode(self, text: str, what: str) -> np.ndarray:
        """The ids [n] int64 of ``text`` with the tokenizer's special tokens; ``what`` names the text in errors."""
        out = self._call("encode", text.encode("utf-8", "surrogatepass"), what)
        return np.frombuffer(out, dtype="<i8").astype(np.int64)

    def decode(self, ids: list[int], what: str) -> str:
        """The text of ``ids``, special tokens skipped; ``what`` names the ids in errors."""
        return self._call("decode", np.asarray(ids, dtype="<i8").tobytes(), what).decode("utf-8", "surrogatepass")

    def _call(self, op: str, payload: bytes, what: str) -> bytes:
        limit = _child_memory_limit()
        tok = self._text.encode("utf-8")
        header = json.dumps({"op": op, "tokenizer_bytes": len(tok), "memory_limit": limit}).encode()
        # one thread and two malloc arenas: each extra thread reserves address space the cap would count
        env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "RAYON_NUM_THREADS": "1", "MALLOC_ARENA_MAX": "2"}
        proc = subprocess.run([sys.executable, str(_CHILD)], input=struct.pack("<Q", len(header)) + header + tok + payload,
                              capture_output=True, env=env, check=False)
        if proc.returncode == 0:
            return proc.stdout
        if proc.returncode == _child.REFUSED:
            stage, _, message = proc.stdout.decode("utf-8", "replace").partition("\n")
            if stage == "load":
                raise InvalidInputError(f"tokenizer {self.name}: not a valid tokenizer.json ({message[:200]})")
            raise InvalidInputError(f"tokenizer {self.name} fails to {op} {what}: {message[:200]!r}")
        if proc.returncode == _child.OUT_OF_MEMORY or proc.returncode < 0:  # a MemoryError, or killed (abort, OOM)
            cap = "the memory available" if limit is None else f"the {safeio.human(limit)} it may take"
            raise InvalidInputError(f"tokenizer {self.name}: {op} of {what} needs more memory than {cap} (its "
                                    "pipeline lengthens the text, or its load allocates, beyond what fits)",
                                    hint="use the model's own tokenizer.json")
        raise RuntimeError(f"the tokenizer child process ended with exit status {proc.returncode}")


def _tokenize(data: bytes, p: Path, tokenizer: Path | RecordedTokenizer) -> np.ndarray:
    """The ids of the whole text (UTF-8, at most MAX_TOKENIZE_BYTES), special tokens included."""
    if len(data) > MAX_TOKENIZE_BYTES:
        raise InvalidInputError(f"data {p} is text of {len(data)} bytes, over the {MAX_TOKENIZE_BYTES}-byte limit "
                                "for tokenizing", hint="tokenize it beforehand and give the ids as .npy")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidInputError(f"data {p} is neither token ids nor UTF-8 text (byte {exc.start})") from None
    return TextCodec(tokenizer).encode(text, f"data {p}")


# --------------------------------------------------------------------------- windows


def _check_ids(ids: torch.Tensor) -> int:
    if not isinstance(ids, torch.Tensor) or ids.dtype != torch.int64 or ids.dim() != 1:
        raise ValueError(f"ids must be a 1-D int64 tensor, got {getattr(ids, 'dtype', type(ids))} "
                         f"{list(getattr(ids, 'shape', []))}")
    return ids.numel()


def _positive(name: str, v: object) -> int:
    if not isinstance(v, int) or isinstance(v, bool) or v < 1:
        raise UsageError(f"{name} must be a positive integer, got {v!r}")
    return v


def token_windows(ids: torch.Tensor, *, samples: int, seq_len: int, seed: int,
                  what: str = "the token data") -> torch.Tensor:
    """``samples`` random windows of ``seq_len`` consecutive ids: [samples, seq_len] int64.

    As SparseGPT and Wanda draw calibration samples: each start uniform in [0, n - seq_len - 1] (so at
    least seq_len + 1 tokens are needed), drawn independently (windows may overlap) from a
    ``torch.Generator`` seeded with ``seed``: the same ids, samples, seq_len and seed give the same
    windows on every machine. ``what`` names the data in the error (exit 4 with both figures).
    """
    n = _check_ids(ids)
    _positive("samples", samples)
    _positive("seq_len", seq_len)
    if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2**63:
        raise UsageError(f"seed must be an integer in [0, 2^63), got {seed!r}")
    if n < seq_len + 1:
        raise InvalidInputError(f"{what} holds {n} tokens; calibration windows of {seq_len} need at least "
                                f"{seq_len + 1}", hint="give more data, or a smaller --seq-len")
    safeio.check_fits_memory(samples * seq_len * 8, f"{samples} calibration windows of {seq_len} tokens")
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, n - seq_len, (samples,), generator=g, dtype=torch.int64)
    return ids[starts[:, None] + torch.arange(seq_len, dtype=torch.int64)[None, :]]


def eval_windows(ids: torch.Tensor, *, seq_len: int, max_tokens: int | None = None,
                 what: str = "the token data") -> torch.Tensor:
    """Consecutive non-overlapping windows [W, seq_len] int64 (a view of ``ids``), the WikiText protocol.

    The first ``max_tokens`` ids (all when None) are cut into W = floor(n / seq_len) windows; the last
    partial window is dropped, and every window starts from an empty context (no stride overlap), as
    SparseGPT's, Wanda's and GPTQ's perplexity evaluation does. Fewer than seq_len ids (after
    ``max_tokens``) is exit 4 with both figures.
    """
    n = _check_ids(ids)
    _positive("seq_len", seq_len)
    if max_tokens is not None:
        n = min(n, _positive("max_tokens", max_tokens))
    windows = n // seq_len
    if windows == 0:
        cut = "" if max_tokens is None or max_tokens >= ids.numel() else f" (--max-tokens {max_tokens})"
        raise InvalidInputError(f"{what} holds {n} tokens{cut}; one evaluation window of {seq_len} needs at least "
                                f"{seq_len}", hint="give more data, or a smaller --seq-len")
    return ids[: windows * seq_len].view(windows, seq_len)


# --------------------------------------------------------------------------- tokenizers built here

#: Special tokens of the tokenizers built here, at ids 0, 1, 2 (the bos/eos ids example config.json states).
SPECIAL_TOKENS = ("<unk>", "<s>", "</s>")

#: The fixed text the example folders' tokenizer is trained on (written for balprune; shipped in code so
#: the tokenizer is byte-identical on every machine, whatever Python's standard library holds).
EXAMPLE_CORPUS = """\
A language model reads text as a sequence of token ids. Each id names one entry of the vocabulary, and
the model predicts the next id from the ones before it. The perplexity of a model on a text is the
exponential of the mean negative log-likelihood of every next token: a model that guesses uniformly
among V tokens has perplexity V, and a model that always knows the next token has perplexity 1.

Pruning removes weights from the model. Magnitude pruning keeps the largest weights of each matrix.
Balanced sparsity splits every row of a weight matrix into blocks of the same length and keeps the
same number of weights in every block, so every thread of a GPU kernel does the same amount of work.
With 32 blocks per row and a sparsity of 0.9, each block keeps one weight in ten. The kept values are
stored with a one-byte offset inside their block, and the packed file is smaller than the dense one.

Activation-aware criteria look at the inputs of each layer as well. Wanda scores a weight by its
magnitude times the norm of the input column it multiplies, and compares the scores within a row.
SparseGPT solves a small least-squares problem for each layer and updates the surviving weights so
that the output of the layer changes as little as possible. Both need calibration data: a few hundred
windows of text, run through the model one decoder layer at a time.

The reference model computes the same logits as the transformers library: the token embedding, then
for every decoder layer an RMS norm, attention with rotary position embeddings and grouped queries,
another RMS norm and a gated MLP, then a final norm and the language-model head. The head may share
its weights with the embedding. The same folder holds config.json, the weights in safetensors shards
with an index, and this tokenizer.

    def perplexity(nll_sum: float, tokens: int) -> float:
        return math.exp(nll_sum / tokens)

    for layer in range(32):
        weights[layer] = prune(weights[layer], blocks=32, sparsity=0.5)

Numbers appear in text too: 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 16, 32, 64, 128, 256, 512, 1024, 2048,
4096, 8192, 14336, 32000, 128256; 0.5, 0.7, 0.9, 1e-5, 3.14159; 2019, 2023, 2024, 2025, 2026.
Questions and answers: What is sparse? Which blocks? How fast is it at batch one? Why does it matter?
The quick brown fox jumps over the lazy dog. THE QUICK BROWN FOX JUMPS OVER THE LAZY DOG!
"""


def train_bpe_tokenizer(texts: list[str], vocab_size: int):
    """A byte-level BPE ``tokenizers.Tokenizer`` trained on ``texts``: the 256 byte symbols and
    SPECIAL_TOKENS (ids 0-2) first, merges up to ``vocab_size`` ids in all (fewer when the texts run out of
    pairs seen twice), a post-processor that puts ``<s>`` (id 1) before every text, as Llama's does.

    Deterministic: the same texts and vocab_size give the same tokenizer.json bytes on every run.
    Every id it produces is < vocab_size. ValueError when vocab_size cannot hold the byte alphabet.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if vocab_size < len(alphabet) + len(SPECIAL_TOKENS):
        raise ValueError(f"a byte-level tokenizer needs a vocabulary of at least {len(alphabet) + len(SPECIAL_TOKENS)}, "
                         f"got {vocab_size}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, show_progress=False,
                                  special_tokens=list(SPECIAL_TOKENS), initial_alphabet=sorted(alphabet))
    tok.train_from_iterator(texts, trainer=trainer)
    bos = SPECIAL_TOKENS[1]
    tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                       special_tokens=[(bos, tok.token_to_id(bos))])
    return tok


#: Largest vocabulary of the example tokenizer: EXAMPLE_CORPUS runs out of repeated pairs before it.
EXAMPLE_TOKENIZER_VOCAB = 1024


def example_tokenizer_json(vocab_size: int) -> bytes:
    """tokenizer.json of the example folders: ``train_bpe_tokenizer`` on EXAMPLE_CORPUS with
    min(vocab_size, EXAMPLE_TOKENIZER_VOCAB) ids (so every id is < the model's vocab_size); byte-identical
    on every run. About 20 ms."""
    tok = train_bpe_tokenizer([EXAMPLE_CORPUS], min(vocab_size, EXAMPLE_TOKENIZER_VOCAB))
    return (tok.to_str(pretty=True) + "\n").encode()
