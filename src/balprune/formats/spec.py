"""Packed format v1: names, versions and the strict manifest schema (mirrors FORMAT.md).

A packed file is a safetensors file. ``__metadata__`` holds only strings:

    format          "balprune.packed"
    format_version  "1"
    tool_version    balprune's version
    manifest        compact JSON (keys sorted): {"tensors": [entry, ...], "aliases": {...},
                    "options": {...}, "source": {"name": ..., "sha256": ...}}

Each tensor of the source checkpoint has one manifest entry (with its "name"), in source order. A packed tensor
``name`` is stored as parts ``name::<part>``; a dense one under its own name.
"""

from __future__ import annotations

import enum
import json
import math

from ..errors import FormatError

FORMAT_NAME = "balprune.packed"
FORMAT_VERSION = "1"
PART_SEPARATOR = "::"


class Layout(str, enum.Enum):
    """How a packed pattern orders its arrays (one value per layout variant, never a flag)."""

    #: balanced: values/indices [rows, keep, blocks]; entry (r, t, j) is the t-th kept entry
    #: (ascending column) of block j in row r, so one row's blocks are contiguous per slot.
    ROWS_SLOTS_BLOCKS = "rows_slots_blocks"
    #: unstructured: CSR, int32 crow_indices [rows+1], col_indices [nnz], values [nnz].
    CSR = "csr"
    #: block: BSR, int32 crow_indices [rows/bh+1], col_indices [nnzb], values [nnzb, bh, bw].
    BSR = "bsr"


#: Keys of a manifest entry, per pattern; every key is required, no other key is allowed.
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

MANIFEST_KEYS = frozenset({"tensors", "aliases", "options", "source"})
METADATA_KEYS = frozenset({"format", "format_version", "tool_version", "manifest"})


def part_name(tensor: str, part: str) -> str:
    return f"{tensor}{PART_SEPARATOR}{part}"


def dumps(obj: object) -> str:
    """The one JSON encoding used in metadata: compact, sorted keys, deterministic."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False)


def _where(name: str, key: str) -> str:
    return f"manifest entry {name!r}: {key}"


def req_int(entry: dict, key: str, name: str, minimum: int = 0) -> int:
    v = entry.get(key)
    if not isinstance(v, int) or isinstance(v, bool) or v < minimum:
        raise FormatError(f"{_where(name, key)} must be an integer >= {minimum}, got {v!r}")
    return v


def req_float(entry: dict, key: str, name: str) -> float:
    v = entry.get(key)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not 0 <= v <= 1:
        raise FormatError(f"{_where(name, key)} must be a number in [0, 1], got {v!r}")
    return float(v)


def req_shape(entry: dict, key: str, name: str) -> tuple[int, ...]:
    v = entry.get(key)
    if not isinstance(v, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in v):
        raise FormatError(f"{_where(name, key)} must be a list of non-negative integers, got {v!r}")
    return tuple(v)


def req_choice(entry: dict, key: str, name: str, choices) -> str:
    v = entry.get(key)
    if v not in choices:
        raise FormatError(f"{_where(name, key)} must be one of {sorted(choices)}, got {v!r}")
    return v


def check_entry_keys(entry: object, name: str) -> str:
    """The entry's pattern, after checking it is an object with exactly that pattern's keys."""
    if not isinstance(entry, dict):
        raise FormatError(f"manifest entry {name!r} is not an object")
    pattern = entry.get("pattern")
    if pattern not in ENTRY_KEYS:
        raise FormatError(f"{_where(name, 'pattern')} is unknown: {pattern!r}")
    keys = set(entry)
    missing, extra = ENTRY_KEYS[pattern] - keys, keys - ENTRY_KEYS[pattern]
    if missing:
        raise FormatError(f"manifest entry {name!r}: missing key(s) {sorted(missing)}")
    if extra:
        raise FormatError(f"manifest entry {name!r}: unknown key(s) {sorted(extra)}")
    return pattern


def parse_metadata(metadata: dict[str, str] | None, where: str) -> dict:
    """The decoded manifest of a packed file, after checking format name and version.

    ``tensors`` comes back as an ordered dict name -> entry (without its "name" key).
    """
    if not metadata:
        raise FormatError(f"{where}: not a balprune packed file (no __metadata__)")
    if metadata.get("format") != FORMAT_NAME:
        raise FormatError(f"{where}: not a balprune packed file (format {metadata.get('format')!r})")
    version = metadata.get("format_version")
    if version != FORMAT_VERSION:
        raise FormatError(
            f"{where}: format version {version!r} is not supported (this balprune reads {FORMAT_VERSION!r})",
            hint="use the balprune version that wrote it",
        )
    extra = set(metadata) - METADATA_KEYS
    if extra:
        raise FormatError(f"{where}: unknown __metadata__ key(s) {sorted(extra)}")
    try:
        manifest = json.loads(metadata.get("manifest", ""))
    except ValueError as exc:
        raise FormatError(f"{where}: manifest is not valid JSON ({exc})") from None
    if not isinstance(manifest, dict) or set(manifest) != MANIFEST_KEYS:
        raise FormatError(f"{where}: manifest must be an object with keys {sorted(MANIFEST_KEYS)}")
    if not isinstance(manifest["tensors"], list) or not isinstance(manifest["aliases"], dict):
        raise FormatError(f"{where}: manifest tensors must be a list and aliases an object")
    tensors: dict[str, dict] = {}
    for entry in manifest["tensors"]:
        name = entry.get("name") if isinstance(entry, dict) else None
        if not isinstance(name, str):
            raise FormatError(f"{where}: every manifest tensor entry needs a string 'name'")
        if name in tensors:
            raise FormatError(f"{where}: tensor {name!r} appears twice in the manifest")
        tensors[name] = {k: v for k, v in entry.items() if k != "name"}
    manifest["tensors"] = tensors
    for alias, target in manifest["aliases"].items():
        if target not in manifest["tensors"]:
            raise FormatError(f"{where}: alias {alias!r} points at unknown tensor {target!r}")
        if alias in manifest["tensors"]:
            raise FormatError(f"{where}: alias {alias!r} is also a stored tensor")
    return manifest


def describe_entry(entry: dict) -> str:
    """A short human description of a manifest entry's geometry (or why it is dense)."""
    p = entry["pattern"]
    if p == "dense":
        return entry["reason"]
    if p == "balanced":
        asked = entry["blocks_requested"]
        fewer = f" ({asked} asked)" if asked is not None and asked != entry["blocks"] else ""
        return f"B={entry['blocks']}{fewer} L={entry['block_length']} k={entry['keep']} idx={entry['index_dtype']}"
    if p == "unstructured":
        return f"CSR nnz={entry['nnz']}"
    return f"BSR {entry['block_shape'][0]}x{entry['block_shape'][1]} tiles={entry['nnz_blocks']}"
