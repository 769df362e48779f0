"""Reading packed files strictly, verifying every invariant, inspecting and unpacking them."""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import container
from ..errors import FormatError
from . import PACKED_CLASSES, spec


@dataclass(frozen=True)
class PackedFile:
    """A packed file whose header, metadata, manifest and part shapes have been validated."""

    parsed: container.ParsedFile
    manifest: dict
    tool_version: str

    @property
    def path(self) -> Path:
        return self.parsed.path

    def names(self) -> list[str]:
        return list(self.manifest["tensors"])

    def _raw(self, stored_name: str) -> torch.Tensor:
        e = self.parsed.entry(stored_name)
        buf = container.read_bytes(self.path, e.begin, e.end)
        return container.tensor_from_bytes(buf, e.dtype, e.shape, name=stored_name)

    def load(self, name: str):
        """The packed object (BalancedTensor, CsrTensor, BsrTensor) or the dense tensor of ``name``."""
        entry = self.manifest["tensors"][name]
        cls = PACKED_CLASSES.get(entry["pattern"])
        if cls is None:
            return self._raw(name)
        parts = {part: self._raw(spec.part_name(name, part)) for part in cls.part_specs(entry, name)}
        return cls.from_parts(entry, parts, name)

    def dense(self, name: str) -> torch.Tensor:
        obj = self.load(name)
        return obj if isinstance(obj, torch.Tensor) else obj.to_dense()


def read_packed(path: str | Path) -> PackedFile:
    """Open a packed file; FormatError/InvalidInputError naming the first inconsistency.

    Checks: container validity, format name/version, manifest schema, that every stored tensor
    is exactly what the manifest implies (names, dtypes, shapes), and nothing else is stored.
    Content invariants (index ranges, order) are ``verify``'s job.
    """
    parsed = container.parse_file(path)
    manifest = spec.parse_metadata(parsed.metadata, str(path))
    stored = {e.name: e for e in parsed.entries}
    expected: set[str] = set()
    for name, entry in manifest["tensors"].items():
        pattern = spec.check_entry_keys(entry, name)
        cls = PACKED_CLASSES.get(pattern)
        if cls is None:
            shape = spec.req_shape(entry, "shape", name)
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
        raise FormatError(f"{path}: stored tensor(s) not in the manifest: {extra[:5]}")
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


def verify_packed(path: str | Path, progress=None) -> PackedFile:
    """Check every invariant of a packed file (FORMAT.md); FormatError naming the first failure."""
    pf = read_packed(path)
    names = pf.names()
    for i, name in enumerate(names):
        entry = pf.manifest["tensors"][name]
        if entry["pattern"] != "dense":  # dense tensors were checked (dtype, shape, span) by read_packed
            obj = pf.load(name)
            obj.check(name)
            if abs(obj.manifest()["sparsity_achieved"] - entry["sparsity_achieved"]) > 1e-12:
                raise FormatError(f"{path}: tensor {name!r}: sparsity_achieved does not match its geometry")
        if progress:
            progress(i + 1, len(names), name)
    return pf


def iter_unpacked(pf: PackedFile) -> Iterator[tuple[str, torch.Tensor | bytearray]]:
    """(name, dense tensor or the stored bytes) for every tensor and alias, in manifest order."""
    aliases_of: dict[str, list[str]] = {}
    for alias, target in pf.manifest["aliases"].items():
        aliases_of.setdefault(target, []).append(alias)
    for name, entry in pf.manifest["tensors"].items():
        if entry["pattern"] == "dense":
            e = pf.parsed.entry(name)
            data = container.read_bytes(pf.path, e.begin, e.end)
        else:
            data = pf.dense(name)
        for n in [name] + aliases_of.get(name, []):
            yield n, data


def unpack(path: str | Path, output: Path, *, force: bool = False) -> int:
    """Write the dense-with-zeros checkpoint of a packed file; returns the tensor count."""
    container.check_not_an_input(Path(output), [Path(path)])
    pf = verify_packed(path)
    plan = []
    for name, entry in pf.manifest["tensors"].items():
        plan.append(container.PlannedTensor(name, entry["dtype"], tuple(entry["shape"])))
    for alias, target in pf.manifest["aliases"].items():
        entry = pf.manifest["tensors"][target]
        plan.append(container.PlannedTensor(alias, entry["dtype"], tuple(entry["shape"])))
    with container.AtomicOutput(Path(output), force=force) as out:
        writer = container.StreamingWriter(out.file, plan, {"format": "balprune.unpacked",
                                                          "source_sha256": str(pf.manifest["source"].get("sha256", ""))})
        for name, data in iter_unpacked(pf):
            writer.write(name, data)
        writer.finish()
        out.commit(lambda tmp: container.verify_written(tmp, writer.header_bytes, writer.crc32))
    return len(plan)
