"""Safe, lazy checkpoint readers: one tensor at a time, never executing pickled code.

Accepted inputs:
- ``*.safetensors``: parsed strictly (container.parse_file); tensors read on demand.
- a folder or ``*.safetensors.index.json`` (Hugging Face sharded): the index must list exactly
  the tensors its shards hold, checked before anything is read.
- ``*.pt`` / ``*.pth`` / ``*.bin`` (and ``pytorch_model.bin.index.json`` shards): loaded with
  ``torch.load(weights_only=True, mmap=True)``, passed explicitly, never falling back to full
  unpickling. A pickle needing other globals is refused (exit 3) with the globals named, found
  by scanning the opcodes without executing them. ``{"state_dict": ...}`` and ``{"model": ...}``
  wrappers are unwrapped; ``key`` picks another entry (dotted path).

Tied weights (two names over one storage, in torch files) appear once in ``tensors``; the other
names are listed in ``aliases`` (alias -> canonical name).

Hostile files (InvalidInputError, exit 4, before any read or allocation they would cause):
only regular files are read (safeio: a FIFO, device or link to one is refused, every shard
checked before any is read); shard indexes are strict JSON (bounded nesting, no duplicate keys,
a non-empty weight_map of plain file names that stay in the folder after resolving links);
every storage a torch file claims is checked against the bytes the file really holds for it,
and every tensor view against its storage (no stride-0 expansion); a checkpoint with no
tensors is refused.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import pickle
import pickletools
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import torch

from . import container, safeio
from .errors import BalpruneError, InvalidInputError, UnsafeInputError


@dataclass(frozen=True)
class SourceTensor:
    """A tensor of the source checkpoint: name, safetensors dtype code, shape, bytes."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    nbytes: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


class Checkpoint:
    """A read-only view of one checkpoint. Subclasses fill ``tensors`` and implement ``_load``."""

    def __init__(self, display: str, files: list[Path]) -> None:
        self.display = display
        self.files = tuple(files)
        self.tensors: tuple[SourceTensor, ...] = ()
        self.aliases: dict[str, str] = {}

    def load(self, name: str) -> torch.Tensor:
        """The tensor ``name`` on the CPU, in its stored dtype and shape."""
        raise NotImplementedError

    def raw(self, name: str) -> bytes | bytearray | memoryview:
        """The exact stored bytes of ``name`` (for byte-exact pass-through)."""
        return container.tensor_bytes(self.load(name))

    def sha256(self) -> str:
        """sha256 of the single input file; for several files, of the JSON {file: sha256}."""
        digests = {p.name: file_sha256(p) for p in self.files}
        if len(self.files) == 1:
            return next(iter(digests.values()))
        return hashlib.sha256(json.dumps(digests, sort_keys=True).encode()).hexdigest()

    def _check_names(self) -> None:
        """Every tensor and alias name is one balprune can write (container.check_tensor_name)."""
        for name in [t.name for t in self.tensors] + list(self.aliases):
            container.check_tensor_name(name, f"{self.display}")


def file_sha256(path: str | os.PathLike[str], what: str = "checkpoint") -> str:
    """sha256 of a regular file's bytes, read in chunks through safeio (``what`` names it in errors)."""
    h = hashlib.sha256()
    with safeio.open_regular(path, what) as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    return h.hexdigest()


# --------------------------------------------------------------------------- safetensors


class SafetensorsCheckpoint(Checkpoint):
    """One or more safetensors files; each tensor read with one positional read."""

    def __init__(self, display: str, parsed: list[container.ParsedFile], extra_files: list[Path] = ()) -> None:
        super().__init__(display, list(extra_files) + [p.path for p in parsed])
        self._where: dict[str, tuple[container.ParsedFile, container.TensorEntry]] = {}
        tensors = []
        for pf in parsed:
            for e in pf.entries:
                if e.name in self._where:
                    raise InvalidInputError(f"tensor {e.name!r} appears in two shards")
                self._where[e.name] = (pf, e)
                tensors.append(SourceTensor(e.name, e.dtype, e.shape, e.nbytes))
        self.tensors = tuple(tensors)
        self._check_names()

    def load(self, name: str) -> torch.Tensor:
        pf, e = self._where[name]
        buf = container.read_bytes(pf.path, e.begin, e.end)
        return container.tensor_from_bytes(buf, e.dtype, e.shape, name=name)

    def raw(self, name: str) -> bytearray:
        pf, e = self._where[name]
        return container.read_bytes(pf.path, e.begin, e.end)


#: Largest shard index read (an index lists ~100 bytes per tensor: 64 MiB is over 500,000 tensors).
MAX_INDEX_BYTES = 64 << 20


def _read_index(path: Path) -> dict[str, str]:
    """The weight_map of a shard index: a regular file of strict JSON (bounded size and nesting,
    no duplicate keys), a non-empty object of tensor name -> plain file name in the index's folder."""
    data = safeio.loads_json(safeio.read_text(path, "shard index", max_bytes=MAX_INDEX_BYTES), f"shard index {path}")
    wm = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(wm, dict) or not all(isinstance(v, str) for v in wm.values()):
        raise InvalidInputError(f"{path}: shard index needs a weight_map object of name -> file")
    if not wm:
        raise InvalidInputError(f"{path}: the shard index's weight_map is empty (no tensors)")
    for file in set(wm.values()):
        if Path(file).name != file or file in ("", ".", "..") or "\\" in file or "\0" in file:
            raise InvalidInputError(f"{path}: shard file {file!r} is not a plain file name in the index's folder")
    return wm


def _check_shards(index: Path, files: list[str]) -> None:
    """Every listed shard exists, stays inside the index's folder after resolving links, and is a
    regular file: all checked before any shard is read."""
    folder = index.parent
    missing = sorted(f for f in files if not os.path.lexists(folder / f))
    if missing:
        raise InvalidInputError(f"{index}: shard(s) listed in the index are missing: {', '.join(missing)}")
    root = safeio.resolve_links(folder, "folder")
    for f in sorted(files):
        target = safeio.resolve_links(folder / f, "shard")
        if not target.is_relative_to(root):
            raise InvalidInputError(f"{index}: shard {f!r} links to {target}, outside the index's folder {root}")
        safeio.check_regular(folder / f, "shard")


def _open_sharded_safetensors(index: Path) -> SafetensorsCheckpoint:
    wm = _read_index(index)
    folder = index.parent
    listed: dict[str, set[str]] = {}
    for name, file in wm.items():
        listed.setdefault(file, set()).add(name)
    _check_shards(index, list(listed))
    parsed = []
    for file in sorted(listed):
        pf = container.parse_file(folder / file)
        held = {e.name for e in pf.entries}
        unlisted = sorted(held - listed[file])
        absent = sorted(listed[file] - held)
        if unlisted:
            raise InvalidInputError(f"{folder / file}: holds tensor(s) the index does not list: {unlisted[:5]}")
        if absent:
            raise InvalidInputError(f"{folder / file}: lacks tensor(s) the index lists for it: {absent[:5]}")
        parsed.append(pf)
    return SafetensorsCheckpoint(str(index.parent), parsed, [index])


# --------------------------------------------------------------------------- torch pickles


def _pickle_globals(f: BinaryIO) -> list[str]:
    """Globals a torch pickle references, found by reading opcodes (nothing is executed).

    ``f`` is the opened checkpoint: a zip's data.pkl is scanned, else the file's first pickles
    (a legacy torch file holds four before its main one ends).
    """
    f.seek(0)
    try:
        with zipfile.ZipFile(f) as zf:
            pkl = next((n for n in zf.namelist() if n.endswith("data.pkl")), None)
            streams = [io.BytesIO(zf.read(pkl))] if pkl else []
    except zipfile.BadZipFile:
        f.seek(0)
        streams = [f] * 5
    found: list[str] = []
    strings: list[str] = []
    try:
        for stream in streams:
            for op, arg, _ in pickletools.genops(stream):
                if op.name == "GLOBAL":
                    found.append(str(arg).replace(" ", "."))
                elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
                    found.append(f"{strings[-2]}.{strings[-1]}")
                elif isinstance(arg, str):
                    strings.append(arg)
    except BalpruneError:  # an interruption (SIGINT/SIGTERM) is not a corrupt stream
        raise
    except Exception:  # a corrupt stream, or the end of the pickles: report what was found so far
        pass
    return list(dict.fromkeys(found))


def _disallowed(globals_found: list[str]) -> list[str]:
    try:
        from torch._weights_only_unpickler import _get_allowed_globals

        allowed = set(_get_allowed_globals())
    except Exception:  # private API moved: fall back to torch's own message alone
        return []
    safe_prefixes = ("torch._utils.", "collections.OrderedDict", "torch.storage", "torch.serialization")
    return [g for g in globals_found if g not in allowed and not g.startswith(safe_prefixes)
            and not g.endswith("Storage")]


# What a torch file's storages claim, read before torch.load allocates or maps any of them.
#
# torch.load(mmap=True) maps each storage at its record's offset with the size the *pickle*
# claims, unchecked against the record: a storage claiming more than its record reads the zip's
# own bytes (or past the file) as weights. A legacy (pre-zip) file allocates every storage at its
# claimed size before reading it. So the claims are collected first by a dry run of the pickle
# with inert stand-ins for every global (nothing of the file's is imported or called), and checked
# against the zip's record sizes or the legacy file's remaining bytes.

_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C


class _Inert:
    """Stands in for any global during the dry run: accepts every call, state and item, does nothing."""

    _global = ""

    def __new__(cls, *args, **kwargs):
        return object.__new__(cls)

    def __init__(self, *args, **kwargs) -> None:
        pass

    def __setstate__(self, state) -> None:
        pass

    def __setitem__(self, key, value) -> None:
        pass

    def append(self, value) -> None:
        pass

    def extend(self, values) -> None:
        pass


class _DryRun(pickle.Unpickler):
    """Unpickles with inert stand-ins and records each storage's claimed byte size by key."""

    def __init__(self, f, claims: dict[str, int], what: str) -> None:
        super().__init__(f, encoding="utf-8")
        self.claims, self.what = claims, what

    def find_class(self, module: str, name: str):
        return type("_Global", (_Inert,), {"_global": f"{module}.{name}"})

    def persistent_load(self, pid):
        if not isinstance(pid, tuple) or len(pid) < 5 or pid[0] != "storage":
            return _Inert()
        storage_type, key, numel = pid[1], pid[2], pid[4]
        itemsize = _storage_itemsize(getattr(storage_type, "_global", ""))
        if itemsize is None:  # not a torch storage class: torch.load refuses it itself
            return _Inert()
        if not isinstance(numel, int) or isinstance(numel, bool) or numel < 0:
            raise InvalidInputError(f"{self.what}: storage {str(key)[:40]!r} claims a size of {str(numel)[:40]!r} elements")
        self.claims[str(key)] = max(self.claims.get(str(key), 0), numel * itemsize)
        return _Inert()


def _storage_itemsize(qualname: str) -> int | None:
    """Bytes per element of the torch storage class ``torch.<Name>Storage`` (None: not one)."""
    module, _, name = qualname.rpartition(".")
    if module != "torch" or not name.endswith("Storage"):
        return None
    if name == "UntypedStorage":
        return 1
    import warnings

    with warnings.catch_warnings():  # TypedStorage is deprecated; its .dtype still names the element type
        warnings.simplefilter("ignore")
        cls = getattr(torch, name, None)
        dtype = getattr(cls, "dtype", None) if isinstance(cls, type) else None
    return dtype.itemsize if isinstance(dtype, torch.dtype) else None


def _dry_run(stream, claims: dict[str, int], what: str) -> object:
    """One pickle of ``stream`` through _DryRun; None when it is not a readable pickle (torch.load
    then reports the file as corrupt or unsafe itself)."""
    try:
        return _DryRun(stream, claims, what).load()
    except BalpruneError:
        raise
    except Exception:
        return None


def _check_zip_claims(f: BinaryIO, path: Path, size: int) -> None:
    """A torch zip checkpoint's structure and every storage claim, before torch.load maps anything.

    Refused (InvalidInputError, exit 4): duplicate or compressed members (torch writes each
    record once, stored), members reaching past the end of the file, a storage without its
    ``<archive>/data/<key>`` record or claiming more bytes than the record holds.
    """
    f.seek(0)
    try:
        with zipfile.ZipFile(f) as zf:
            infos = zf.infolist()
            if not infos:
                raise InvalidInputError(f"{path}: not a readable torch checkpoint (an empty zip archive)")
            names = [i.filename for i in infos]
            if len(set(names)) != len(names):
                dup = next(n for n in names if names.count(n) > 1)
                raise InvalidInputError(f"{path}: the zip archive holds {dup!r} twice")
            for i in infos:
                if i.compress_type != zipfile.ZIP_STORED:
                    raise InvalidInputError(f"{path}: zip member {i.filename!r} is compressed; torch.save stores "
                                            "records uncompressed", hint="re-save it with torch.save")
                if i.header_offset + i.file_size > size:
                    raise InvalidInputError(f"{path}: zip member {i.filename!r} claims {i.file_size} bytes at "
                                            f"offset {i.header_offset}, past the end of the {size}-byte file")
            archive = names[0].split("/", 1)[0]
            records = {i.filename: i.file_size for i in infos}
            pkl = f"{archive}/data.pkl"
            if pkl not in records:
                return  # torch.load reports the missing pickle itself
            claims: dict[str, int] = {}
            with zf.open(pkl) as stream:
                _dry_run(stream, claims, str(path))
    except zipfile.BadZipFile as exc:
        raise InvalidInputError(f"{path}: not a readable torch checkpoint (broken zip archive: {exc})") from None
    except (OSError, EOFError, ValueError) as exc:
        raise InvalidInputError(f"{path}: not a readable torch checkpoint ({type(exc).__name__}: {exc})") from None
    for key, claimed in sorted(claims.items()):
        held = records.get(f"{archive}/data/{key}")
        if held is None:
            raise InvalidInputError(f"{path}: storage {key[:40]!r} has no record {archive}/data/{key[:40]} in the archive")
        if claimed > held:
            raise InvalidInputError(f"{path}: storage {key[:40]!r} claims {claimed} bytes, its record holds {held}")


def _check_legacy_claims(f: BinaryIO, path: Path, size: int) -> None:
    """A legacy (pre-zip) torch file's storage claims, before torch.load allocates them.

    The storages follow the main pickle: their claimed bytes must fit in what remains of the file,
    and in memory (a legacy file cannot be memory-mapped; it is loaded whole).
    """
    f.seek(0)
    claims: dict[str, int] = {}
    if _dry_run(f, claims, str(path)) != _LEGACY_MAGIC:
        return  # not a legacy torch file: torch.load refuses it
    for _ in range(2):  # protocol version, system info
        _dry_run(f, claims, str(path))
    _dry_run(f, claims, str(path))
    total = sum(claims.values())
    remaining = max(0, size - f.tell())
    if total > remaining:
        raise InvalidInputError(f"{path}: its storages claim {total} bytes; the file holds {remaining} bytes after "
                                "its pickle")
    safeio.check_fits_memory(total, f"{path}: a legacy (pre-zip) torch file is loaded whole: it",
                             hint="re-save it with a current torch.save (zip format, memory-mapped) or as safetensors")


def _fd_path(f: BinaryIO, path: Path) -> str | Path:
    """A path naming the very file open as ``f`` (Linux: /proc/self/fd/N), so torch.load, which
    opens by path for mmap, reads the file that was checked, not whatever the path names now."""
    proc = f"/proc/self/fd/{f.fileno()}"
    return proc if os.path.exists(proc) else path


def _torch_load(path: Path) -> object:
    """torch.load(weights_only=True) of a regular file, every storage claim checked first.

    Zip files are memory-mapped; legacy files are loaded whole. A pickle needing globals outside
    torch's safe set is refused (UnsafeInputError, exit 3); anything else unreadable is an
    InvalidInputError (exit 4). SIGINT/SIGTERM (Interrupted) pass through untouched.
    """
    with safeio.open_regular(path, "checkpoint") as f:
        size = os.fstat(f.fileno()).st_size
        is_zip = f.read(4) == b"PK\x03\x04"  # torch's own test for its zip format
        try:
            if is_zip:
                _check_zip_claims(f, path, size)
            else:
                _check_legacy_claims(f, path, size)
            return _load_checked(f, path, is_zip)
        except BalpruneError:
            raise
        except pickle.UnpicklingError as exc:
            bad = _disallowed(_pickle_globals(f)) or _unsupported_from_message(str(exc))
            if bad:
                module_like = any(g.startswith("torch.nn.modules") or g.startswith("__main__") for g in bad)
                hint = ("save model.state_dict() instead of the whole model, or convert it to safetensors in a "
                        "trusted environment" if module_like else
                        "if you trust the file, convert it to safetensors in a trusted environment")
                raise UnsafeInputError(
                    f"{path}: refused: the pickle needs globals outside torch's safe set: {', '.join(bad)}",
                    hint=hint,
                ) from None
            raise InvalidInputError(f"{path}: not a readable torch checkpoint (corrupt pickle stream)") from None
        except Exception as exc:  # torch.load fails in many ways on corrupt files (KeyError, EOFError, ...)
            first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise InvalidInputError(
                f"{path}: not a readable torch checkpoint ({type(exc).__name__}: {first[:200]})") from None


def load_torch_file(path: str | Path) -> object:
    """Any torch file a user hands over (a checkpoint, a run's saved state), loaded as ``open_checkpoint``
    loads one: regular files only, storage claims checked, weights_only, interruptions passed through."""
    return _torch_load(Path(path))


def _load_checked(f: BinaryIO, path: Path, is_zip: bool) -> object:
    import warnings

    # torch warns about old pickle protocols and the like on stderr; balprune's contract is
    # one line per error, so its own messages are the only ones shown.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if is_zip:
            return torch.load(_fd_path(f, path), map_location="cpu", weights_only=True, mmap=True)
        # Legacy (pre-zipfile) format cannot be memory-mapped: load it whole, still safely.
        f.seek(0)
        return torch.load(f, map_location="cpu", weights_only=True)


def _unsupported_from_message(msg: str) -> list[str]:
    import re

    return list(dict.fromkeys(re.findall(r"GLOBAL ([\w.]+)", msg)))


def _select_state_dict(obj: object, path: Path, key: str | None) -> Mapping:
    if key is not None:
        for part in key.split("."):
            if not isinstance(obj, Mapping) or part not in obj:
                keys = list(obj.keys())[:20] if isinstance(obj, Mapping) else []
                raise InvalidInputError(f"{path}: --key {key!r} not found (keys here: {keys})")
            obj = obj[part]
    else:
        for _ in range(2):
            if isinstance(obj, Mapping) and not _all_tensors(obj):
                wrappers = [w for w in ("state_dict", "model") if isinstance(obj.get(w), Mapping)]
                if len(wrappers) > 1:  # two candidates: choosing one would drop the other's weights silently
                    raise InvalidInputError(f"{path}: both 'state_dict' and 'model' hold a mapping; top-level keys: "
                                            f"{[str(k)[:40] for k in list(obj.keys())[:20]]}",
                                            hint="choose the entry holding the weights with --key NAME")
                if not wrappers:
                    break
                obj = obj[wrappers[0]]
    if not isinstance(obj, Mapping):
        raise InvalidInputError(f"{path}: expected a state dict (name -> tensor), found {type(obj).__name__}")
    if not _all_tensors(obj):
        bad = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
        raise InvalidInputError(
            f"{path}: not a state dict: non-tensor entries {bad[:10]}; top-level keys: {list(obj.keys())[:20]}",
            hint="choose the entry holding the weights with --key NAME",
        )
    return obj


def _all_tensors(m: Mapping) -> bool:
    return all(isinstance(v, torch.Tensor) for v in m.values())


class TorchCheckpoint(Checkpoint):
    """A state dict from one or more torch pickles, loaded safely and memory-mapped."""

    def __init__(self, display: str, files: list[Path], dicts: list[Mapping]) -> None:
        super().__init__(display, files)
        self._tensors: dict[str, torch.Tensor] = {}
        seen: dict[tuple, str] = {}
        tensors = []
        for sd in dicts:
            for name, t in sd.items():
                name = str(name)
                if name in self._tensors or name in self.aliases:
                    raise InvalidInputError(f"tensor {name!r} appears twice")
                if t.is_meta:  # a state dict of a model built on the meta device: shapes, no values
                    raise InvalidInputError(f"{display}: tensor {name!r} has no data (a meta-device tensor)",
                                            hint="save the state dict of a model whose weights are loaded")
                if t.is_quantized or t.layout != torch.strided:
                    raise InvalidInputError(
                        f"tensor {name!r}: {'quantized' if t.is_quantized else str(t.layout)} tensors cannot be stored in safetensors",
                        hint="dequantize or densify it, or drop it from the state dict",
                    )
                code = container.dtype_code(t.dtype, name=name)
                _check_view(t, name, display)
                if t.numel():
                    key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)
                    if key in seen:
                        self.aliases[name] = seen[key]
                        continue
                    seen[key] = name
                self._tensors[name] = t
                nbytes = t.numel() * t.element_size()
                tensors.append(SourceTensor(name, code, tuple(t.shape), nbytes))
        self.tensors = tuple(tensors)
        self._check_names()

    def load(self, name: str) -> torch.Tensor:
        return self._tensors[name].contiguous()


def _check_view(t: torch.Tensor, name: str, where: str) -> None:
    """A loaded tensor's view must lie in its storage and not expand it.

    A stride of 0 (or any overlap) lets a few stored bytes stand for GiBs once made contiguous:
    refused (exit 4) with the figures, before anything is allocated. The storage's own size was
    checked against the file before loading (_check_zip_claims / _check_legacy_claims).
    """
    if t.numel() == 0:
        return
    if any(st < 0 for st in t.stride()) or t.storage_offset() < 0:
        raise InvalidInputError(f"{where}: tensor {name!r} has a negative stride or offset")
    extent = 1 + sum((n - 1) * st for n, st in zip(t.shape, t.stride()))
    if t.numel() > extent:
        raise InvalidInputError(
            f"{where}: tensor {name!r} of shape {list(t.shape)} views only {extent} stored elements "
            f"(strides {list(t.stride())}): it would expand from {extent * t.element_size()} to "
            f"{t.numel() * t.element_size()} bytes", hint="save t.contiguous() (or t.clone()) instead of an expanded view")
    if (t.storage_offset() + extent) * t.element_size() > t.untyped_storage().nbytes():
        raise InvalidInputError(f"{where}: tensor {name!r} reaches past the end of its storage")


def _open_sharded_torch(index: Path, key: str | None) -> TorchCheckpoint:
    wm = _read_index(index)
    folder = index.parent
    files = sorted(set(wm.values()))
    _check_shards(index, files)
    dicts = []
    for f in files:
        sd = _select_state_dict(_torch_load(folder / f), folder / f, key)
        listed = {n for n, file in wm.items() if file == f}
        if set(sd) != listed:
            extra, absent = sorted(set(sd) - listed), sorted(listed - set(sd))
            raise InvalidInputError(
                f"{folder / f}: tensors disagree with the index (unlisted {extra[:5]}, missing {absent[:5]})"
            )
        dicts.append(sd)
    return TorchCheckpoint(str(folder), [index] + [folder / f for f in files], dicts)


# --------------------------------------------------------------------------- entry point

TORCH_SUFFIXES = {".pt", ".pth", ".bin", ".ckpt"}


def open_checkpoint(path: str | Path, key: str | None = None) -> Checkpoint:
    """Open any supported checkpoint (see module doc). InvalidInputError / UnsafeInputError."""
    p = Path(path)
    if not p.exists():
        if p.is_symlink():
            raise InvalidInputError(f"{p}: a link to a missing file")
        raise InvalidInputError(f"{p}: no such file or folder")
    if p.is_dir():
        indexes = sorted(p.glob("*.safetensors.index.json")) + sorted(p.glob("*.bin.index.json"))
        if len(indexes) == 1 and indexes[0].name.endswith(".safetensors.index.json") \
                and os.path.lexists(p / "model.safetensors"):
            # transformers loads model.safetensors, an index reader the shards: two models in one folder
            raise InvalidInputError(f"{p}: holds both model.safetensors and {indexes[0].name} (transformers loads "
                                    "the first, a shard index names others): ambiguous",
                                    hint="remove the one that is stale, or pass the file you mean")
        if len(indexes) == 1:
            p = indexes[0]
        elif len(indexes) > 1:
            raise InvalidInputError(f"{p}: several shard indexes ({', '.join(i.name for i in indexes)}); pass one")
        else:
            singles = sorted(p.glob("*.safetensors"))
            if len(singles) != 1:
                raise InvalidInputError(f"{p}: no shard index and {len(singles)} safetensors files; pass a file")
            p = singles[0]
    ckpt = _open_file(p, key)
    if not ckpt.tensors:
        raise InvalidInputError(f"no tensors in {ckpt.display}: nothing to prune or load",
                                hint="check --key, or that this is the checkpoint you meant")
    return ckpt


def _open_file(p: Path, key: str | None) -> Checkpoint:
    """Dispatch on the file name; a FIFO, device or link to one is refused before any read."""
    name = p.name
    safeio.check_regular(p, "checkpoint")
    if name.endswith(".safetensors.index.json"):
        return _open_sharded_safetensors(p)
    if name.endswith(".index.json"):
        return _open_sharded_torch(p, key)
    if p.suffix == ".safetensors":
        if key is not None:
            raise InvalidInputError(f"{p}: --key applies to torch pickles, not safetensors")
        return SafetensorsCheckpoint(str(p), [container.parse_file(p)])
    if p.suffix in TORCH_SUFFIXES:
        sd = _select_state_dict(_torch_load(p), p, key)
        return TorchCheckpoint(str(p), [p], [sd])
    raise InvalidInputError(
        f"{p}: unsupported checkpoint type {p.suffix or '(no suffix)'}",
        hint="use .safetensors, .pt/.pth/.bin, or a sharded folder",
    )
