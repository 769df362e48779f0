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
  package (``Tokenizer.from_str`` on the file's text, never a hub download), with the tokenizer's
  special tokens (its post-processor, e.g. a leading BOS), as the WikiText perplexity protocol
  tokenizes its test set. A text file with no tokenizer given is a usage error (exit 2) naming
  ``--tokenizer``; the tokenizer is only read when the data is text.

Refused with InvalidInputError (exit 4), one line naming the file: non-regular files (safeio), files
over the size caps, no ids at all, ids < 0 or >= the vocabulary (``vocab_size``, else family.MAX_VOCAB),
a .npy of another dtype, rank or version, a tokenizer.json that is not strict JSON or not a tokenizer,
text that is not UTF-8.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .. import safeio
from ..errors import InvalidInputError, UsageError
from .family import MAX_VOCAB

#: Largest token-id file read (.npy or ids text): 1 GiB, e.g. 134M int64 ids or ~250M ids as text.
MAX_IDS_FILE_BYTES = 1 << 30
#: Largest text file tokenized (tokenizers holds ~100 bytes per token while encoding one string).
MAX_TOKENIZE_BYTES = 64 << 20
#: Largest tokenizer.json read (Llama 3's is 9 MB, Qwen's 7 MB).
MAX_TOKENIZER_BYTES = 64 << 20
#: Bytes tokenizers holds per token while encoding (ids, offsets, token strings, masks): for the memory
#: check before tokenizing (TextCodec.encode); a model makes at most one token per byte of normalized text.
_TOKENIZE_BYTES_PER_TOKEN = 100
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


def tokenizer_call(call, tokenizer: str | os.PathLike[str] | RecordedTokenizer, what: str):
    """``call()`` (an encode or decode of the ``tokenizers`` library), any failure of it -- a Rust error,
    or a panic, which pyo3 raises as a BaseException -- turned into one line naming the tokenizer and
    ``what`` it failed to do (InvalidInputError, exit 4). The library's own stderr output (a panic's
    backtrace) is silenced (native_stderr_silenced)."""
    try:
        with native_stderr_silenced():
            return call()
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as exc:  # noqa: B036 - pyo3's PanicException derives from BaseException
        raise InvalidInputError(f"tokenizer {tokenizer_name(tokenizer)} fails to {what}: {str(exc)[:200]!r}") from None


def load_tokenizer(tokenizer: str | os.PathLike[str] | RecordedTokenizer):
    """A ``tokenizers.Tokenizer`` from a folder holding tokenizer.json, or from the file itself (or from
    the text a packed file recorded); TextCodec adds the memory checks its encodes and decodes need.

    Read through safeio (regular file, at most MAX_TOKENIZER_BYTES, strict JSON with bounded nesting and
    no duplicate keys), then ``Tokenizer.from_str``: nothing is downloaded. InvalidInputError (exit 4)
    naming the file when it is not a tokenizer, or when its pipeline can lengthen text more than
    MAX_TEXT_EXPANSION-fold (tokenizer_bounds). Settings that would make the same text give other ids
    are neutralised: padding, truncation and BPE dropout.
    """
    return _load(tokenizer)[0]


def _load(tokenizer: str | os.PathLike[str] | RecordedTokenizer) -> tuple[object, TokenizerBounds]:
    from tokenizers import Tokenizer

    if isinstance(tokenizer, RecordedTokenizer):
        path, text = tokenizer.where, tokenizer.text
    else:
        path = _tokenizer_file(Path(tokenizer))
        text = safeio.read_text(path, "tokenizer", max_bytes=MAX_TOKENIZER_BYTES)
    spec = safeio.loads_json(text, f"tokenizer {path}")
    if not isinstance(spec, dict):
        raise InvalidInputError(f"tokenizer {path}: must hold a JSON object (a tokenizers tokenizer.json)")
    bounds = tokenizer_bounds(spec, f"tokenizer {path}")
    try:
        with native_stderr_silenced():
            tok = Tokenizer.from_str(text)
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as exc:  # noqa: B036 - serde's errors are Exceptions, a panic (pyo3) a BaseException
        raise InvalidInputError(f"tokenizer {path}: not a valid tokenizer.json ({str(exc)[:200]})") from None
    # a file's padding / truncation settings would rewrite what we score, calibrate on or continue (a fixed
    # padding of 10^15 aborts the process in the allocator; one of 10^6 makes eval score padding), and BPE
    # dropout (a training-time regulariser) would make the same text give other ids on every run: the
    # text is always encoded as it is, deterministically
    tok.no_padding()
    tok.no_truncation()
    if getattr(tok.model, "dropout", None) is not None:
        tok.model.dropout = None
    return tok, bounds


class TextCodec:
    """A tokenizer (load_tokenizer) with the memory checks its encodes and decodes need, checked before the
    ``tokenizers`` library allocates (it aborts the process when an allocation fails): the one way
    balprune turns text into ids and ids into text. Failures of the library are exit 4 (tokenizer_call)."""

    def __init__(self, source: str | os.PathLike[str] | RecordedTokenizer) -> None:
        self.source = source
        self.tokenizer, self.bounds = _load(source)

    def encode(self, text: str, what: str) -> list[int]:
        """The ids of ``text`` with the tokenizer's special tokens; ``what`` names the text in errors."""
        n = len(text.encode("utf-8", "surrogatepass"))
        safeio.check_fits_memory(self.bounds.encode_tokens(n) * _TOKENIZE_BYTES_PER_TOKEN,
                                 f"{what}: tokenizing {n} bytes with {tokenizer_name(self.source)}")
        return tokenizer_call(lambda: self.tokenizer.encode(text, add_special_tokens=True).ids, self.source,
                              f"encode {what}")

    def decode(self, ids: list[int], what: str) -> str:
        """The text of ``ids``, special tokens skipped; ``what`` names the ids in errors."""
        safeio.check_fits_memory(self.bounds.decode_chars(len(ids)) * 4,
                                 f"{what}: decoding {len(ids)} ids with {tokenizer_name(self.source)}")
        return tokenizer_call(lambda: self.tokenizer.decode(ids, skip_special_tokens=True), self.source,
                              f"decode {what}")


# --------------------------------------------------------------------------- how long text can grow

#: Most a tokenizer may lengthen text, encoding (normalizer, then post-processor) or decoding (decoder).
#: The tokenizers of the supported families lengthen it at most 4-fold (Qwen's NFC); a chain of
#: Replace normalizers that each double a character lengthens it 2^n-fold, and encoding one character
#: then needs unbounded memory (the library aborts the process).
MAX_TEXT_EXPANSION = 64
#: Characters a Unicode normalization form can make of one (NFKC/NFKD up to 18: U+FDFA; NFC/NFD up to 4),
#: each at most as many UTF-8 bytes as the character it came from: a bound on the growth in bytes too.
_UNICODE_EXPANSION = {"NFKC": 18, "NFKD": 18, "NFC": 4, "NFD": 4}


@dataclass(frozen=True)
class Growth:
    """``out <= factor * in + extra``: UTF-8 bytes for a normalizer, characters for a decoder, ids for a
    post-processor."""

    factor: float = 1.0
    extra: int = 0

    def then(self, nxt: Growth) -> Growth:
        """This step followed by ``nxt``."""
        return Growth(self.factor * nxt.factor, int(nxt.factor * self.extra) + nxt.extra)


@dataclass(frozen=True)
class TokenizerBounds:
    """How much a tokenizer.json's pipeline can lengthen its input (tokenizer_bounds)."""

    normalizer: Growth
    post_processor: Growth
    decoder: Growth
    longest_token: int  # characters of the longest vocabulary or added token

    def encode_tokens(self, nbytes: int) -> int:
        """Most ids (and tokens held while encoding) ``nbytes`` of UTF-8 text can give: one per byte of the
        normalized text (byte fallback's worst case), then the post-processor's copies and special tokens."""
        normalized = self.normalizer.factor * nbytes + self.normalizer.extra
        return int(self.post_processor.factor * normalized + self.post_processor.extra) + 1

    def decode_chars(self, ids: int) -> int:
        """Most characters decoding ``ids`` ids can give."""
        return int(self.decoder.factor * ids * (self.longest_token + 2) + self.decoder.extra) + 1


def tokenizer_bounds(spec: dict, where: str) -> TokenizerBounds:
    """The growth of a tokenizer.json's normalizer, post-processor and decoder (each an upper bound, from
    the JSON alone); InvalidInputError (exit 4) when encoding or decoding can lengthen text more than
    MAX_TEXT_EXPANSION-fold. Components that cannot lengthen text count as 1; one the library does not
    know fails its own load (after this)."""
    norm = _growth(spec.get("normalizer"), "normalizers", _normalizer_step)
    post = _growth(spec.get("post_processor"), "processors", _post_processor_step)
    dec = _growth(spec.get("decoder"), "decoders", _decoder_step)
    for part, g, doing in (("normalizer and post-processor", Growth(norm.factor * post.factor), "encoding"),
                           ("decoder", dec, "decoding")):
        if g.factor > MAX_TEXT_EXPANSION:
            raise InvalidInputError(f"{where}: its {part} can lengthen text up to {g.factor:.3g}-fold, over "
                                    f"{MAX_TEXT_EXPANSION} ({doing} even a short text could exhaust memory)",
                                    hint="use the model's own tokenizer.json")
    tokens = []
    model = spec.get("model")
    vocab = model.get("vocab") if isinstance(model, dict) else None
    if isinstance(vocab, dict):
        tokens = list(vocab)
    elif isinstance(vocab, list):  # Unigram: [[piece, score], ...]
        tokens = [v[0] for v in vocab if isinstance(v, list) and v and isinstance(v[0], str)]
    added = spec.get("added_tokens")
    if isinstance(added, list):
        tokens += [a.get("content") for a in added if isinstance(a, dict) and isinstance(a.get("content"), str)]
    return TokenizerBounds(norm, post, dec, max((len(t) for t in tokens if isinstance(t, str)), default=1))


def _growth(node: object, seq_key: str, step) -> Growth:
    """A component's growth: a Sequence composes its parts in order; anything else is ``step(node)``."""
    if not isinstance(node, dict):
        return Growth()
    if node.get("type") == "Sequence" and isinstance(node.get(seq_key), list):
        g = Growth()
        for part in node[seq_key]:
            g = g.then(_growth(part, seq_key, step))
        return g
    return step(node)


def _replace_growth(node: dict) -> Growth:
    """Replace (normalizer or decoder): each match of the pattern becomes ``content``. A string pattern
    of length m grows text len(content) / m-fold at most; a regex may match the empty string, putting
    ``content`` between every two characters. Lengths in UTF-8 bytes (an upper bound on characters too)."""
    content = node.get("content")
    c = len(content.encode("utf-8", "surrogatepass")) if isinstance(content, str) else 0
    pattern = node.get("pattern")
    literal = pattern.get("String") if isinstance(pattern, dict) else None
    if isinstance(literal, str) and literal:
        return Growth(max(1.0, c / len(literal.encode("utf-8", "surrogatepass"))))
    return Growth(1.0 + c, c)


def _normalizer_step(node: dict) -> Growth:
    kind = node.get("type")
    if kind == "Replace":
        return _replace_growth(node)
    if kind in _UNICODE_EXPANSION:
        return Growth(_UNICODE_EXPANSION[kind])
    if kind == "Prepend":
        prepend = node.get("prepend")
        return Growth(1.0, len(prepend.encode("utf-8", "surrogatepass")) if isinstance(prepend, str) else 0)
    if kind == "Lowercase":
        return Growth(3.0)  # full case mappings make at most 3 characters of one
    if kind == "ByteLevel":
        return Growth(2.0)  # each UTF-8 byte becomes a character of at most 2 bytes
    if kind == "BertNormalizer":
        return Growth(3.0 * 3.0)  # spaces around each CJK character, then its lowercase
    if kind == "Precompiled":
        return Growth(float(max(1, _precompiled_longest(node.get("precompiled_charsmap")))))
    return Growth()  # Strip, StripAccents, NFKC's relatives above, Nmt: never longer


def _precompiled_longest(charsmap: object) -> int:
    """The longest replacement (UTF-8 bytes, >= its characters) in a SentencePiece precompiled charsmap:
    base64 of [u32 trie size][trie][NUL-separated replacements]; the whole blob when it is not that."""
    import base64
    import binascii

    if not isinstance(charsmap, str):
        return 1
    try:
        blob = base64.b64decode(charsmap, validate=True)
    except (binascii.Error, ValueError):
        return 1  # the library refuses it on load
    trie = int.from_bytes(blob[:4], "little") if len(blob) >= 4 else len(blob)
    strings = blob[4 + trie:] if 4 + trie <= len(blob) else blob
    return max((len(piece) for piece in strings.split(b"\0")), default=1)


def _post_processor_step(node: dict) -> Growth:
    kind = node.get("type")
    if kind == "TemplateProcessing":
        single = node.get("single")
        pieces = single if isinstance(single, list) else []
        copies = sum(1 for p in pieces if isinstance(p, dict) and "Sequence" in p)
        specials = node.get("special_tokens")
        per_special = max((len(v.get("ids", [])) for v in specials.values()
                           if isinstance(v, dict) and isinstance(v.get("ids"), list)), default=1) \
            if isinstance(specials, dict) else 1
        added = sum(1 for p in pieces if isinstance(p, dict) and "SpecialToken" in p) * per_special
        return Growth(float(max(1, copies)), added)
    if kind in ("BertProcessing", "RobertaProcessing"):
        return Growth(1.0, 4)
    return Growth()


def _decoder_step(node: dict) -> Growth:
    kind = node.get("type")
    if kind == "Replace":
        return _replace_growth(node)
    return Growth()  # ByteLevel, ByteFallback, Fuse, Strip, Metaspace, WordPiece, BPEDecoder, CTC: never longer
    # than the tokens plus a separator each (decode_chars counts two per token)


def _tokenize(data: bytes, p: Path, tokenizer: Path | RecordedTokenizer) -> np.ndarray:
    """The ids of the whole text (UTF-8, at most MAX_TOKENIZE_BYTES), special tokens included."""
    if len(data) > MAX_TOKENIZE_BYTES:
        raise InvalidInputError(f"data {p} is text of {len(data)} bytes, over the {MAX_TOKENIZE_BYTES}-byte limit "
                                "for tokenizing", hint="tokenize it beforehand and give the ids as .npy")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidInputError(f"data {p} is neither token ids nor UTF-8 text (byte {exc.start})") from None
    return np.asarray(TextCodec(tokenizer).encode(text, f"data {p}"), dtype=np.int64)


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
