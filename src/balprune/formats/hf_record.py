"""What a Hugging Face folder needs besides its weights: recorded by ``prune``, read back by ``unpack``.

When the checkpoint ``prune`` reads has a ``config.json`` beside its weights (an HF folder), the
folder's small text files are stored in the packed file's ``__metadata__``, one key per file
(``hf:<file name>``, the file's text as it was), so the packed file alone can be given back as a
folder ``from_pretrained`` loads (``balprune unpack --hf-folder``). The files and their caps are
``HF_FILES``; each is a JSON object (config.json with a string ``model_type``).

One owner of these rules, for both directions:

- ``read_folder`` reads them from a source folder (``prune``, and ``unpack --like``) through safeio:
  regular files only, size-capped, strict UTF-8 JSON with bounded nesting and unique keys. A file
  over its cap that is not config.json is left out with a note (a legitimately big tokenizer must not
  stop a prune); config.json over its cap, or any file that is not a JSON object, is refused (exit 4).
- ``check_metadata`` types and bounds the keys a packed file holds (every reader: read_packed), and
  ``parse_texts`` checks their content (verify, and unpack before it writes anything).

The record's JSON-escaped total is capped (``MAX_RECORD_CHARS``) so the packed file's header stays
well under the container's header limit whatever the manifest holds.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from .. import safeio
from ..container import short_repr
from ..errors import FormatError, InvalidInputError

#: File name -> largest size recorded (bytes). Honest config files are 1-50 KB; a tokenizer.json of a
#: 128k-vocabulary model is about 9 MB, a tokenizer_config.json with chat templates up to a few hundred KB.
HF_FILES: dict[str, int] = {
    "config.json": 1 << 20,
    "generation_config.json": 1 << 20,
    "tokenizer.json": 32 << 20,
    "tokenizer_config.json": 4 << 20,
    "special_tokens_map.json": 1 << 20,
}

#: The ``__metadata__`` key of a recorded file is this prefix and its name (``hf:config.json``).
KEY_PREFIX = "hf:"

#: Largest JSON-escaped size of all recorded texts together (the container refuses headers over 100 MB).
MAX_RECORD_CHARS = 64 << 20

#: Longest ``model_type`` accepted (transformers' are short identifiers).
MAX_MODEL_TYPE = 128


def metadata_key(name: str) -> str:
    return KEY_PREFIX + name


def is_record_key(key: str) -> bool:
    """Whether a ``__metadata__`` key is one of the record's (a known file name behind the prefix)."""
    return key.startswith(KEY_PREFIX) and key[len(KEY_PREFIX):] in HF_FILES


@dataclass(frozen=True)
class HfFiles:
    """The recorded files of an HF folder: ``texts`` (file name -> text, in HF_FILES order; config.json
    always present), the paths they were read from (``paths``; empty when they come from a packed file),
    and ``notes``: one line per file left out (over its cap)."""

    texts: dict[str, str]
    config: dict
    paths: tuple[Path, ...] = ()
    notes: tuple[str, ...] = field(default=())

    @property
    def model_type(self) -> str:
        return self.config["model_type"]

    def metadata(self) -> dict[str, str]:
        """The ``__metadata__`` entries that record these files."""
        return {metadata_key(n): t for n, t in self.texts.items()}


def _check_text(name: str, text: str, where: str, error: type[InvalidInputError]) -> dict:
    """The parsed JSON object of recorded file ``name``; ``error`` (exit 4) naming ``where`` otherwise."""
    size = len(text.encode("utf-8", "surrogatepass"))
    if size > HF_FILES[name]:
        raise error(f"{where}: {name} is {size} bytes, over the {HF_FILES[name]}-byte limit for it")
    try:
        data = safeio.loads_json(text, f"{where}: {name}")
    except InvalidInputError as exc:
        raise error(exc.message) from None
    if not isinstance(data, dict):
        raise error(f"{where}: {name} must hold a JSON object, found {type(data).__name__}")
    if name == "config.json":
        mt = data.get("model_type")
        if not isinstance(mt, str) or not mt or len(mt) > MAX_MODEL_TYPE:
            raise error(f"{where}: config.json field 'model_type' must be a non-empty string of at most "
                        f"{MAX_MODEL_TYPE} characters, found {short_repr(mt)}")
        for part in ("encoder", "decoder"):  # a composite model's parts (llm.gpt2.recognition_type reads them)
            sub = data.get(part)
            if isinstance(sub, dict) and "model_type" in sub:
                st = sub["model_type"]
                if not isinstance(st, str) or not st or len(st) > MAX_MODEL_TYPE:
                    raise error(f"{where}: config.json field '{part}.model_type' must be a non-empty string of at "
                                f"most {MAX_MODEL_TYPE} characters, found {short_repr(st)}")
    return data


def _checked_total(texts: dict[str, str], where: str, error: type[InvalidInputError]) -> None:
    total = sum(len(json.dumps(t, ensure_ascii=False)) for t in texts.values())
    if total > MAX_RECORD_CHARS:
        raise error(f"{where}: the recorded files take {total} characters escaped, over the limit of {MAX_RECORD_CHARS}")


def read_folder(folder: str | os.PathLike[str], what: str = "source folder") -> HfFiles | None:
    """The HF files of ``folder`` (None when it holds no config.json), read hostile-proof (module doc).

    InvalidInputError (exit 4) naming the file for a non-regular, unreadable, non-UTF-8 or non-JSON-object
    file, a config.json over its cap or without a string ``model_type``.
    """
    folder = Path(folder)
    if not os.path.lexists(folder / "config.json"):
        return None
    texts: dict[str, str] = {}
    paths: list[Path] = []
    notes: list[str] = []
    root = safeio.resolve_links(folder, "folder")
    for name, cap in HF_FILES.items():
        path = folder / name
        if not os.path.lexists(path):
            continue
        target = safeio.resolve_links(path, f"{what} file")
        if not target.is_relative_to(root):  # as shards: a link out would copy outside data in
            raise InvalidInputError(f"{path} links to {target}, outside its folder {folder}",
                                    hint="copy the file into the folder instead of linking it")
        size = os.stat(safeio.check_regular(path, f"{what} file")).st_size
        if size > cap and name != "config.json":
            notes.append(f"{path} is {safeio.human(size)}, over the {safeio.human(cap)} recorded for {name}: "
                         "not recorded (give the folder to `unpack --hf-folder` with --like)")
            continue
        text = safeio.read_text(path, f"{what} file", max_bytes=cap)
        data = _check_text(name, text, str(folder), InvalidInputError)
        if name == "config.json":
            config = data
        texts[name] = text
        paths.append(path)
    _checked_total(texts, str(folder), InvalidInputError)
    return HfFiles(texts, config, tuple(paths), tuple(notes))


def read_beside(files: tuple[Path, ...] | list[Path]) -> HfFiles | None:
    """``read_folder`` of the folder holding a checkpoint's ``files`` (None: no config.json beside them)."""
    folders = {Path(f).parent for f in files}
    if len(folders) != 1:
        return None
    return read_folder(folders.pop(), "checkpoint folder")


def check_metadata(metadata: dict[str, str], where: str) -> None:
    """The record's keys in a packed file's ``__metadata__``: known file names (the caller refuses any
    other key), strings within their caps, config.json present whenever any is. FormatError (exit 4)."""
    keys = [k for k in metadata if is_record_key(k)]
    if not keys:
        return
    if metadata_key("config.json") not in metadata:
        raise FormatError(f"{where}: __metadata__ records HF files without config.json")
    texts = {}
    for key in keys:
        name = key[len(KEY_PREFIX):]
        value = metadata[key]
        if not isinstance(value, str):
            raise FormatError(f"{where}: __metadata__ {key!r} must be a string")
        if len(value) > HF_FILES[name]:  # characters <= bytes: a cheap first bound; parse_texts counts bytes
            raise FormatError(f"{where}: __metadata__ {key!r} is {len(value)} characters, over the "
                              f"{HF_FILES[name]}-byte limit for {name}")
        texts[name] = value
    _checked_total(texts, where, FormatError)


def parse_texts(metadata: dict[str, str], where: str) -> HfFiles | None:
    """The files a packed file records, every one checked as ``read_folder`` checks a source's (None
    when it records none). FormatError (exit 4) naming the file otherwise."""
    check_metadata(metadata, where)
    texts = {n: metadata[metadata_key(n)] for n in HF_FILES if metadata_key(n) in metadata}
    if not texts:
        return None
    parsed = {n: _check_text(n, t, where, FormatError) for n, t in texts.items()}
    return HfFiles(texts, parsed["config.json"])
