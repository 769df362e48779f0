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
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import pickle
import pickletools
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from . import container
from .errors import InvalidInputError, UnsafeInputError

RESERVED_SEPARATOR = "::"


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
        digests = {p.name: _file_sha256(p) for p in self.files}
        if len(self.files) == 1:
            return next(iter(digests.values()))
        return hashlib.sha256(json.dumps(digests, sort_keys=True).encode()).hexdigest()

    def _check_names(self) -> None:
        for t in self.tensors:
            if RESERVED_SEPARATOR in t.name or t.name == "__metadata__":
                raise InvalidInputError(
                    f"tensor {t.name!r}: names containing '::' or named __metadata__ are reserved by the packed format"
                )


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb", buffering=0) as f:
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


def _read_index(path: Path) -> dict[str, str]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise InvalidInputError(f"{path}: not a readable shard index ({exc})") from None
    wm = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(wm, dict) or not all(isinstance(v, str) for v in wm.values()):
        raise InvalidInputError(f"{path}: shard index needs a weight_map object of name -> file")
    for file in set(wm.values()):
        if Path(file).name != file or file in (".", ".."):
            raise InvalidInputError(f"{path}: shard file {file!r} is not a plain file name in the index's folder")
    return wm


def _open_sharded_safetensors(index: Path) -> SafetensorsCheckpoint:
    wm = _read_index(index)
    folder = index.parent
    listed: dict[str, set[str]] = {}
    for name, file in wm.items():
        listed.setdefault(file, set()).add(name)
    missing = sorted(f for f in listed if not (folder / f).is_file())
    if missing:
        raise InvalidInputError(f"{index}: shard(s) listed in the index are missing: {', '.join(missing)}")
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


def _pickle_globals(path: Path) -> list[str]:
    """Globals a torch pickle references, found by reading opcodes (nothing is executed)."""
    try:
        with zipfile.ZipFile(path) as zf:
            pkl = next((n for n in zf.namelist() if n.endswith("data.pkl")), None)
            data = zf.read(pkl) if pkl else b""
    except zipfile.BadZipFile:
        data = path.read_bytes()
    found: list[str] = []
    strings: list[str] = []
    try:
        for op, arg, _ in pickletools.genops(io.BytesIO(data)):
            if op.name == "GLOBAL":
                found.append(str(arg).replace(" ", "."))
            elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
                found.append(f"{strings[-2]}.{strings[-1]}")
            elif isinstance(arg, str):
                strings.append(arg)
    except Exception:  # a corrupt stream: report what was found so far
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


def _torch_load(path: Path) -> object:
    import warnings

    try:
        # torch warns about old pickle protocols and the like on stderr; balprune's contract is
        # one line per error, so its own messages are the only ones shown.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as exc:
                if "mmap" not in str(exc) and "zipfile" not in str(exc):
                    raise
                # Legacy (pre-zipfile) format cannot be memory-mapped: load it whole, still safely.
                return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        msg = str(exc)
        bad = _disallowed(_pickle_globals(path)) or _unsupported_from_message(msg)
        if bad:
            module_like = any(g.startswith("torch.nn.modules") or g.startswith("__main__") for g in bad)
            hint = ("save model.state_dict() instead of the whole model, or convert it to safetensors in a trusted environment"
                    if module_like else
                    "if you trust the file, convert it to safetensors in a trusted environment")
            raise UnsafeInputError(
                f"{path}: refused: the pickle needs globals outside torch's safe set: {', '.join(bad)}",
                hint=hint,
            ) from None
        raise InvalidInputError(f"{path}: not a readable torch checkpoint (corrupt pickle stream)") from None
    except Exception as exc:  # torch.load fails in many ways on corrupt files (KeyError, EOFError, ...)
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise InvalidInputError(f"{path}: not a readable torch checkpoint ({type(exc).__name__}: {first[:200]})") from None


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
                for wrapper in ("state_dict", "model"):
                    if isinstance(obj.get(wrapper), Mapping):
                        obj = obj[wrapper]
                        break
                else:
                    break
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
                if t.is_quantized or t.layout != torch.strided:
                    raise InvalidInputError(
                        f"tensor {name!r}: {'quantized' if t.is_quantized else str(t.layout)} tensors cannot be stored in safetensors",
                        hint="dequantize or densify it, or drop it from the state dict",
                    )
                code = container.dtype_code(t.dtype, name=name)
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


def _open_sharded_torch(index: Path, key: str | None) -> TorchCheckpoint:
    wm = _read_index(index)
    folder = index.parent
    files = sorted(set(wm.values()))
    missing = [f for f in files if not (folder / f).is_file()]
    if missing:
        raise InvalidInputError(f"{index}: shard(s) listed in the index are missing: {', '.join(missing)}")
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
        raise InvalidInputError(f"{p}: no such file or folder")
    if p.is_dir():
        indexes = sorted(p.glob("*.safetensors.index.json")) + sorted(p.glob("*.bin.index.json"))
        if len(indexes) == 1:
            p = indexes[0]
        elif len(indexes) > 1:
            raise InvalidInputError(f"{p}: several shard indexes ({', '.join(i.name for i in indexes)}); pass one")
        else:
            singles = sorted(p.glob("*.safetensors"))
            if len(singles) != 1:
                raise InvalidInputError(f"{p}: no shard index and {len(singles)} safetensors files; pass a file")
            p = singles[0]
    name = p.name
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
