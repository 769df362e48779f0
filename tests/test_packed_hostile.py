"""Hostile packed files (issue 14, classes 4 and 5 on the packed side; bad-inputs.md 22, 23, 30, 31).

Every hostile file is a valid one (pruned by the real CLI) rewritten by hand: index arrays broken in
place, the manifest's fields replaced by values of the wrong type, reserved names, nesting bombs,
manifests claiming matrices far larger than the file or the machine. Each case runs the real CLI
(verify, inspect, unpack, and bench, which must refuse a bad file before it looks for a GPU) and
checks the whole contract: the documented exit code, one ``balprune: error:`` line naming the field
or tensor, the input byte-identical, nothing left in the output folder, a bounded time. The model
runtime's host-side path (reference_module, load_model's validation order) runs on the CPU here.
"""

from __future__ import annotations

import copy
import json
import shutil
import struct
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import gpu_skip_reason, one_error_line, sha256, small_lm_packed, small_state_dict

from balprune.cli import main
from balprune.errors import FormatError, InvalidInputError, NoGpuError

PATTERN_ARGS = {
    "balanced": ["-s", "0.5", "--index", "offsets"],
    "bitmask": ["-s", "0.5", "--index", "bitmask"],
    "unstructured": ["-s", "0.5", "-p", "unstructured"],
    "block": ["-s", "0.5", "-p", "block", "--block-shape", "4x4"],
}

#: No case may take longer than this (a size bomb that allocates, or a hang, would).
SECONDS = 20


# --------------------------------------------------------------------------- helpers



def read_st(path: Path) -> tuple[dict, bytearray]:
    raw = Path(path).read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + n]), bytearray(raw[8 + n:])


def st_bytes(header: dict | bytes, data: bytes) -> bytes:
    hb = header if isinstance(header, bytes) else json.dumps(header).encode()
    hb += b" " * (-len(hb) % 8)
    return struct.pack("<Q", len(hb)) + hb + bytes(data)


def rewrite(path: Path, edit) -> None:
    """Rewrite a packed file in place: ``edit(header, data, manifest)`` mutates them (data offsets
    are buffer-relative, so the layout survives a new header length) and may return new data."""
    header, data = read_st(path)
    manifest = json.loads(header["__metadata__"]["manifest"])
    new = edit(header, data, manifest)
    data = data if new is None else new
    header["__metadata__"]["manifest"] = json.dumps(manifest, sort_keys=True, separators=(",", ":"))
    Path(path).write_bytes(st_bytes(header, data))


def part(header: dict, data: bytearray, key: str) -> np.ndarray:
    """A writable numpy view of stored tensor ``key`` inside ``data``."""
    kinds = {"U8": np.uint8, "U16": np.uint16, "I32": np.int32, "F32": np.float32}
    b, e = header[key]["data_offsets"]
    return np.frombuffer(memoryview(data)[b:e], dtype=kinds[header[key]["dtype"]]).reshape(header[key]["shape"])


def entry(manifest: dict, name: str) -> dict:
    return next(e for e in manifest["tensors"] if e["name"] == name)


@pytest.fixture(scope="module")
def made(tmp_path_factory) -> dict[str, Path]:
    """One valid packed file per pattern, made by the real `balprune prune` (copied by each test)."""
    folder = tmp_path_factory.mktemp("made")
    src = folder / "model.pt"
    torch.save(small_state_dict(), src)
    out = {}
    for pattern, args in PATTERN_ARGS.items():
        out[pattern] = folder / f"{pattern}.safetensors"
        assert main(["prune", str(src), *args, "-o", str(out[pattern])]) == 0
    return out


class Case:
    """A hostile input in its own folder, with an empty output folder beside it."""

    def __init__(self, tmp_path: Path, source: Path) -> None:
        self.folder = tmp_path / "in"
        self.out_dir = tmp_path / "out"
        self.folder.mkdir(parents=True)
        self.out_dir.mkdir(parents=True)
        self.path = self.folder / "packed.safetensors"
        shutil.copyfile(source, self.path)

    def edit(self, fn) -> Case:
        rewrite(self.path, fn)
        return self

    def run(self, cli, command: str, code: int, mentions=()) -> str:
        """Run ``command`` on the file; check the code, one line naming ``mentions``, the input
        unchanged, nothing in the output folder, and the time."""
        before = sha256(self.path)
        args = {"verify": ["verify", self.path], "inspect": ["inspect", self.path],
                "unpack": ["unpack", self.path, "-o", self.out_dir / "dense.safetensors"],
                "bench": ["bench", self.path, "--json", self.out_dir / "bench.json"]}[command]
        t0 = time.monotonic()
        r = cli(*args)
        assert time.monotonic() - t0 < SECONDS
        assert r.code == code, f"{command}: expected exit {code}, got {r!r}"
        line = one_error_line(r.err, r.out)
        for m in mentions:
            assert m in line, f"{m!r} not named in {line!r}"
        assert sha256(self.path) == before, "the input changed"
        assert sorted(p.name for p in self.out_dir.iterdir()) == [], "something was left in the output folder"
        assert sorted(p.name for p in self.folder.iterdir()) == ["packed.safetensors"]
        return line


def test_rewrite_helper_keeps_a_valid_file(cli, made, tmp_path):
    """The rewriting itself (new header, same data) leaves files that verify and unpack: every
    refusal below comes from the edit, not from the helper."""
    for pattern, src in made.items():
        c = Case(tmp_path / pattern, src).edit(lambda h, d, m: None)
        assert cli("verify", c.path).code == 0
        r = cli("unpack", c.path, "-o", c.out_dir / "dense.safetensors")
        assert r.code == 0, r


# --------------------------------------------------------------------------- 1. content: indices, row pointers

def _set_part(key, index, value):
    def edit(h, d, m):
        a = part(h, d, key)
        a[index] = value(a) if callable(value) else value
    return edit


def _swap(key, i, j):
    def edit(h, d, m):
        a = part(h, d, key)
        a[i], a[j] = a[j].copy(), a[i].copy()
    return edit


def _csr_crow_descending(h, d, m):
    crow = part(h, d, "fc1.weight::crow_indices")
    crow[5] = crow[4] - 1


def _bsr_crow_descending(h, d, m):
    crow = part(h, d, "fc1.weight::crow_indices")
    crow[2] = crow[1] - 1


def _bsr_edge_nonzero(h, d, m):
    # conv.weight: [16, 27] in 4x4 tiles: tile column 6 covers columns 24..27, column 27 is outside
    col = part(h, d, "conv.weight::col_indices")
    vals = part(h, d, "conv.weight::values")
    p = int(np.nonzero(col == 6)[0][0])
    vals[p, 0, 3] = 1.0


def _bsr_col_past_end(h, d, m):
    crow = part(h, d, "fc1.weight::crow_indices")
    part(h, d, "fc1.weight::col_indices")[crow[1] - 1] = 25  # 100 / 4 tile columns: 25 is one past


def _bitmask_padding_kept(h, d, m):
    # conv2.weight: K = 144, L = 5, B = 29: the last block (columns 140..144) has 4 real columns and
    # k = 3, so column 144 (padding) is never kept; keep it instead of the block's first kept column
    mask = part(h, d, "conv2.weight::mask")
    bits = np.unpackbits(mask[0], bitorder="little")
    first = 140 + int(np.nonzero(bits[140:144])[0][0])
    bits[first], bits[144] = 0, 1
    mask[0] = np.packbits(bits, bitorder="little")


CONTENT = {
    # bitmask: fc1.weight [24, 100], L = 4, k = 2, B = 25: mask [24, 13] bytes (100 bits a row)
    "bitmask-popcount": ("bitmask", _set_part("fc1.weight::mask", (0, 0), lambda a: a[0, 0] ^ 1),
                         ("'fc1.weight'", "row 0, block 0 has", "mask bits set, keep is 2")),
    "bitmask-bit-past-last-column": ("bitmask", _set_part("fc1.weight::mask", (5, 12), lambda a: a[5, 12] | 0x80),
                                     ("'fc1.weight'", "row 5 has mask bits past its last column")),
    "bitmask-padding-kept": ("bitmask", _bitmask_padding_kept, ("'conv2.weight'", "padding")),
    "bitmask-nan": ("bitmask", _set_part("fc1.weight::values", (1, 1, 1), np.nan), ("'fc1.weight'", "NaN")),
    "bitmask-value-count": ("bitmask", lambda h, d, m: entry(m, "fc1.weight").__setitem__("keep", 1),
                            ("'fc1.weight'",)),
    # balanced: fc1.weight [24, 100], L = 4, k = 2, B = 25 (indices [24, 2, 25] uint8)
    "balanced-index-far": ("balanced", _set_part("fc1.weight::indices", (0, 1, 0), 200), ("'fc1.weight'", "200")),
    "balanced-index-equal-L": ("balanced", _set_part("fc1.weight::indices", (0, 1, 0), 4),
                               ("'fc1.weight'", ">= block_length 4")),
    "balanced-duplicated": ("balanced", _set_part("fc1.weight::indices", (3, 1, 2), lambda a: a[3, 0, 2]),
                            ("'fc1.weight'", "row 3, block 2", "duplicated")),
    "balanced-unsorted": ("balanced", _swap("fc1.weight::indices", (0, 0, 0), (0, 1, 0)),
                          ("'fc1.weight'", "unsorted")),
    # conv2.weight: K = 144, L = 5, B = 29, k = 3: the last block has 4 real columns, so it never
    # keeps its padding column (offset 4); keeping it drops a real column
    "balanced-padding-kept": ("balanced", _set_part("conv2.weight::indices", (0, 2, 28), 4),
                              ("'conv2.weight'", "padding")),
    "balanced-nan": ("balanced", _set_part("fc1.weight::values", (1, 1, 1), np.nan), ("'fc1.weight'", "NaN")),
    "balanced-wrong-count-per-block": ("balanced", lambda h, d, m: entry(m, "fc1.weight").__setitem__("keep", 1),
                                       ("'fc1.weight'",)),
    # CSR: fc1.weight [24, 100], nnz 1200
    "csr-negative-column": ("unstructured", _set_part("fc1.weight::col_indices", 0, -1),
                            ("'fc1.weight'", "column index -1 out of range")),
    "csr-column-past-end": ("unstructured", _set_part("fc1.weight::col_indices", 1199, 100),
                            ("'fc1.weight'", "column index 100 out of range [0, 100)")),
    "csr-row-pointers-descending": ("unstructured", _csr_crow_descending, ("'fc1.weight'", "decrease at row 4")),
    "csr-row-pointer-past-nnz": ("unstructured", _set_part("fc1.weight::crow_indices", 24, 1201),
                                 ("'fc1.weight'", "must be nnz = 1200")),
    "csr-row-pointer-start": ("unstructured", _set_part("fc1.weight::crow_indices", 0, 1), ("'fc1.weight'",)),
    "csr-row-pointer-huge": ("unstructured", _set_part("fc1.weight::crow_indices", 3, 2**31 - 1),
                             ("'fc1.weight'", "decrease")),
    "csr-unsorted": ("unstructured", _swap("fc1.weight::col_indices", 0, 1), ("'fc1.weight'", "unsorted")),
    "csr-duplicated": ("unstructured", _set_part("fc1.weight::col_indices", 1, lambda a: a[0]),
                       ("'fc1.weight'", "duplicated")),
    "csr-nan": ("unstructured", _set_part("fc1.weight::values", 7, np.inf), ("'fc1.weight'", "NaN")),
    # BSR: fc1.weight [24, 100] in 4x4 tiles: 6 x 25 tiles, 75 stored
    "bsr-negative-column": ("block", _set_part("fc1.weight::col_indices", 0, -1),
                            ("'fc1.weight'", "tile column -1 out of range")),
    "bsr-column-past-end": ("block", _bsr_col_past_end, ("'fc1.weight'", "tile column 25 out of range [0, 25)")),
    "bsr-row-pointers-descending": ("block", _bsr_crow_descending, ("'fc1.weight'", "decrease at tile row 1")),
    "bsr-unsorted": ("block", _swap("fc1.weight::col_indices", 0, 1), ("'fc1.weight'", "unsorted")),
    "bsr-edge-tile-nonzero": ("block", _bsr_edge_nonzero, ("'conv.weight'", "right of the last column")),
}


@pytest.mark.parametrize("command", ["verify", "unpack", "bench"])
@pytest.mark.parametrize("case", list(CONTENT))
def test_broken_content_refused_before_anything_is_densified(cli, made, tmp_path, case, command):
    pattern, edit, mentions = CONTENT[case]
    c = Case(tmp_path, made[pattern]).edit(edit)
    c.run(cli, command, 4, mentions)


# --------------------------------------------------------------------------- 2. manifest field types

BAD_VALUES = {"list": ["x"], "dict": {"a": 1}, "bool": True, "float": 1.5, "string": "7", "null": None,
              "huge": 2**64, "negative": -3,
              "vast": 10**400}  # (JSON holds it; float() of it overflows: it was exit 70 in the number fields)

#: Per pattern: the tensor whose entry is edited and every key of its entry.
ENTRY_FIELDS = {
    "balanced": ("fc1.weight", ["pattern", "shape", "dtype", "layout", "rows", "cols", "blocks", "blocks_requested",
                                "block_length", "keep", "index_dtype", "sparsity_target", "sparsity_achieved"]),
    "unstructured": ("fc1.weight", ["pattern", "shape", "dtype", "layout", "rows", "cols", "nnz", "index_dtype",
                                    "sparsity_target", "sparsity_achieved"]),
    "block": ("fc1.weight", ["pattern", "shape", "dtype", "layout", "rows", "cols", "block_shape", "nnz_blocks",
                             "index_dtype", "sparsity_target", "sparsity_achieved"]),
    "dense": ("fc1.bias", ["pattern", "shape", "dtype", "reason"]),
}
FIELD_CASES = [(p, key, kind) for p, (_, keys) in ENTRY_FIELDS.items() for key in keys for kind in BAD_VALUES
               # null is a valid blocks_requested (block_size given); "string" is a valid reason
               if not (key == "blocks_requested" and kind == "null") and not (key == "reason" and kind == "string")]


@pytest.mark.parametrize("command", ["verify", "inspect", "unpack"])
@pytest.mark.parametrize("pattern,key,kind", FIELD_CASES)
def test_entry_field_of_the_wrong_type_refused(cli, made, tmp_path, pattern, key, kind, command):
    name = ENTRY_FIELDS[pattern][0]
    c = Case(tmp_path, made["balanced" if pattern == "dense" else pattern])
    c.edit(lambda h, d, m: entry(m, name).__setitem__(key, copy.deepcopy(BAD_VALUES[kind])))
    c.run(cli, command, 4, (repr(name), key))


def _source(value):
    return lambda h, d, m: m.__setitem__("source", value)


def _source_field(key, value):
    return lambda h, d, m: m["source"].__setitem__(key, value)


def _option(key, value):
    return lambda h, d, m: m["options"].__setitem__(key, value)


def _metadata(key, value):
    return lambda h, d, m: h["__metadata__"].__setitem__(key, value)


def _rename(old, new, *, header=True):
    def edit(h, d, m):
        entry(m, old)["name"] = new
        if header:
            h[new] = h.pop(old)
    return edit


MANIFEST_CASES = {
    "tensors-object": (lambda h, d, m: m.__setitem__("tensors", {}), ("tensors",)),
    "tensors-entry-string": (lambda h, d, m: m["tensors"].append("fc9.weight"), ("name",)),
    "aliases-list": (lambda h, d, m: m.__setitem__("aliases", []), ("aliases",)),
    "alias-target-list": (lambda h, d, m: m["aliases"].__setitem__("tied.weight", ["fc1.weight"]), ("tied.weight",)),
    "alias-target-missing": (lambda h, d, m: m["aliases"].__setitem__("tied.weight", "gone.weight"),
                             ("tied.weight", "gone.weight")),
    "options-list": (lambda h, d, m: m.__setitem__("options", ["balanced"]), ("options",)),
    "options-pattern-list": (_option("pattern", ["balanced"]), ("options.pattern",)),
    "options-pattern-dict": (_option("pattern", {"a": 1}), ("options.pattern",)),
    "options-sparsity-string": (_option("sparsity", "0.5"), ("options.sparsity",)),
    "options-sparsity-bool": (_option("sparsity", True), ("options.sparsity",)),
    "options-sparsity-vast": (_option("sparsity", -10**400), ("options.sparsity",)),
    "options-blocks-float": (_option("blocks", 32.0), ("options.blocks",)),
    "options-include-string": (_option("include", "fc*"), ("options.include",)),
    "options-schedule-list": (_option("schedule", []), ("options.schedule",)),
    "options-strict-string": (_option("strict", "no"), ("options.strict",)),
    "source-list": (_source(["m.pt"]), ("source",)),
    "source-missing-sha": (_source({"name": "m.pt"}), ("source",)),
    "source-name-dict": (_source_field("name", {"a": 1}), ("source.name",)),
    "source-sha-int": (_source_field("sha256", 5), ("source.sha256",)),
    "source-name-huge": (_source_field("name", "x" * 100_000), ("source.name", "100000")),
    "tool-version-huge": (_metadata("tool_version", "9" * 100_000), ("tool_version", "100000")),
    "name-int": (lambda h, d, m: entry(m, "fc1.bias").__setitem__("name", 7), ("name",)),
    "name-list": (lambda h, d, m: entry(m, "fc1.bias").__setitem__("name", ["fc1.bias"]), ("name",)),
    # reserved names
    "name-with-part-separator": (_rename("fc1.bias", "fc1::bias"), ("fc1::bias", "::")),
    "name-metadata": (_rename("fc1.bias", "__metadata__", header=False), ("__metadata__",)),
    "alias-with-part-separator": (lambda h, d, m: m["aliases"].__setitem__("tied::weight", "fc1.weight"),
                                  ("tied::weight", "::")),
    "alias-metadata": (lambda h, d, m: m["aliases"].__setitem__("__metadata__", "fc1.weight"), ("__metadata__",)),
    "alias-shadows-tensor": (lambda h, d, m: m["aliases"].__setitem__("fc1.bias", "fc1.weight"), ("fc1.bias",)),
    # nesting bombs and JSON the spec does not allow
    # written as raw text (RAW_MANIFEST): JSON that json.dumps cannot produce
    "options-nesting-bomb": (None, ("manifest", "nested")),
    "manifest-duplicate-key": (None, ("manifest", "duplicate")),
    "manifest-nan-literal": (None, ("manifest entry 'conv2.weight'", "sparsity_target", "nan")),
}

#: Rewrites of the manifest text itself, for the cases above without an edit function.
RAW_MANIFEST = {
    "options-nesting-bomb": lambda t: t.replace('"rules":[]', '"rules":' + "[" * 100_000 + "]" * 100_000),
    "manifest-duplicate-key": lambda t: t.replace('{"aliases":{}', '{"aliases":{},"aliases":{}'),
    "manifest-nan-literal": lambda t: t.replace('"sparsity_target":0.5', '"sparsity_target":NaN', 1),
}


def _write_raw_manifest(path: Path, text_of) -> None:
    header, data = read_st(path)
    manifest = json.loads(header["__metadata__"]["manifest"])
    text = text_of(json.dumps(manifest, sort_keys=True, separators=(",", ":")))
    assert text != json.dumps(manifest, sort_keys=True, separators=(",", ":")), "the raw edit did not apply"
    header["__metadata__"]["manifest"] = text
    Path(path).write_bytes(st_bytes(header, data))


@pytest.mark.parametrize("command", ["verify", "inspect", "unpack", "bench"])
@pytest.mark.parametrize("case", list(MANIFEST_CASES))
def test_manifest_field_refused_naming_it(cli, made, tmp_path, case, command):
    edit, mentions = MANIFEST_CASES[case]
    c = Case(tmp_path, made["balanced"])
    if case in RAW_MANIFEST:
        _write_raw_manifest(c.path, RAW_MANIFEST[case])
    else:
        c.edit(edit)
    line = c.run(cli, command, 4, mentions)
    assert len(line) < 1000, "a hostile field was echoed whole"


def test_nesting_bomb_message_names_the_depth(cli, made, tmp_path):
    c = Case(tmp_path, made["balanced"])
    _write_raw_manifest(c.path, RAW_MANIFEST["options-nesting-bomb"])
    line = c.run(cli, "verify", 4, ("manifest", "nested"))
    assert "100001" in line or "levels" in line


# --------------------------------------------------------------------------- 3. size bombs

def build_packed(path: Path, tensors: list[tuple[dict, dict[str, torch.Tensor]]]) -> None:
    """Write a packed file from scratch: (manifest entry with its name, {part: tensor}) pairs."""
    header: dict = {}
    data = bytearray()
    for e, parts in tensors:
        for pname, t in parts.items():
            raw = t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
            code = {torch.int32: "I32", torch.float32: "F32", torch.uint8: "U8"}[t.dtype]
            header[f"{e['name']}::{pname}"] = {"dtype": code, "shape": list(t.shape),
                                               "data_offsets": [len(data), len(data) + len(raw)]}
            data += raw
    manifest = {"tensors": [e for e, _ in tensors], "aliases": {}, "options": {"pattern": "unstructured"},
                "source": {"name": "hostile", "sha256": "0" * 64}}
    header["__metadata__"] = {"format": "balprune.packed", "format_version": "1", "tool_version": "0",
                              "manifest": json.dumps(manifest, sort_keys=True, separators=(",", ":"))}
    Path(path).write_bytes(st_bytes(header, data))


def csr_claiming(rows: int, cols: int) -> tuple[dict, dict[str, torch.Tensor]]:
    """An empty CSR matrix of the claimed size: a file of 4 * (rows + 1) bytes of row pointers."""
    e = {"name": "huge.weight", "pattern": "unstructured", "shape": [rows, cols], "dtype": "F32", "layout": "csr",
         "rows": rows, "cols": cols, "nnz": 0, "index_dtype": "I32", "sparsity_target": 1.0,
         "sparsity_achieved": 1.0}
    return e, {"crow_indices": torch.zeros(rows + 1, dtype=torch.int32),
               "col_indices": torch.zeros(0, dtype=torch.int32), "values": torch.zeros(0)}


def bsr_tiles(rows: int, cols: int, bh: int, bw: int) -> tuple[dict, dict[str, torch.Tensor]]:
    """A BSR matrix of no stored tiles: tiny on disk whatever the tile size claims."""
    rb = -(-rows // bh)
    e = {"name": "tiles.weight", "pattern": "block", "shape": [rows, cols], "dtype": "F32", "layout": "bsr",
         "rows": rows, "cols": cols, "block_shape": [bh, bw], "nnz_blocks": 0, "index_dtype": "I32",
         "sparsity_target": 1.0, "sparsity_achieved": 1.0}
    return e, {"crow_indices": torch.zeros(rb + 1, dtype=torch.int32),
               "col_indices": torch.zeros(0, dtype=torch.int32), "values": torch.zeros(0, bh, bw)}


@pytest.mark.parametrize("case", ["csr-10^6-x-10^6", "csr-one-row-10^13-cols", "bsr-2^20-tiles"])
def test_small_file_claiming_a_huge_matrix(cli, tmp_path, case):
    """Valid files (empty sparse matrices) whose dense form is terabytes: verify and inspect read
    them (no allocation of the claimed size), unpack refuses with the figure before allocating."""
    c = Case(tmp_path, Path(__file__))  # placeholder content, replaced below
    tensors = {"csr-10^6-x-10^6": [csr_claiming(10**6, 10**6)], "csr-one-row-10^13-cols": [csr_claiming(1, 10**13)],
               "bsr-2^20-tiles": [bsr_tiles(3, 5, 2**20, 2**20)]}[case]
    build_packed(c.path, tensors)
    assert c.path.stat().st_size < 5 << 20
    t0 = time.monotonic()
    assert cli("verify", c.path).code == 0
    r = cli("inspect", c.path)
    assert r.code == 0 and "Traceback" not in r.err
    assert time.monotonic() - t0 < SECONDS
    line = c.run(cli, "unpack", 4, ("needs", "TiB", "available"))
    assert "huge.weight" in line or "tiles.weight" in line


@pytest.mark.parametrize("command", ["verify", "inspect", "unpack", "bench"])
@pytest.mark.parametrize("case", ["shape", "rows-cols", "blocks", "keep", "tiles", "nnz", "overflow"])
def test_manifest_geometry_beyond_the_stored_parts_refused(cli, made, tmp_path, case, command):
    """A manifest claiming more than its parts hold is refused by comparing the geometry with the
    stored parts, byte for byte, before anything of the claimed size is allocated."""
    def edit(h, d, m):
        pattern = {"tiles": "block", "nnz": "unstructured"}.get(case, "balanced")
        assert entry(m, "fc1.weight")["pattern"] == pattern
        e = entry(m, "fc1.weight")
        if case == "shape":
            e["shape"] = [10**6, 10**6]
        elif case == "rows-cols":
            e.update(shape=[10**6, 10**6], rows=10**6, cols=10**6, blocks=250_000)
        elif case == "blocks":
            e.update(shape=[24, 4 * 10**12], cols=4 * 10**12, blocks=10**12)
        elif case == "keep":
            e.update(keep=4, block_length=4)  # k = L: 2x the stored slots
        elif case == "tiles":
            e.update(block_shape=[2**20, 2**20])
        elif case == "nnz":
            e.update(nnz=10**12)
        else:
            e.update(shape=[2**62, 2**62])
    pattern = {"tiles": "block", "nnz": "unstructured"}.get(case, "balanced")
    c = Case(tmp_path, made[pattern]).edit(edit)
    c.run(cli, command, 4, ("fc1.weight",))


def test_unpack_checks_memory_before_densifying(cli, made, tmp_path, monkeypatch):
    """With less memory than a dense tensor needs, unpack refuses (exit 4, both figures) instead of
    allocating: the check reads the same MemAvailable figure as prune's preflight."""
    import balprune.safeio as safeio

    monkeypatch.setattr(safeio, "memory_available", lambda: 4096)
    c = Case(tmp_path, made["balanced"])
    line = c.run(cli, "unpack", 4, ("needs", "4.0 KiB of memory is available"))
    assert "fc1.weight" in line or "conv2.weight" in line or "fc2.weight" in line


# --------------------------------------------------------------------------- 4. the model runtime's host side

@pytest.fixture(scope="module")
def lm_packed(tmp_path_factory) -> Path:
    """A small lstm-lm, pruned balanced by the real CLI (helpers.small_lm_packed)."""
    return small_lm_packed(tmp_path_factory.mktemp("lm"))


def _break_lm(path: Path) -> None:
    def edit(h, d, m):
        a = part(h, d, "lstm.weight_hh_l0::indices")
        a[0, 0, 0] = 250  # far outside the block
    rewrite(path, edit)


def test_reference_module_refuses_a_hostile_file_before_densifying(lm_packed, tmp_path):
    from balprune.formats.packed_file import read_packed
    from balprune.models import detect, reference_module

    p = tmp_path / "lm.safetensors"
    shutil.copyfile(lm_packed, p)
    pf = read_packed(p)  # structure only: content is checked by every load
    reference_module(pf, detect(pf))  # the intact file builds
    _break_lm(p)
    pf = read_packed(p)
    with pytest.raises(FormatError, match=r"'lstm.weight_hh_l0'.*index 250"):
        reference_module(pf, detect(pf))


def test_reference_module_checks_memory_of_each_dense_tensor(lm_packed, tmp_path, monkeypatch):
    import balprune.safeio as safeio
    from balprune.formats.packed_file import read_packed
    from balprune.models import detect, reference_module

    pf = read_packed(lm_packed)
    monkeypatch.setattr(safeio, "memory_available", lambda: 1024)
    with pytest.raises(InvalidInputError, match="needs .* of memory is available"):
        reference_module(pf, detect(pf))


def test_load_model_validates_the_whole_file_before_the_gpu(lm_packed, tmp_path):
    """load_model verifies the file first: a hostile file is exit 4 on any machine (here, one
    without a GPU, a check after the probe would surface as NoGpuError instead)."""
    from balprune.runtime.model import load_model

    p = tmp_path / "lm.safetensors"
    shutil.copyfile(lm_packed, p)
    _break_lm(p)
    with pytest.raises(FormatError, match=r"'lstm.weight_hh_l0'.*index 250") as e:
        load_model(p)
    assert e.value.exit_code == 4
    p.write_bytes(b"\x00" * 4)
    with pytest.raises(InvalidInputError):
        load_model(p)


@pytest.mark.skipif(gpu_skip_reason() is None, reason="a usable GPU is present: the no-GPU path cannot be observed")
def test_load_model_of_a_valid_file_reaches_the_gpu_probe(lm_packed):
    from balprune.runtime.model import load_model

    with pytest.raises(NoGpuError):
        load_model(lm_packed)


@pytest.mark.parametrize("which", ["balanced", "bsr"])
def test_runtime_validators_call_the_format_validators(monkeypatch, which):
    """One validator: the runtime's host checks delegate the format's invariants to formats' own
    check_*_arrays (the code verify runs), rather than keeping a second copy."""
    from balprune.formats import BalancedTensor, BsrTensor
    from balprune.runtime import balanced as rb
    from balprune.runtime import bsr as rbsr

    calls = []
    if which == "balanced":
        from balprune.patterns.kinds import BalancedPattern

        bt = BalancedTensor.from_dense(torch.zeros(4, 8), BalancedPattern(0.5, blocks=2))
        monkeypatch.setattr(rb, "check_balanced_arrays", lambda *a, **k: calls.append(k["where"]))
        g = bt.geometry
        rb.validate_balanced(bt.values, bt.indices, g.rows, g.cols, g.blocks, g.block_length, g.keep, name="layer")
    else:
        bt = BsrTensor.from_dense(torch.zeros(4, 8), (2, 2), 0, 1.0)
        monkeypatch.setattr(rbsr, "check_bsr_arrays", lambda *a, **k: calls.append(k["where"]))
        rbsr.validate_bsr(bt.crow_indices, bt.col_indices, bt.values, 4, 8, (2, 2), name="layer")
    assert calls == ["layer"]


def test_validate_balanced_enforces_the_kernel_32_bit_limits():
    from balprune.runtime import validate_balanced

    v = torch.zeros(1, 1, 1)
    i = torch.zeros(1, 1, 1, dtype=torch.uint16)
    with pytest.raises(FormatError, match="32-bit indexing"):
        validate_balanced(v, i, rows=2**31, cols=4, blocks=1, block_length=4, keep=1)
    with pytest.raises(FormatError, match="32-bit indexing"):
        validate_balanced(v, i, rows=1, cols=2**31, blocks=2**15, block_length=65536, keep=1)


@pytest.mark.parametrize("width", [2**31, 10**13])
@pytest.mark.parametrize("cols_idx,code,mention", [([5, 3], 4, "unsorted"), ([-1, 3], 4, "column index -1"),
                                                   ([3, 2**31 - 1], 0, None)])
def test_csr_wider_than_int32_columns_checked_exactly(cli, tmp_path, width, cols_idx, code, mention):
    """A manifest may claim more columns than an int32 index reaches: the range check must not
    compare against a wrapped bound (torch wraps a Python scalar beyond int32 silently: against
    2^31 every index would look out of range)."""
    e, _ = csr_claiming(1, width)
    e.update(nnz=2, sparsity_achieved=1.0 - 2 / width)
    parts = {"crow_indices": torch.tensor([0, 2], dtype=torch.int32),
             "col_indices": torch.tensor(cols_idx, dtype=torch.int32), "values": torch.ones(2)}
    c = Case(tmp_path, Path(__file__))
    build_packed(c.path, [(e, parts)])
    if code:
        c.run(cli, "verify", code, ("'huge.weight'", mention))
    else:
        r = cli("verify", c.path)
        assert r.code == 0, r


def test_load_model_refuses_weights_beyond_the_requested_dtype_before_the_gpu(cli, tmp_path):
    """An fp32 weight of 7e4 is inf in float16: refused with the figure (exit 4) before any GPU probe,
    not reported later as non-finite stored values; bfloat16 holds it and goes on to the probe."""
    from balprune.examples import LstmLanguageModel
    from balprune.runtime.model import load_model
    from balprune.save import save_state_dict

    torch.manual_seed(0)
    sd = {k: v.detach().clone().contiguous() for k, v in LstmLanguageModel(vocab=50, hidden=24, layers=2)
          .state_dict().items()}
    sd["decoder.weight"][3, 5] = 7.0e4
    src, out = tmp_path / "lm.safetensors", tmp_path / "lm.b.safetensors"
    save_state_dict(sd, src)
    assert main(["prune", str(src), "-s", "0.5", "--blocks", "4", "-o", str(out)]) == 0
    with pytest.raises(InvalidInputError, match=r"'decoder.weight'.*7e\+04 exceed float16's largest finite value 65504"):
        load_model(out, dtype="float16")
    if gpu_skip_reason() is not None:
        with pytest.raises(NoGpuError):
            load_model(out, dtype="bfloat16")
    # bench --model checks every requested dtype in its one pass before the GPU (and before any timing)
    r = cli("bench", out, "--model", "--dtype", "float32,float16")
    assert r.code == 4 and "exceed float16's largest finite value" in r.err and r.err.count("\n") == 1, r
