"""Reading packed files strictly, verifying every invariant, inspecting and unpacking them."""

from __future__ import annotations

import math
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .. import container
from ..errors import FormatError, OutputError
from ..safeio import check_fits_memory, human
from . import PACKED_CLASSES, hf_record, spec


@dataclass(frozen=True)
class PackedFile:
    """A packed file whose header, metadata, manifest (every field typed) and part shapes have been
    validated (``read_packed``). Every object ``load`` returns has passed its pattern's complete
    check, on the very bytes returned, so no caller can densify or upload an unchecked tensor."""

    parsed: container.ParsedFile
    manifest: dict
    tool_version: str
    # hf_files' result once parsed (a recorded tokenizer.json may be 32 MiB of JSON: verify_packed, then verify's
    # and the LLM commands' own reads, parse it once)
    _hf: list = field(default_factory=list, repr=False, compare=False)

    @property
    def path(self) -> Path:
        return self.parsed.path

    @property
    def format_version(self) -> str:
        """The file's format version ("1" or "2"; read_packed accepted it)."""
        return self.parsed.metadata["format_version"]

    def names(self) -> list[str]:
        return list(self.manifest["tensors"])

    @property
    def transposed(self) -> frozenset[str]:
        """Tensors stored as the transpose of their source tensor (manifest ``transposed``: GPT-2 Conv1D
        weights, [in, out] in the source, packed as their [out, in] matrix)."""
        return frozenset(self.manifest.get("transposed", ()))

    def source_shape(self, name: str) -> tuple[int, ...]:
        """The shape ``name`` had in the source checkpoint (the entry's, reversed for a transposed tensor)."""
        shape = tuple(self.manifest["tensors"][name]["shape"])
        return shape[::-1] if name in self.transposed else shape

    def hf_files(self) -> hf_record.HfFiles | None:
        """The source HF folder's files the file records (``hf:config.json`` ...), every one checked
        (hf_record.parse_texts: JSON objects within their caps); None when it records none."""
        if not self._hf:
            self._hf.append(hf_record.parse_texts(self.parsed.metadata, str(self.path)))
        return self._hf[0]

    def _raw(self, stored_name: str) -> torch.Tensor:
        e = self.parsed.entry(stored_name)
        buf = container.read_bytes(self.path, e.begin, e.end)
        return container.tensor_from_bytes(buf, e.dtype, e.shape, name=stored_name)

    def load(self, name: str):
        """The packed object (BalancedTensor, CsrTensor, BsrTensor) or the dense tensor of ``name``.

        A packed object is checked completely (its class's ``check``: index ranges and order, row
        pointers, padding, finite values) and against the manifest's ``sparsity_achieved`` before it
        is returned: FormatError (exit 4) naming the tensor otherwise. Its parts are read only after
        their size is checked against the memory available.
        """
        entry = self.manifest["tensors"][name]
        cls = PACKED_CLASSES.get(entry["pattern"])
        stored = {None: name} if cls is None else {part: spec.part_name(name, part) for part in cls.part_specs(entry, name)}
        check_fits_memory(sum(self.parsed.entry(n).nbytes for n in stored.values()), f"tensor {name!r}: reading its parts")
        if cls is None:
            return self._raw(name)
        parts = {part: self._raw(stored_name) for part, stored_name in stored.items()}
        obj = cls.from_parts(entry, parts, name)
        obj.check(name)
        if abs(obj.sparsity_achieved() - entry["sparsity_achieved"]) > 1e-12:
            raise FormatError(f"{self.path}: tensor {name!r}: sparsity_achieved does not match its geometry")
        return obj

    def dense(self, name: str) -> torch.Tensor:
        """The dense-with-zeros tensor of ``name`` as its entry describes it (checked by ``load``; its size
        checked against memory): the matrix the runtime multiplies by, [out, in] for a transposed tensor."""
        obj = self.load(name)
        return obj if isinstance(obj, torch.Tensor) else obj.to_dense(name)

    def source_dense(self, name: str) -> torch.Tensor:
        """``dense(name)`` in the source's orientation (``source_shape``): a transposed tensor transposed back."""
        t = self.dense(name)
        if name in self.transposed:
            check_fits_memory(t.numel() * t.element_size(), f"tensor {name!r}: transposing it back")
            t = t.t().contiguous()
        return t

    def dense_bytes(self, name: str) -> int:
        """Bytes of ``name``'s dense form, from the manifest alone (no allocation)."""
        entry = self.manifest["tensors"][name]
        return math.prod(entry["shape"]) * container.DTYPE_BITS[entry["dtype"]] // 8


def read_packed(path: str | Path) -> PackedFile:
    """Open a packed file; FormatError/InvalidInputError naming the first inconsistency.

    Checks: container validity, format name/version, the manifest schema with every field typed
    (spec.parse_metadata, the classes' part_specs), that every stored tensor is exactly what the
    manifest implies (names, dtypes, shapes, so byte for byte what its geometry needs), and nothing
    else is stored. Content invariants (index ranges, order) are checked by ``PackedFile.load``, for
    every tensor by ``verify_packed``.
    """
    parsed = container.parse_file(path)
    manifest = spec.parse_metadata(parsed.metadata, str(path))
    stored = {e.name: e for e in parsed.entries}
    expected: set[str] = set()
    version = parsed.metadata["format_version"]
    for name, entry in manifest["tensors"].items():
        pattern = spec.check_entry_keys(entry, name, version)
        if version == "1" and pattern == "balanced":
            entry["index_encoding"] = "offsets"  # v1 had one encoding; every reader sees the key
        cls = PACKED_CLASSES.get(pattern)
        if cls is None:
            shape = spec.req_shape(entry, "shape", name)
            spec.req_choice(entry, "dtype", name, container.DTYPE_BITS)
            spec.req_text(entry["reason"], f"manifest entry {name!r}: reason")
            e = stored.get(name)
            if e is None:
                raise FormatError(f"{path}: tensor {name!r} is in the manifest but not stored")
            if e.dtype != entry["dtype"] or e.shape != shape:
                raise FormatError(f"{path}: tensor {name!r} is {e.dtype} {list(e.shape)}, manifest says "
                                  f"{entry['dtype']} {list(shape)}")
            expected.add(name)
            continue
        for part, ps in cls.part_specs(entry, name).items():
            pname = spec.part_name(name, part)
            e = stored.get(pname)
            if e is None:
                raise FormatError(f"{path}: tensor {name!r}: part {part!r} is missing")
            if e.dtype != ps.dtype or e.shape != ps.shape:
                raise FormatError(f"{path}: tensor {name!r} part {part!r} is {e.dtype} {list(e.shape)}, "
                                  f"manifest implies {ps.dtype} {list(ps.shape)}")
            expected.add(pname)
    extra = sorted(set(stored) - expected)
    if extra:
        raise FormatError(f"{path}: stored tensor(s) not in the manifest: {[spec.short_repr(n) for n in extra[:5]]}")
    return PackedFile(parsed, manifest, parsed.metadata.get("tool_version", ""))


@dataclass(frozen=True)
class LayerSummary:
    name: str
    pattern: str
    shape: tuple[int, ...]
    dtype: str
    detail: str
    sparsity_achieved: float | None
    dense_bytes: int
    packed_bytes: int


def summarize(pf: PackedFile) -> list[LayerSummary]:
    """One row per source tensor: pattern, geometry, sparsity, dense vs packed bytes."""
    stored = {e.name: e for e in pf.parsed.entries}
    rows = []
    for name, entry in pf.manifest["tensors"].items():
        shape = tuple(entry["shape"])
        dense_bytes = math.prod(shape) * container.DTYPE_BITS[entry["dtype"]] // 8
        p = entry["pattern"]
        if p == "dense":
            packed, achieved = stored[name].nbytes, None
        else:
            packed = sum(e.nbytes for n, e in stored.items() if n.startswith(name + spec.PART_SEPARATOR))
            achieved = entry["sparsity_achieved"]
        detail = spec.describe_entry(entry)
        rows.append(LayerSummary(name, p, shape, entry["dtype"], detail, achieved, dense_bytes, packed))
    return rows


def verify_packed(path: str | Path, progress=None, each=None) -> PackedFile:
    """Check every invariant of a packed file (FORMAT.md, "What verify checks"): ``read_packed``,
    then ``PackedFile.load`` of every tensor (its complete check). FormatError / InvalidInputError
    (exit 4) naming the first failure; the one validator bench, unpack and the runtimes rely on.

    ``each(name, obj)``, when given, sees every loaded tensor (dense ones too) in the same pass, for a
    consumer's own checks (the model runtime's dtype range) without reading the file twice."""
    pf = read_packed(path)
    pf.hf_files()  # the recorded HF files' contents (JSON objects), which unpack --hf-folder writes
    names = pf.names()
    for i, name in enumerate(names):
        # dense entries: dtype, shape and span are checked by read_packed; loaded only for ``each``
        if each is not None or pf.manifest["tensors"][name]["pattern"] != "dense":
            obj = pf.load(name)
            if each is not None:
                each(name, obj)
        if progress:
            progress(i + 1, len(names), name)
    return pf


def check_unpack_fits(pf: PackedFile, output: Path) -> None:
    """Refuse an unpack whose largest dense tensor cannot fit in memory (exit 4) or whose output (a file
    or a folder) cannot fit on the disk of its parent folder (exit 5), with the figures."""
    sizes = {name: pf.dense_bytes(name) for name in pf.names()}
    made = [n for n in sizes if pf.manifest["tensors"][n]["pattern"] != "dense" or n in pf.transposed]
    if made:  # the dense form and its copy (a transposed tensor: one more, turned back)
        largest = max(made, key=lambda n: sizes[n] * (3 if n in pf.transposed else 2))
        factor = 3 if largest in pf.transposed else 2
        check_fits_memory(factor * sizes[largest], f"tensor {largest!r}: unpacking its dense form of {sizes[largest]} bytes")
    total = sum(sizes.values()) + sum(sizes[t] for t in pf.manifest["aliases"].values())
    free = shutil.disk_usage(output.parent).free if output.parent.is_dir() else None
    if free is not None and total > free:
        raise OutputError(f"{output.parent} has {human(free)} free; the unpacked checkpoint needs {human(total)}")


def _aliases_of(pf: PackedFile) -> dict[str, list[str]]:
    aliases_of: dict[str, list[str]] = {}
    for alias, target in pf.manifest["aliases"].items():
        aliases_of.setdefault(target, []).append(alias)
    return aliases_of


def iter_unpacked(pf: PackedFile) -> Iterator[tuple[str, torch.Tensor | bytearray]]:
    """(name, dense tensor or the stored bytes) for every tensor and alias, in manifest order (each
    tensor followed by its aliases: ``unpacked_plan``'s order), each in its source shape
    (``PackedFile.source_shape``: a transposed tensor is turned back)."""
    aliases_of = _aliases_of(pf)
    for name, entry in pf.manifest["tensors"].items():
        if entry["pattern"] == "dense" and name not in pf.transposed:
            e = pf.parsed.entry(name)
            data = container.read_bytes(pf.path, e.begin, e.end)
        else:
            data = pf.source_dense(name)
        for n in [name] + aliases_of.get(name, []):
            yield n, data


def unpacked_plan(pf: PackedFile) -> list[container.PlannedTensor]:
    """Name, dtype and source shape of every tensor and alias, in the order ``iter_unpacked`` yields them."""
    aliases_of = _aliases_of(pf)
    return [container.PlannedTensor(n, entry["dtype"], pf.source_shape(name))
            for name, entry in pf.manifest["tensors"].items() for n in [name, *aliases_of.get(name, [])]]


def unpack(path: str | Path, output: Path, *, force: bool = False) -> int:
    """Write the dense-with-zeros checkpoint of a packed file; returns the tensor count.

    Before anything is written: the output path (not an input, not a non-regular file), the whole
    file verified, the largest dense tensor checked against memory and the output's size against
    the free disk space (exit 4 / 5 with the figures). Tensors come out in their source shape (a
    transposed GPT-2 Conv1D weight as the [in, out] tensor it was).
    """
    container.check_not_an_input(Path(output), [Path(path)])
    container.check_output_path(Path(output), force=force)
    pf = verify_packed(path)
    check_unpack_fits(pf, Path(output))
    plan = [container.PlannedTensor(name, entry["dtype"], pf.source_shape(name))
            for name, entry in pf.manifest["tensors"].items()]
    for alias, target in pf.manifest["aliases"].items():  # after the tensors: the layout unpack always had
        plan.append(container.PlannedTensor(alias, pf.manifest["tensors"][target]["dtype"], pf.source_shape(target)))
    with container.AtomicOutput(Path(output), force=force) as out:
        writer = container.StreamingWriter(out.file, plan, {"format": "pt", "balprune": "unpacked",
                                                          "source_sha256": pf.manifest["source"]["sha256"]})
        for name, data in iter_unpacked(pf):
            writer.write(name, data)
        writer.finish()
        out.commit(lambda tmp: container.verify_written(tmp, writer.header_bytes, writer.crc32))
    return len(plan)
