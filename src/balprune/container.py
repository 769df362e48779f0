"""The safetensors container: a strict header parser and an atomic, streaming writer.

Why not only the ``safetensors`` package: its reader reports malformed files with generic
messages after it has mapped them, and its writer needs every tensor in memory at once. balprune
validates every header field before it allocates anything of the declared size (so a hostile
header cannot make it allocate gigabytes), names the offending tensor in every error, and writes
multi-gigabyte outputs one tensor at a time. Files written here are ordinary safetensors files:
the tests read them back with the official reader.

Layout of a safetensors file: 8 bytes little-endian header length N, N bytes of UTF-8 JSON (an
object: tensor name -> {dtype, shape, data_offsets}, plus an optional ``__metadata__`` object of
string -> string), then the data buffer. ``data_offsets`` are [begin, end) into the buffer; the
tensors must tile the buffer exactly: no gaps, no overlaps, no trailing bytes.
"""

from __future__ import annotations

import errno
import json
import math
import os
import stat
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import torch

from . import safeio
from .errors import InvalidInputError, OutputError

#: Header lengths beyond this are refused before reading them (the official reader uses 100 MB).
MAX_HEADER_BYTES = 100_000_000

#: Largest dimension and element count a tensor may declare (torch sizes are int64).
INT64_MAX = 2**63 - 1

#: Safetensors dtype code -> size in bits. Sub-byte codes are known so they can pass through.
DTYPE_BITS: dict[str, int] = {
    "BOOL": 8, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8, "F8_E8M0": 8,
    "I16": 16, "U16": 16, "F16": 16, "BF16": 16,
    "I32": 32, "U32": 32, "F32": 32,
    "I64": 64, "U64": 64, "F64": 64, "C64": 64,
    "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6,
}

#: Safetensors dtype code <-> torch dtype, for the codes this torch build can hold.
_TORCH_DTYPES: dict[str, str] = {
    "BOOL": "bool", "U8": "uint8", "I8": "int8", "I16": "int16", "U16": "uint16",
    "F16": "float16", "BF16": "bfloat16", "I32": "int32", "U32": "uint32", "F32": "float32",
    "I64": "int64", "U64": "uint64", "F64": "float64", "C64": "complex64",
    "F8_E5M2": "float8_e5m2", "F8_E4M3": "float8_e4m3fn", "F8_E8M0": "float8_e8m0fnu",
}
TORCH_FROM_CODE: dict[str, torch.dtype] = {
    code: getattr(torch, name) for code, name in _TORCH_DTYPES.items() if hasattr(torch, name)
}
CODE_FROM_TORCH: dict[torch.dtype, str] = {dt: code for code, dt in TORCH_FROM_CODE.items()}

#: Floating dtypes balprune prunes (everything else passes through byte-exact).
PRUNABLE_CODES = frozenset({"F16", "BF16", "F32", "F64"})


def dtype_code(dtype: torch.dtype, *, name: str) -> str:
    """The safetensors code of a torch dtype; InvalidInputError naming the tensor if none."""
    try:
        return CODE_FROM_TORCH[dtype]
    except KeyError:
        raise InvalidInputError(
            f"tensor {name!r}: dtype {dtype} cannot be stored in safetensors",
            hint="convert it (e.g. dequantize) before pruning",
        ) from None


@dataclass(frozen=True)
class TensorEntry:
    """One tensor of a parsed header; ``begin``/``end`` are absolute file offsets."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class ParsedFile:
    """A validated safetensors file: entries in header order and the metadata (or None)."""

    path: Path
    entries: tuple[TensorEntry, ...]
    metadata: dict[str, str] | None
    header_bytes: bytes
    file_size: int

    def entry(self, name: str) -> TensorEntry:
        for e in self.entries:
            if e.name == name:
                return e
        raise KeyError(name)


#: Names no tensor may have: safetensors' metadata key, and any name holding balprune's part separator
#: (a packed tensor's parts are stored as ``<tensor>::<part>``: such a name could collide with a part).
RESERVED_NAME = "__metadata__"
PART_SEPARATOR = "::"


def check_tensor_name(name: object, where: str, error: type[InvalidInputError] = InvalidInputError) -> str:
    """``name`` if balprune may read and write it as a tensor name; ``error`` (exit 4) naming ``where`` otherwise.

    The one rule for every name going into or coming out of a file: a string, Unicode text (a lone
    surrogate, which pickles and JSON escapes can carry, cannot be written as UTF-8), not
    ``__metadata__``, without the part separator ``::``.
    """
    if not isinstance(name, str):
        raise error(f"{where}: tensor names must be strings, got {type(name).__name__}")
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        raise error(f"{where}: tensor name {ascii(name)[:80]} is not Unicode text (a lone surrogate)") from None
    if name == RESERVED_NAME:
        raise error(f"{where}: a tensor may not be named {RESERVED_NAME!r} (reserved by safetensors)")
    if PART_SEPARATOR in name:
        raise error(f"{where}: tensor name {short_repr(name)} holds {PART_SEPARATOR!r}, the packed format's part separator")
    return name


def _bad(path: Path, what: str) -> InvalidInputError:
    return InvalidInputError(f"{path}: not a valid safetensors file: {what}")


def short_repr(v: object) -> str:
    """A value for an error line: repr, cut to 60 characters (a hostile field can be megabytes)."""
    r = repr(v)
    return r if len(r) <= 60 else r[:57] + "..."


def _strict_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def parse_file(path: str | os.PathLike[str]) -> ParsedFile:
    """Parse and validate a safetensors file's header without reading its data.

    Raises InvalidInputError (naming the file and, where one is at fault, the tensor) when the
    file is too short, the header length is beyond the file or absurd, the header is not a UTF-8
    JSON object, an entry is malformed, dtype x shape disagrees with the byte span, or the spans
    do not tile the data buffer exactly.
    """
    p = Path(path)
    try:
        with safeio.open_regular(p, "input") as f:  # a FIFO or device is refused before any read
            size = os.fstat(f.fileno()).st_size
            if size < 8:
                raise _bad(p, f"file is {size} bytes, shorter than the 8-byte header length")
            (n,) = struct.unpack("<Q", f.read(8))
            if n > MAX_HEADER_BYTES:
                raise _bad(p, f"header length {n} exceeds the {MAX_HEADER_BYTES}-byte limit")
            if n > size - 8:
                raise _bad(p, f"header length {n} runs past the end of the {size}-byte file")
            if n == 0:
                raise _bad(p, "header length is 0")
            header_bytes = f.read(n)
    except OSError as exc:
        raise InvalidInputError(f"{p}: cannot read: {exc.strerror or exc}") from None
    try:
        text = header_bytes.decode("utf-8")
    except UnicodeDecodeError:
        raise _bad(p, "header is not UTF-8") from None
    try:  # bounded nesting (a deeply nested header is exit 4, not a RecursionError), unique keys
        header = safeio.loads_json(text, "header")
    except InvalidInputError as exc:
        raise _bad(p, exc.message) from None
    if not isinstance(header, dict):
        raise _bad(p, "header is not a JSON object")

    metadata = header.pop("__metadata__", None)
    if metadata is not None:
        if not isinstance(metadata, dict):
            raise _bad(p, "__metadata__ is not an object")
        for k, v in metadata.items():
            if not isinstance(v, str):
                raise _bad(p, f"__metadata__[{short_repr(k)}] is not a string")

    data_start = 8 + n
    buffer_len = size - data_start
    entries: list[TensorEntry] = []
    for name, info in header.items():
        where = f"tensor {short_repr(name)}"
        if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
            raise _bad(p, f"{where}: entry must hold exactly dtype, shape and data_offsets")
        dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        if not isinstance(dtype, str) or dtype not in DTYPE_BITS:
            raise _bad(p, f"{where}: unknown dtype {short_repr(dtype)}")
        if not isinstance(shape, list) or not all(_strict_int(d) and 0 <= d <= INT64_MAX for d in shape):
            raise _bad(p, f"{where}: shape must be a list of integers in [0, 2^63), got {short_repr(shape)}")
        if math.prod(d for d in shape if d) > INT64_MAX:  # torch could not even describe it
            raise _bad(p, f"{where}: shape {short_repr(shape)} has more than 2^63 elements")
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(_strict_int(o) and o >= 0 for o in offsets)
            or offsets[0] > offsets[1]
        ):
            raise _bad(p, f"{where}: data_offsets must be [begin, end] with 0 <= begin <= end")
        begin, end = offsets
        if end > buffer_len:
            raise _bad(p, f"{where}: data ends at {end}, past the {buffer_len}-byte data buffer (truncated?)")
        bits = math.prod(shape) * DTYPE_BITS[dtype]
        if bits % 8 != 0 or bits // 8 != end - begin:
            raise _bad(
                p, f"{where}: {dtype} x {shape} needs {bits / 8:g} bytes but spans {end - begin}"
            )
        entries.append(TensorEntry(name, dtype, tuple(shape), data_start + begin, data_start + end))

    cursor = data_start
    for e in sorted(entries, key=lambda e: (e.begin, e.end)):
        if e.begin < cursor:
            raise _bad(p, f"tensor {e.name!r}: overlaps the tensor before it")
        if e.begin > cursor:
            raise _bad(p, f"tensor {e.name!r}: {e.begin - cursor} unaccounted bytes before it")
        cursor = e.end
    if cursor != size:
        raise _bad(p, f"{size - cursor} trailing bytes after the last tensor")
    return ParsedFile(p, tuple(entries), metadata, header_bytes, size)


def read_bytes(path: Path, begin: int, end: int) -> bytearray:
    """Read [begin, end) of a file into a fresh bytearray (positional read, no shared state).

    The file is reopened through safeio.open_regular (a path swapped for a FIFO or a device since
    it was parsed is refused, never read), and [begin, end) must lie inside it.
    """
    with safeio.open_regular(path, "input") as f:
        size = os.fstat(f.fileno()).st_size
        if not 0 <= begin <= end <= size:
            raise InvalidInputError(f"{path}: file shrank while reading (truncated?)")
        out = bytearray(end - begin)
        view = memoryview(out)
        f.seek(begin)
        got = 0
        while got < len(out):
            n = f.readinto(view[got:])
            if not n:
                raise InvalidInputError(f"{path}: file shrank while reading (truncated?)")
            got += n
    return out


def tensor_from_bytes(buf: bytearray, dtype: str, shape: tuple[int, ...], *, name: str) -> torch.Tensor:
    """A CPU tensor over ``buf`` (no copy); InvalidInputError if torch cannot hold ``dtype``."""
    tdt = TORCH_FROM_CODE.get(dtype)
    if tdt is None:
        raise InvalidInputError(f"tensor {name!r}: dtype {dtype} has no torch equivalent")
    if len(buf) == 0:
        return torch.empty(shape, dtype=tdt)
    return torch.frombuffer(buf, dtype=tdt).reshape(shape)


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """The raw little-endian bytes of a CPU tensor, in row-major order."""
    flat = t.detach().contiguous().reshape(-1)
    if flat.numel() == 0:
        return memoryview(b"")
    return memoryview(flat.view(torch.uint8).numpy())


# --------------------------------------------------------------------------- writing


@dataclass(frozen=True)
class PlannedTensor:
    """A tensor the writer will place: its name, dtype code and shape (bytes come later)."""

    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * DTYPE_BITS[self.dtype] // 8


def _alignment(dtype: str) -> int:
    return max(1, DTYPE_BITS[dtype] // 8)


class StreamingWriter:
    """Writes a safetensors file whose tensor list is known up front, one tensor at a time.

    The header is computed from the plan, so each tensor's bytes can be written at its final
    offset as soon as they exist; memory never holds more than the tensor being written. Tensors
    are laid out by element size (largest first, then plan order) so every tensor starts at an
    offset aligned to its element size. ``finish`` checks every planned tensor was written once.
    The CRC32 of every tensor is kept so the caller can verify the file after it is on disk.
    """

    def __init__(self, fileobj, plan: Iterable[PlannedTensor], metadata: dict[str, str]) -> None:
        self._f = fileobj
        plan = list(plan)
        names = [t.name for t in plan]
        if len(set(names)) != len(names):
            raise ValueError("duplicate tensor names in plan")
        if "__metadata__" in names:
            raise ValueError("a tensor cannot be named __metadata__")
        order = sorted(range(len(plan)), key=lambda i: (-_alignment(plan[i].dtype), i))
        header: dict[str, object] = {"__metadata__": dict(metadata)}
        self._offsets: dict[str, tuple[int, int]] = {}
        self._plan = {t.name: t for t in plan}
        cursor = 0
        for i in order:
            t = plan[i]
            header[t.name] = {"dtype": t.dtype, "shape": list(t.shape), "data_offsets": [cursor, cursor + t.nbytes]}
            self._offsets[t.name] = (cursor, cursor + t.nbytes)
            cursor += t.nbytes
        text = json.dumps(header, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
        text += b" " * (-len(text) % 8)  # pad so the data buffer starts 8-byte aligned
        self.header_bytes = text
        self._data_start = 8 + len(text)
        self.total_bytes = self._data_start + cursor
        self.crc32: dict[str, int] = {}
        self._f.seek(0)
        self._f.write(struct.pack("<Q", len(text)))
        self._f.write(text)

    def write(self, name: str, data: torch.Tensor | bytes | bytearray | memoryview) -> None:
        """Write one planned tensor's bytes (a tensor of the planned dtype and shape, or raw bytes)."""
        planned = self._plan[name]
        if name in self.crc32:
            raise ValueError(f"tensor {name!r} written twice")
        if isinstance(data, torch.Tensor):
            if CODE_FROM_TORCH.get(data.dtype) != planned.dtype or tuple(data.shape) != planned.shape:
                raise ValueError(
                    f"tensor {name!r}: got {data.dtype} {tuple(data.shape)}, planned {planned.dtype} {planned.shape}"
                )
            data = tensor_bytes(data)
        begin, end = self._offsets[name]
        if len(data) != end - begin:
            raise ValueError(f"tensor {name!r}: {len(data)} bytes, planned {end - begin}")
        self._f.seek(self._data_start + begin)
        self._f.write(data)
        self.crc32[name] = zlib.crc32(data)

    def finish(self) -> None:
        missing = sorted(set(self._plan) - set(self.crc32))
        if missing:
            raise ValueError(f"planned tensors never written: {missing[:5]}")
        self._f.flush()


def verify_written(path: Path, header_bytes: bytes, crc32: dict[str, int]) -> ParsedFile:
    """Re-read a freshly written file with the strict parser and check every tensor's CRC32."""
    parsed = parse_file(path)
    if parsed.header_bytes != header_bytes:
        raise OutputError(f"{path}: header read back differs from the header written")
    with open(path, "rb", buffering=0) as f:
        for e in parsed.entries:
            f.seek(e.begin)
            crc, left = 0, e.nbytes
            while left:
                chunk = f.read(min(left, 1 << 24))
                if not chunk:
                    raise OutputError(f"{path}: tensor {e.name!r} is short when read back")
                crc = zlib.crc32(chunk, crc)
                left -= len(chunk)
            if crc != crc32.get(e.name):
                raise OutputError(f"{path}: tensor {e.name!r} differs when read back")
    return parsed


# --------------------------------------------------------------------------- atomic output


class AtomicOutput:
    """An output file that appears at its final path complete and verified, or not at all.

    Construction fails fast (before any heavy work): the folder must exist and accept a file,
    and without ``force`` the final path must not exist; with it, it must be a regular file
    (``check_output_path``: a FIFO, a device or a link to one is never replaced). The temp file
    lives in the target folder (so the final rename is atomic) under a recognisable name,
    ``.<name>.balprune-tmp-<pid>-<8 hex digits>``. ``commit(check)`` flushes, fsyncs, runs ``check(temp_path)``
    and renames; any exception before that removes the temp file. Without ``force`` the rename
    refuses to replace a file that appeared meanwhile.
    """

    def __init__(self, final_path: Path, *, force: bool = False) -> None:
        self.final_path = Path(final_path)
        self.force = force
        folder = self.final_path.parent
        check_output_path(self.final_path, force=force)
        try:
            self.temp_path, self.file = _create_temp(folder, self.final_path.name)
        except OSError as exc:
            raise OutputError(f"cannot write in {folder}: {exc.strerror or exc}") from None
        self._done = False

    def commit(self, check: Callable[[Path], object] | None = None) -> None:
        try:
            self.file.flush()
            os.fsync(self.file.fileno())
            self.file.close()
            if check is not None:
                check(self.temp_path)
            if self.force:
                check_output_path(self.final_path, force=True)  # still a regular file (or gone)?
                os.replace(self.temp_path, self.final_path)
            else:
                try:
                    os.link(self.temp_path, self.final_path)
                except FileExistsError:
                    raise OutputError(f"{self.final_path} appeared while writing", hint="pass --force") from None
                os.unlink(self.temp_path)
            _fsync_dir(self.final_path.parent)
            self._done = True
            COMMITTED.append(self.final_path)
        except OSError as exc:
            raise _output_error(self.final_path, exc) from None

    def discard(self) -> None:
        if not self.file.closed:
            self.file.close()
        if not self._done:
            try:
                os.unlink(self.temp_path)
            except FileNotFoundError:
                pass

    def __enter__(self) -> AtomicOutput:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.discard()
        if isinstance(exc, OSError) and not isinstance(exc, FileNotFoundError):
            raise _output_error(self.final_path, exc) from exc


def check_output_path(path: Path | None, *, force: bool = False) -> None:
    """OutputError (exit 5) unless ``path`` may receive an output file: its folder exists; the path
    does not exist, or (with ``force``) is a regular file or a link to one. ``None`` (an optional
    output not asked for) passes. Commands call it for every output before any long work.

    An existing path that is not a regular file once links are followed (a FIFO, /dev/null, a
    device node, a socket, a folder, or a link to one of those) is never replaced, with or without
    ``force``: replacing the link or node would break whatever it stands for, and nothing is ever
    opened there. Only stat is used: nothing at ``path`` is opened.
    """
    if path is None:
        return
    path = Path(path)
    folder = path.parent
    if not folder.is_dir():
        raise OutputError(f"output folder {folder} does not exist")
    try:
        st = os.stat(path)
    except FileNotFoundError:
        if os.path.islink(path):  # a dangling link: replacing it would write wherever it pointed
            raise OutputError(f"output path {path} is a dangling symbolic link; refusing to replace it") from None
        return
    except OSError as exc:
        raise OutputError(f"output path {path}: {exc.strerror or exc}") from None
    if stat.S_ISDIR(st.st_mode):
        raise OutputError(f"output path {path} is a folder")
    if not stat.S_ISREG(st.st_mode):
        kind = safeio.file_kind(st.st_mode)
        link = " (through a symbolic link)" if os.path.islink(path) else ""
        raise OutputError(f"output path {path} is {kind}{link}, not a regular file; refusing to replace it, "
                          "with or without --force")
    if not force:
        raise OutputError(f"{path} exists", hint="pass --force to replace it")


def _create_temp(folder: Path, name: str):
    """(path, file) of a new, empty regular file ``.<name>.balprune-tmp-<pid>-<random>`` in ``folder``.

    Created with O_EXCL | O_NOFOLLOW: whatever already sits at a name (another process's temp file, a
    FIFO or a link someone planted) is never opened, followed or removed; another random name is tried.
    """
    import secrets

    flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    for attempt in range(16):
        path = folder / f".{name}.balprune-tmp-{os.getpid()}-{secrets.token_hex(4)}"
        try:
            fd = os.open(path, flags, 0o644)
        except FileExistsError:
            if attempt == 15:
                raise
            continue
        return path, os.fdopen(fd, "w+b")
    raise AssertionError("unreachable")


#: Every output this process has committed (complete, verified, renamed into place), in order: an
#: interruption after a commit says which files are complete instead of "no output was written".
COMMITTED: list[Path] = []


def temp_folder_beside(out: Path) -> Path:
    """A new empty folder next to ``out`` (a fresh random name, created exclusively: nothing already
    there is opened or removed), with an ordinary folder's permissions, for building ``out`` whole
    before renaming it into place. OutputError (exit 5) when the parent is not writable."""
    import tempfile

    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.balprune-tmp-{os.getpid()}-", dir=out.parent))
        mask = os.umask(0)
        os.umask(mask)
        os.chmod(tmp, 0o777 & ~mask)  # mkdtemp makes it 0700; the folder is an ordinary output
    except OSError as exc:
        raise OutputError(f"cannot write in {out.parent}: {exc.strerror or exc}") from None
    return tmp


def write_bytes_atomic(path: Path, data: bytes, *, force: bool = True) -> None:
    """Write a small output file (a JSON report, a plot) completely or not at all (AtomicOutput)."""
    with AtomicOutput(Path(path), force=force) as out:
        out.file.write(data)
        out.commit()


def _output_error(path: Path, exc: OSError) -> OutputError:
    reason = {errno.ENOSPC: "disk full", errno.EFBIG: "file too large for this file system"}.get(
        exc.errno or 0, exc.strerror or str(exc)
    )
    return OutputError(f"cannot write {path}: {reason}; nothing was written")


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def check_not_an_input(output: Path, inputs: Iterable[Path]) -> None:
    """UnsafeInputError if ``output`` is one of ``inputs`` (same path, symlink or hard link).

    A shorthand for balprune.iopaths.check_io, the one owner of the output-over-input rules.
    """
    from .iopaths import check_io

    check_io(inputs=[("", f) for f in inputs], outputs=[("", output)])
