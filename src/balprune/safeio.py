"""Hostile-proof reading primitives: the one owner of "may this file be read, and how deep may it nest".

Every reader of a user-supplied file (checkpoints, packed files, shard indexes, TOML configs and
recipes, bench reports, calibration and token files) goes through these, so the rules of
../shared/bad-inputs.md (items 28-30) hold in one place:

- only regular files are read: a FIFO, a device node, a socket or a link to one is refused *before*
  any read (opening with O_NONBLOCK, then fstat on the open descriptor, so neither a FIFO without a
  writer nor a swap of the path between the check and the open can make us block or read a device);
- a file read whole is bounded by a byte limit checked against its real size;
- JSON and TOML text is scanned for its nesting depth before a recursive parser sees it
  (``json``/``tomllib`` raise RecursionError past ~1000 levels: exit 70 otherwise);
- JSON objects with duplicate keys are refused (a later key silently overriding an earlier one is
  how two tools read one file two ways).

Errors are InvalidInputError (exit 4) naming the file; nothing here prints.
"""

from __future__ import annotations

import errno
import json
import os
import re
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

from .errors import InvalidInputError

#: Deepest nesting of arrays/objects (JSON) or arrays/inline tables (TOML) any balprune file needs.
#: Headers, manifests, shard indexes and reports are 2-4 levels deep; 64 leaves room for any
#: honest file and keeps recursive parsers far from Python's recursion limit.
MAX_NESTING = 64

#: Default cap for a text file read whole (configs, recipes, indexes, reports).
MAX_TEXT_BYTES = 256 << 20

_KIND = {stat.S_IFIFO: "a FIFO", stat.S_IFCHR: "a character device", stat.S_IFBLK: "a block device",
         stat.S_IFSOCK: "a socket", stat.S_IFDIR: "a folder"}


def file_kind(mode: int) -> str:
    """What a non-regular file is, for a message ("a FIFO", "a character device", ...), from its st_mode."""
    return _KIND.get(stat.S_IFMT(mode), "not a regular file")


def check_regular(path: str | os.PathLike[str], what: str = "input") -> Path:
    """The path, if it names a regular file after following links; InvalidInputError otherwise.

    For checks before work starts (e.g. every shard of a folder). Readers must still open through
    ``open_regular``, which re-checks the opened descriptor.
    """
    p = Path(path)
    try:
        st = os.stat(p)
    except FileNotFoundError:
        raise InvalidInputError(f"{what} {p} does not exist") from None
    except OSError as exc:
        raise InvalidInputError(f"{what} {p}: cannot read: {exc.strerror or exc}") from None
    if not stat.S_ISREG(st.st_mode):
        raise InvalidInputError(f"{what} {p} is {file_kind(st.st_mode)}, not a regular file; refusing to read it")
    return p


def resolve_links(path: str | os.PathLike[str], what: str = "input", *, error: type[Exception] = InvalidInputError) -> Path:
    """``path`` made absolute with every link followed (Path.resolve), or ``error`` naming it when its links
    cannot be followed: a loop (whichever way this Python's resolve() reports one) or a part that cannot
    be read. A dangling link resolves to where it points (the caller's existence check says so)."""
    p = Path(path)
    loop = error(f"{what} {p}: its symbolic links form a loop")
    try:
        resolved = p.resolve()
        os.stat(p)  # Python 3.13's resolve() returns a looping path as it is: the kernel says ELOOP
    except RuntimeError:  # Python 3.10-3.12's resolve() on a loop
        raise loop from None
    except FileNotFoundError:
        return resolved
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise loop from None
        raise error(f"{what} {p}: cannot follow its links: {exc.strerror or exc}") from None
    return resolved


@contextmanager
def open_regular(path: str | os.PathLike[str], what: str = "input") -> Iterator[BinaryIO]:
    """Open a regular file for binary reading, refusing anything else before a byte is read.

    The open uses O_NONBLOCK (a FIFO with no writer would otherwise block the open forever) and the
    type is checked on the opened descriptor, then blocking mode is restored for ordinary reads.
    """
    p = Path(path)
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0)
    try:
        fd = os.open(p, flags)
    except FileNotFoundError:
        raise InvalidInputError(f"{what} {p} does not exist") from None
    except IsADirectoryError:
        raise InvalidInputError(f"{what} {p} is a folder, not a regular file") from None
    except OSError as exc:
        raise InvalidInputError(f"{what} {p}: cannot read: {exc.strerror or exc}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise InvalidInputError(f"{what} {p} is {file_kind(st.st_mode)}, not a regular file; refusing to read it")
        if hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)
        f = os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise
    with f:
        yield f


def read_regular(path: str | os.PathLike[str], what: str = "input", *, max_bytes: int = MAX_TEXT_BYTES) -> bytes:
    """The whole content of a regular file of at most ``max_bytes`` (checked on its real size first)."""
    p = Path(path)
    with open_regular(p, what) as f:
        size = os.fstat(f.fileno()).st_size
        if size > max_bytes:
            raise InvalidInputError(f"{what} {p} is {size} bytes, over the {max_bytes}-byte limit for this kind of file")
        try:  # the real size, not the cap, sizes the buffer (+1 to notice a file that grew meanwhile)
            data = f.read(size + 1)
        except OSError as exc:
            raise InvalidInputError(f"{what} {p}: cannot read: {exc.strerror or exc}") from None
    if len(data) != size:  # grew or shrank while we read: what we hold is not the file
        raise InvalidInputError(f"{what} {p} changed while it was read ({size} bytes, then {len(data)})")
    return data


def read_text(path: str | os.PathLike[str], what: str = "input", *, max_bytes: int = MAX_TEXT_BYTES) -> str:
    """``read_regular`` decoded as strict UTF-8 (InvalidInputError naming the byte offset otherwise)."""
    data = read_regular(path, what, max_bytes=max_bytes)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidInputError(f"{what} {path} is not UTF-8 text (byte {exc.start})") from None


def memory_available() -> int | None:
    """Bytes this process may allocate: the kernel's MemAvailable estimate, else the physical memory,
    else None (unknown: nothing to compare against). Every "does this claim fit in memory" check of a
    file or option (bad-inputs item 30) compares against this one figure; tests patch it here."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def human(nbytes: int) -> str:
    """A byte count for an error line (``1.5 GiB``)."""
    for unit, shift in (("TiB", 40), ("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if nbytes >= 1 << shift:
            return f"{nbytes / (1 << shift):.1f} {unit}"
    return f"{nbytes} bytes"


def check_fits_memory(need: int, what: str, *, hint: str = "run on a machine with more memory",
                      error: type[InvalidInputError] = InvalidInputError) -> None:
    """``error`` (exit 4) with both figures when ``need`` bytes exceed ``memory_available()``.

    Called before every allocation whose size a file or an option decides (a packed file's dense view,
    a legacy torch file loaded whole, a recipe's model, the sensitivity proxy's inputs), so a small
    input claiming a huge size is refused instead of OOM-killed. Unknown memory: nothing to compare.
    """
    avail = memory_available()
    if avail is not None and need > avail:
        raise error(f"{what} needs {human(need)}; {human(avail)} of memory is available", hint=hint)


def check_fits_device(need: int, device, what: str, *, hint: str) -> None:
    """``need`` bytes against where they will live: ``check_fits_memory`` on the CPU (InvalidInputError,
    exit 4), the device's free memory on a GPU (GpuRuntimeError, exit 7: the code of every other GPU
    memory shortage, README). ``device`` a torch.device."""
    if device.type != "cuda":
        check_fits_memory(need, what, hint=hint)
        return
    import torch

    from .errors import GpuRuntimeError

    free = torch.cuda.mem_get_info(device)[0]
    if need > free:
        raise GpuRuntimeError(f"{what} on {device} needs {human(need)}; {human(free)} of GPU memory is free", hint=hint)


def json_depth(text: str) -> int:
    """Deepest nesting of arrays and objects in JSON text (strings skipped; linear, no recursion)."""
    depth = deepest = 0
    in_string = escaped = False
    for ch in text:
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "[{":
            depth += 1
            if depth > deepest:
                deepest = depth
        elif ch in "]}":
            depth -= 1
    return deepest


def _unique_keys(pairs: list[tuple[str, object]]) -> dict[str, object]:
    out: dict[str, object] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {key!r}")
        out[key] = value
    return out


def loads_json(text: str, what: str, *, max_depth: int = MAX_NESTING, constants_as_null: bool = False) -> object:
    """Parse JSON text with bounded nesting, unique object keys, and no NaN/Infinity literals.

    ``what`` names the source in the error ("report r.json", "file x: header"). With
    ``constants_as_null`` the literals NaN / Infinity / -Infinity (which Python's json writes and
    older balprune reports hold) read as null, so the caller's type checks decide whether a missing
    number is allowed there. Raises InvalidInputError (exit 4).
    """
    depth = json_depth(text)
    if depth > max_depth:
        raise InvalidInputError(f"{what}: JSON nested {depth} levels deep, over the limit of {max_depth}")

    def _constant(name: str) -> object:
        if constants_as_null:
            return None
        raise ValueError(f"{name} is not valid JSON")

    try:
        value = json.loads(text, object_pairs_hook=_unique_keys, parse_constant=_constant)
    except (ValueError, RecursionError) as exc:
        raise InvalidInputError(f"{what}: not valid JSON ({exc})") from None
    if _SURROGATE_ESCAPE.search(text):
        _check_no_lone_surrogates(value, what)
    return value


#: A \uD800-\uDFFF escape: the only way JSON decoded from UTF-8 can hold a lone surrogate.
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")


def _check_no_lone_surrogates(value: object, what: str) -> None:
    """Refuse strings that are not Unicode text (a lone surrogate cannot be written as UTF-8: every name
    read here is later written to a file or a terminal). Recursion is bounded by the nesting check."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise InvalidInputError(f"{what}: the string {ascii(value)[:80]} holds a lone surrogate "
                                    "(\\ud800-\\udfff escape without its pair): not Unicode text") from None
    elif isinstance(value, dict):
        for k, v in value.items():
            _check_no_lone_surrogates(k, what)
            _check_no_lone_surrogates(v, what)
    elif isinstance(value, list):
        for v in value:
            _check_no_lone_surrogates(v, what)


def toml_depth(text: str) -> int:
    """Deepest nesting of arrays and inline tables in TOML text (strings and comments skipped).

    Table headers (``[a]``, ``[[a]]``) open and close on their line and count as one or two levels,
    which is harmless against the limit.
    """
    depth = deepest = 0
    i, n = 0, len(text)
    while i < n:
        ch = text[i]
        if ch == "#":
            j = text.find("\n", i)
            i = n if j < 0 else j
            continue
        if ch in "\"'":
            triple = text.startswith(ch * 3, i)
            quote = ch * 3 if triple else ch
            i += len(quote)
            while i < n:
                if ch == '"' and text[i] == "\\":
                    i += 2
                    continue
                if text.startswith(quote, i):
                    i += len(quote)
                    if triple:  # a multi-line string may end in up to two more of its quotes (part of it)
                        extra = 0
                        while extra < 2 and i < n and text[i] == ch:
                            i += 1
                            extra += 1
                    break
                if not triple and text[i] == "\n":  # unterminated: let the parser report it
                    break
                i += 1
            continue
        if ch in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif ch in "]}":
            depth = max(depth - 1, 0)
        i += 1
    return deepest


#: More than MAX_NESTING parts of a dotted key or table name (bare or quoted parts); a string holding such text
#: is refused too (no honest balprune file has one).
#: (The lookbehind starts a match only where a part can start: inside a long run of letters every other start
#: would re-scan the run, quadratic time on a file of one long word.)
_LONG_DOTTED_KEY = re.compile(
    r"""(?<![A-Za-z0-9_-])(?:(?:[A-Za-z0-9_-]+|"[^"\n]*"|'[^'\n]*')[ \t]*\.[ \t]*)"""
    + "{" + str(MAX_NESTING) + "}")


def loads_toml(text: str, what: str, *, max_depth: int = MAX_NESTING) -> dict:
    """Parse TOML text with bounded nesting; InvalidInputError (exit 4) naming ``what`` otherwise."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib
    depth = toml_depth(text)
    if depth > max_depth:
        raise InvalidInputError(f"{what}: TOML nested {depth} levels deep, over the limit of {max_depth}")
    # tomllib's time grows with the square of a dotted key's parts (50,000 parts in 100 KB: minutes, GBs)
    long_key = _LONG_DOTTED_KEY.search(text)
    if long_key is not None:
        raise InvalidInputError(f"{what}: a dotted key or table name of more than {max_depth} parts "
                                f"(line {text.count(chr(10), 0, long_key.start()) + 1})")
    try:
        return tomllib.loads(text)
    except (tomllib.TOMLDecodeError, RecursionError) as exc:
        raise InvalidInputError(f"{what}: not valid TOML ({exc})") from None
    except ValueError as exc:  # an integer of more than 4300 digits: Python's int() limit, inside tomllib
        raise InvalidInputError(f"{what}: not valid TOML ({str(exc)[:120]})") from None
