"""Packed format v2 (and v1): names, versions and the strict manifest schema (mirrors FORMAT.md).

A packed file is a safetensors file. ``__metadata__`` holds only strings:

    format          "balprune.packed"
    format_version  "2" when a balanced tensor uses the bitmask encoding, else "1" (file_version)
    tool_version    balprune's version
    manifest        compact JSON (keys sorted): {"tensors": [entry, ...], "aliases": {...},
                    "options": {...}, "source": {"name": ..., "sha256": ...}} and, when some tensor
                    is stored as the transpose of its source (GPT-2 Conv1D), "transposed": [name, ...]
    hf:<file>       optional: the source HF folder's config.json, tokenizer files ... (formats.hf_record)

Each tensor of the source checkpoint has one manifest entry (with its "name"), in source order. A packed tensor
``name`` is stored as parts ``name::<part>``; a dense one under its own name.
"""

from __future__ import annotations

import enum
import json
import math

from ..container import PART_SEPARATOR as _PART_SEPARATOR
from ..container import RESERVED_NAME as _RESERVED_NAME
from ..container import check_tensor_name as _check_name
from ..container import short_repr
from ..errors import FormatError, InvalidInputError
from ..values import finite_number
from . import hf_record

FORMAT_NAME = "balprune.packed"
#: The newest version written; a file is written as the oldest version that can hold it (file_version).
FORMAT_VERSION = "2"
#: Versions this balprune reads. v1 = v2 without bitmask tensors and without ``index_encoding``.
READ_VERSIONS = ("1", "2")
PART_SEPARATOR = _PART_SEPARATOR  # the container owns the rule; re-exported for readers of the format


class Layout(str, enum.Enum):
    """How a packed pattern orders its arrays (one value per layout variant, never a flag)."""

    #: balanced: values/indices [rows, keep, blocks]; entry (r, t, j) is the t-th kept entry
    #: (ascending column) of block j in row r, so one row's blocks are contiguous per slot.
    ROWS_SLOTS_BLOCKS = "rows_slots_blocks"
    #: balanced, bitmask encoding (v2): values [rows, blocks, keep] (each block's kept entries in
    #: column order), mask U8 [rows, ceil(blocks*block_length/8)], one bit per padded-row column.
    ROWS_BLOCKS_SLOTS = "rows_blocks_slots"
    #: unstructured: CSR, int32 crow_indices [rows+1], col_indices [nnz], values [nnz].
    CSR = "csr"
    #: block: BSR, int32 crow_indices [rows/bh+1], col_indices [nnzb], values [nnzb, bh, bw].
    BSR = "bsr"


#: The layout of a balanced tensor per index encoding (formats.layouts.ENCODINGS).
BALANCED_LAYOUT = {"offsets": Layout.ROWS_SLOTS_BLOCKS, "bitmask": Layout.ROWS_BLOCKS_SLOTS}

#: Keys of a manifest entry, per pattern (format v1); every key is required, no other key is allowed.
ENTRY_KEYS: dict[str, frozenset[str]] = {
    "dense": frozenset({"pattern", "shape", "dtype", "reason"}),
    "balanced": frozenset({
        "pattern", "shape", "dtype", "layout", "rows", "cols", "blocks", "blocks_requested",
        "block_length", "keep", "index_dtype", "sparsity_target", "sparsity_achieved",
    }),
    "unstructured": frozenset({
        "pattern", "shape", "dtype", "layout", "rows", "cols", "nnz", "index_dtype",
        "sparsity_target", "sparsity_achieved",
    }),
    "block": frozenset({
        "pattern", "shape", "dtype", "layout", "rows", "cols", "block_shape", "nnz_blocks",
        "index_dtype", "sparsity_target", "sparsity_achieved",
    }),
}

#: What format v2 adds to an entry's keys: a balanced tensor states its index encoding.
V2_EXTRA_KEYS: dict[str, frozenset[str]] = {"balanced": frozenset({"index_encoding"})}


def entry_keys(pattern: str, version: str) -> frozenset[str]:
    """The keys an entry of ``pattern`` has in a file of format ``version``."""
    keys = ENTRY_KEYS[pattern]
    return keys | V2_EXTRA_KEYS.get(pattern, frozenset()) if version != "1" else keys


def file_version(entries) -> str:
    """The version a file holding these manifest entries is written as: "2" when a balanced entry
    uses the bitmask encoding, else "1" (so offsets-only files stay readable by v1 readers, byte for
    byte what earlier balprune wrote)."""
    return "2" if any(e.get("index_encoding") == "bitmask" for e in entries) else "1"


def entry_for_version(entry: dict, version: str) -> dict:
    """``entry`` as a file of ``version`` stores it (v1: without ``index_encoding``)."""
    if version == "1":
        return {k: v for k, v in entry.items() if k != "index_encoding"}
    return entry


MANIFEST_KEYS = frozenset({"tensors", "aliases", "options", "source"})
#: Manifest keys written only when they have something to say (so files without them keep their bytes):
#: ``transposed``, the tensors stored as the transpose of their source tensor (GPT-2 Conv1D weights).
OPTIONAL_MANIFEST_KEYS = frozenset({"transposed"})
METADATA_KEYS = frozenset({"format", "format_version", "tool_version", "manifest"})
#: Besides METADATA_KEYS, ``__metadata__`` may hold the source HF folder's files (formats.hf_record:
#: ``hf:config.json`` ...), written only when the source is an HF folder.


def part_name(tensor: str, part: str) -> str:
    return f"{tensor}{PART_SEPARATOR}{part}"


def dumps(obj: object) -> str:
    """The one JSON encoding used in metadata: compact, sorted keys, deterministic."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False)


def _where(name: str, key: str) -> str:
    return f"manifest entry {name!r}: {key}"


#: Largest integer a manifest may hold (shapes, counts): int64, what safetensors and torch can address.
INT_MAX = 2**63 - 1
#: Longest informational string (tool_version, source name, options' strings, a dense entry's reason).
MAX_TEXT = 4096
#: A tensor may not be named this (safetensors' metadata key).
RESERVED_NAME = _RESERVED_NAME


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def req_int(entry: dict, key: str, name: str, minimum: int = 0) -> int:
    v = entry.get(key)
    if not _is_int(v) or not minimum <= v <= INT_MAX:
        raise FormatError(f"{_where(name, key)} must be an integer in [{minimum}, 2^63), got {short_repr(v)}")
    return v


def req_float(entry: dict, key: str, name: str) -> float:
    v = entry.get(key)
    # (finite_number: a JSON integer too large for a float is refused, not an OverflowError)
    if not finite_number(v) or not 0 <= v <= 1:
        raise FormatError(f"{_where(name, key)} must be a number in [0, 1], got {short_repr(v)}")
    return float(v)


def req_shape(entry: dict, key: str, name: str) -> tuple[int, ...]:
    v = entry.get(key)
    if not isinstance(v, list) or not all(_is_int(d) and 0 <= d <= INT_MAX for d in v):
        raise FormatError(f"{_where(name, key)} must be a list of integers in [0, 2^63), got {short_repr(v)}")
    if math.prod(d for d in v if d) > INT_MAX:
        raise FormatError(f"{_where(name, key)} {v} has more than 2^63 elements")
    return tuple(v)


def req_choice(entry: dict, key: str, name: str, choices) -> str:
    v = entry.get(key)
    if not isinstance(v, str) or v not in choices:
        raise FormatError(f"{_where(name, key)} must be one of {sorted(choices)}, got {short_repr(v)}")
    return v


def req_text(v: object, what: str, *, empty: bool = True) -> str:
    """``v`` if it is a string of at most MAX_TEXT characters (non-empty unless ``empty``)."""
    if not isinstance(v, str):
        raise FormatError(f"{what} must be a string, got {type(v).__name__}")
    if len(v) > MAX_TEXT:
        raise FormatError(f"{what} is {len(v)} characters long, over the limit of {MAX_TEXT}")
    if not empty and not v:
        raise FormatError(f"{what} is empty")
    return v


def check_tensor_name(name: object, where: str) -> str:
    """A manifest tensor or alias name (container.check_tensor_name's rule); FormatError otherwise."""
    return _check_name(name, where, FormatError)


def check_entry_keys(entry: object, name: str, version: str = FORMAT_VERSION) -> str:
    """The entry's pattern, after checking it is an object with exactly that pattern's keys in a
    file of format ``version``."""
    if not isinstance(entry, dict):
        raise FormatError(f"manifest entry {name!r} is not an object")
    pattern = entry.get("pattern")
    if not isinstance(pattern, str) or pattern not in ENTRY_KEYS:
        raise FormatError(f"{_where(name, 'pattern')} is unknown: {short_repr(pattern)}")
    keys, want = set(entry), entry_keys(pattern, version)
    missing, extra = want - keys, keys - want
    if missing:
        raise FormatError(f"manifest entry {name!r}: missing key(s) {sorted(missing)}")
    if extra:
        raise FormatError(f"manifest entry {name!r}: unknown key(s) {sorted(extra)}")
    return pattern


#: Option keys the manifest records (config.PruneOptions.to_dict) and the type each must have when
#: present. Options are informational (inspect shows some); unknown keys are kept, for newer writers.
_OPTION_TYPES: dict[str, str] = {
    "pattern": "text", "sparsity": "number", "blocks": "int", "block_size": "int", "scope": "text",
    "vector_length": "int", "block_shape": "ints", "nm": "ints", "include": "texts", "exclude": "texts",
    "rules": "objects", "schedule": "object", "strict": "bool",
}


def _option_ok(kind: str, v: object) -> bool:
    if kind == "text":
        return isinstance(v, str) and len(v) <= MAX_TEXT
    if kind == "number":
        return finite_number(v)
    if kind == "int":
        return _is_int(v)
    if kind == "ints":
        return isinstance(v, list) and all(_is_int(d) for d in v)
    if kind == "texts":
        return isinstance(v, list) and all(isinstance(t, str) and len(t) <= MAX_TEXT for t in v)
    if kind == "objects":
        return isinstance(v, list) and all(isinstance(t, dict) for t in v)
    if kind == "object":
        return isinstance(v, dict)
    return isinstance(v, bool)


def _check_options(options: object, where: str) -> None:
    if not isinstance(options, dict):
        raise FormatError(f"{where}: manifest options must be an object, got {type(options).__name__}")
    for key, kind in _OPTION_TYPES.items():
        if key in options and options[key] is not None and not _option_ok(kind, options[key]):
            raise FormatError(f"{where}: manifest options.{key} has the wrong type ({short_repr(options[key])})")


def _check_source(source: object, where: str) -> None:
    if not isinstance(source, dict) or set(source) != {"name", "sha256"}:
        raise FormatError(f"{where}: manifest source must be an object with keys ['name', 'sha256']")
    req_text(source["name"], f"{where}: manifest source.name")
    req_text(source["sha256"], f"{where}: manifest source.sha256")


def _non_finite_field(text: str, where: str) -> str | None:
    """When the manifest's only fault is a NaN/Infinity literal, the message naming its field.

    Called after safeio.loads_json refused ``text``; its nesting is re-checked first, so this
    second, permissive parse cannot recurse deeply. None when the text is wrong in another way.
    """
    from ..safeio import MAX_NESTING, json_depth

    if json_depth(text) > MAX_NESTING:
        return None
    try:
        raw = json.loads(text)
    except (ValueError, RecursionError):
        return None
    entries = raw.get("tensors") if isinstance(raw, dict) else None
    for entry in entries if isinstance(entries, list) else []:
        if isinstance(entry, dict):
            for key, v in entry.items():
                if isinstance(v, float) and not math.isfinite(v):
                    label = entry.get("name") if isinstance(entry.get("name"), str) else "?"
                    return f"{where}: {_where(label, key)} must be a finite number, got {v}"
    stack = [raw]
    while stack:  # anywhere else (options, ...): no recursion, the depth is bounded anyway
        v = stack.pop()
        if isinstance(v, float) and not math.isfinite(v):
            return f"{where}: manifest holds {v}, which is not JSON"
        stack.extend(v.values() if isinstance(v, dict) else v if isinstance(v, list) else ())
    return None


def parse_metadata(metadata: dict[str, str] | None, where: str) -> dict:
    """The decoded manifest of a packed file, after checking format name and version.

    Every field is typed here (the per-pattern keys by the packed classes' ``part_specs``): the
    manifest JSON is parsed with bounded nesting and unique keys; tensor and alias names are
    strings, unique, not reserved (``__metadata__``, the part separator ``::``); aliases point at
    stored tensors; ``options`` and ``source`` have the types inspect and unpack read; the
    informational strings are bounded. ``tensors`` comes back as an ordered dict name -> entry
    (without its "name" key).
    """
    from ..safeio import loads_json

    if not metadata:
        raise FormatError(f"{where}: not a balprune packed file (no __metadata__)")
    if metadata.get("format") != FORMAT_NAME:
        raise FormatError(f"{where}: not a balprune packed file (format {short_repr(metadata.get('format'))})")
    version = metadata.get("format_version")
    if version not in READ_VERSIONS:
        raise FormatError(
            f"{where}: format version {short_repr(version)} is not supported (this balprune reads versions "
            f"{', '.join(READ_VERSIONS)})",
            hint="use the balprune version that wrote it",
        )
    extra = {k for k in metadata if k not in METADATA_KEYS and not hf_record.is_record_key(k)}
    if extra:
        raise FormatError(f"{where}: unknown __metadata__ key(s) {[short_repr(k) for k in sorted(extra)[:5]]}")
    if "tool_version" in metadata:
        req_text(metadata["tool_version"], f"{where}: __metadata__ tool_version")
    if "manifest" not in metadata:
        raise FormatError(f"{where}: __metadata__ has no manifest")
    try:
        manifest = loads_json(metadata["manifest"], f"{where}: manifest")
    except InvalidInputError as exc:
        raise FormatError(_non_finite_field(metadata["manifest"], where) or exc.message) from None
    if not isinstance(manifest, dict) or not MANIFEST_KEYS <= set(manifest) <= MANIFEST_KEYS | OPTIONAL_MANIFEST_KEYS:
        raise FormatError(f"{where}: manifest must be an object with keys {sorted(MANIFEST_KEYS)} "
                          f"(and optionally {sorted(OPTIONAL_MANIFEST_KEYS)})")
    if not isinstance(manifest["tensors"], list) or not isinstance(manifest["aliases"], dict):
        raise FormatError(f"{where}: manifest tensors must be a list and aliases an object")
    tensors: dict[str, dict] = {}
    for entry in manifest["tensors"]:
        if not isinstance(entry, dict) or "name" not in entry:
            raise FormatError(f"{where}: every manifest tensor entry needs a string 'name'")
        name = check_tensor_name(entry["name"], f"{where}: manifest")
        if name in tensors:
            raise FormatError(f"{where}: tensor {name!r} appears twice in the manifest")
        tensors[name] = {k: v for k, v in entry.items() if k != "name"}
    manifest["tensors"] = tensors
    for alias, target in manifest["aliases"].items():
        check_tensor_name(alias, f"{where}: manifest alias")
        if not isinstance(target, str) or target not in manifest["tensors"]:
            raise FormatError(f"{where}: alias {alias!r} points at unknown tensor {short_repr(target)}")
        if alias in manifest["tensors"]:
            raise FormatError(f"{where}: alias {alias!r} is also a stored tensor")
    _check_options(manifest["options"], where)
    _check_source(manifest["source"], where)
    if "transposed" in manifest:
        _check_transposed(manifest["transposed"], manifest["tensors"], where)
    hf_record.check_metadata(metadata, where)
    return manifest


def _check_transposed(names: object, tensors: dict[str, dict], where: str) -> None:
    """``transposed``: a non-empty list of distinct stored tensors with 2-D shapes (their entries describe
    the [out, in] matrix; the source held its transpose, which unpack restores)."""
    if not isinstance(names, list) or not names:
        raise FormatError(f"{where}: manifest transposed must be a non-empty list of tensor names")
    for name in names:
        if not isinstance(name, str) or name not in tensors:
            raise FormatError(f"{where}: manifest transposed names {short_repr(name)}, which is not a stored tensor")
        shape = tensors[name].get("shape")
        if not isinstance(shape, list) or len(shape) != 2:
            raise FormatError(f"{where}: manifest transposed names {name!r}, whose shape {short_repr(shape)} is not 2-D")
    if len(set(names)) != len(names):
        raise FormatError(f"{where}: manifest transposed names a tensor twice")


def describe_entry(entry: dict) -> str:
    """A short human description of a manifest entry's geometry (or why it is dense)."""
    p = entry["pattern"]
    if p == "dense":
        return entry["reason"]
    if p == "balanced":
        asked = entry["blocks_requested"]
        fewer = f" ({asked} asked)" if asked is not None and asked != entry["blocks"] else ""
        idx = "bitmask" if entry.get("index_encoding") == "bitmask" else entry["index_dtype"]
        return f"B={entry['blocks']}{fewer} L={entry['block_length']} k={entry['keep']} idx={idx}"
    if p == "unstructured":
        return f"CSR nnz={entry['nnz']}"
    return f"BSR {entry['block_shape'][0]}x{entry['block_shape'][1]} tiles={entry['nnz_blocks']}"
