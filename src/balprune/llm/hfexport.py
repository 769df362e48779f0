"""A packed model given back as a Hugging Face folder that ``from_pretrained`` loads (``unpack --hf-folder``).

The folder holds what an HF causal-LM folder holds: the weights dense-with-zeros (every tensor and
alias at its name, source shape and source dtype; a GPT-2 Conv1D weight back in its [in, out]
orientation) as ``model-0000K-of-0000N.safetensors`` shards of at most ``max_shard_bytes`` (a larger
tensor gets a shard of its own, as transformers does) with ``model.safetensors.index.json``
(``metadata.total_size`` and the ``weight_map``), every shard's metadata saying ``format: pt``; and the
text files prune recorded from the source folder (formats.hf_record: config.json, generation_config.json,
tokenizer files), byte for byte, or those of ``like`` (a source folder given instead).

Before anything is written: the packed file verified completely (its recorded files' contents
included), config.json checked against the weights (for the Llama family, family.check_layout on the
packed tensors' names and source shapes: what from_pretrained will look for), the largest dense
tensor against memory and the folder against the free disk. Then the folder is built beside its final
path (``.NAME.balprune-tmp-PID-RANDOM``), every file through the atomic writer (fsync, re-read, CRC
check), and renamed into place: it appears complete or not at all. With ``force`` an existing model
folder (config.json, no subfolders) is swapped out and removed only once the new one is in place.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
from dataclasses import dataclass
from pathlib import Path

from .. import container
from ..checkpoint import Checkpoint, SourceTensor
from ..errors import InvalidInputError, OutputError, UsageError
from ..formats import hf_record
from ..formats.packed_file import PackedFile, check_unpack_fits, iter_unpacked, unpacked_plan, verify_packed
from ..iopaths import check_io
from . import family
from .examples import MAX_SHARD_BYTES, _plan_shards, shard_names

#: The index file transformers reads for sharded safetensors weights.
INDEX_NAME = "model.safetensors.index.json"


@dataclass(frozen=True)
class HfExport:
    """What ``export_hf_folder`` wrote: the folder, the tensor count (aliases included), the shard file
    names, the recorded files written (config.json first) and notes (files of ``like`` left out)."""

    folder: Path
    tensors: int
    shards: tuple[str, ...]
    files: tuple[str, ...]
    notes: tuple[str, ...] = ()


def export_hf_folder(packed: str | os.PathLike[str], folder: str | os.PathLike[str], *,
                     like: str | os.PathLike[str] | None = None, force: bool = False,
                     max_shard_bytes: int = MAX_SHARD_BYTES) -> HfExport:
    """Write the HF folder of ``packed`` at ``folder`` (module doc); returns what was written.

    The config and tokenizer files come from ``like`` when given (a folder holding config.json), else
    from the packed file's record; neither: UsageError (exit 2). Errors: UnsafeInputError (exit 3) when
    an input lies in ``folder``; OutputError (exit 5) for a folder that exists without ``force`` (an
    empty one is fine), is not a folder, or (with ``force``) does not look like a model folder;
    InvalidInputError / FormatError (exit 4) for a bad packed file, a bad ``like`` folder or a config
    that does not fit the weights.
    """
    packed, out = Path(packed), Path(folder)
    if not isinstance(max_shard_bytes, int) or isinstance(max_shard_bytes, bool) or max_shard_bytes < 1:
        raise UsageError(f"the shard size must be a positive number of bytes, got {max_shard_bytes!r}")
    like_files = _like_inputs(like)
    inputs = [("packed file", packed), *like_files]
    check_io(inputs=inputs, outputs=[("--hf-folder", out)], trees=[("--hf-folder", out)])
    replace = _check_destination(out, force)
    pf = verify_packed(packed)
    files = _recorded_files(pf, like)
    _check_config(files, pf)
    check_unpack_fits(pf, out)
    plan = unpacked_plan(pf)
    shards = _plan_shards(plan, max_shard_bytes)
    names = shard_names(len(shards))
    tmp = container.temp_folder_beside(out)
    committed = len(container.COMMITTED)
    try:
        _write_folder(pf, tmp, shards, names, files)
        _move_into_place(tmp, out, replace)
    finally:
        del container.COMMITTED[committed:]  # the files of the temp folder are not outputs; the folder is
        if tmp.is_dir() and not tmp.is_symlink():
            shutil.rmtree(tmp, ignore_errors=True)
    container.COMMITTED.append(out)
    return HfExport(out, len(plan), tuple(names), tuple(files.texts), files.notes)


def _like_inputs(like: str | os.PathLike[str] | None) -> list[tuple[str, Path]]:
    """The files of ``like`` that would be read, as check_io inputs (the folder itself when it has none)."""
    if like is None:
        return []
    folder = Path(like)
    found = [("--like", folder / n) for n in hf_record.HF_FILES if os.path.lexists(folder / n)]
    return found or [("--like", folder)]


def _check_destination(out: Path, force: bool) -> bool:
    """Whether an existing folder is to be replaced; OutputError (exit 5) when ``out`` may not be written."""
    if out.is_symlink():
        raise OutputError(f"output {out} is a symbolic link; give the folder's own path")
    if not out.parent.is_dir():
        raise OutputError(f"output folder {out.parent} does not exist")
    if not os.access(out.parent, os.W_OK | os.X_OK):
        raise OutputError(f"cannot write in {out.parent}")
    if not out.exists():
        return False
    if not out.is_dir():
        raise OutputError(f"output {out} exists and is not a folder; refusing to replace it")
    entries = list(out.iterdir())
    if not entries:
        return False  # an empty folder is replaced by the rename itself
    if not force:
        raise OutputError(f"output folder {out} is not empty", hint="pass --force to replace it")
    # --force removes the old folder: only ever one that looks like a model folder, never a tree
    odd = next((e for e in entries if e.is_symlink() or not e.is_file()), None)
    if odd is not None or not (out / "config.json").is_file():
        why = f"it holds {odd.name!r}, which is not a plain file" if odd is not None else "it has no config.json"
        raise OutputError(f"refusing to replace {out}: {why}, so it is not a model folder",
                          hint="choose a new or empty folder")
    return True


def _recorded_files(pf: PackedFile, like: str | os.PathLike[str] | None) -> hf_record.HfFiles:
    """The config and tokenizer files to write: ``like``'s when given, else the packed file's record."""
    if like is not None:
        if not Path(like).is_dir():
            raise InvalidInputError(f"--like {like} is not a folder (the source HF folder holding config.json)")
        files = hf_record.read_folder(like, "--like folder")
        if files is None:
            raise InvalidInputError(f"--like folder {like} holds no config.json")
        return files
    files = pf.hf_files()
    if files is None:
        raise UsageError(f"{pf.path} records no config.json (it was not pruned from a Hugging Face folder); "
                         "give the source folder with --like FOLDER")
    return files


def _check_config(files: hf_record.HfFiles, pf: PackedFile) -> None:
    """For a model type of the Llama family, config.json must describe exactly the packed tensors (names,
    source shapes, float dtypes): what from_pretrained will look for. Other model types are written as
    they are (their config.json was checked to be a JSON object with a string model_type)."""
    where = f"--like {files.paths[0]}" if files.paths else f"{pf.path}: recorded config.json"
    cfg = family.check_recorded(files.config, where)
    if cfg is None:
        return
    view = Checkpoint(str(pf.path), [])
    view.tensors = tuple(SourceTensor(n, e["dtype"], pf.source_shape(n), pf.dense_bytes(n))
                         for n, e in pf.manifest["tensors"].items())
    view.aliases = dict(pf.manifest["aliases"])
    family.check_layout(cfg, view, where)


def _write_folder(pf: PackedFile, tmp: Path, shards: list[list[container.PlannedTensor]], names: list[str],
                  files: hf_record.HfFiles) -> None:
    """The shards (one dense tensor in memory at a time, in ``unpacked_plan`` order), the index, then the
    recorded files with config.json last; each file atomic and verified."""
    meta = {"format": "pt", "balprune": "unpacked", "source_sha256": pf.manifest["source"]["sha256"]}
    tensors = iter_unpacked(pf)
    weight_map: dict[str, str] = {}
    for file, shard in zip(names, shards):
        with container.AtomicOutput(tmp / file) as atomic:
            writer = container.StreamingWriter(atomic.file, shard, meta)
            for planned in shard:
                name, data = next(tensors)
                if name != planned.name:  # unpacked_plan and iter_unpacked share one order
                    raise AssertionError(f"unpacked {name!r} where the shard plan has {planned.name!r}")
                writer.write(name, data)
                weight_map[name] = file
            writer.finish()
            atomic.commit(lambda t, w=writer: container.verify_written(t, w.header_bytes, w.crc32))
    index = {"metadata": {"total_size": sum(t.nbytes for shard in shards for t in shard)},
             "weight_map": dict(sorted(weight_map.items()))}
    container.write_bytes_atomic(tmp / INDEX_NAME, (json.dumps(index, indent=2) + "\n").encode(), force=False)
    for name in sorted(files.texts, key=lambda n: n == "config.json"):
        container.write_bytes_atomic(tmp / name, files.texts[name].encode("utf-8"), force=False)


def _move_into_place(tmp: Path, out: Path, replace: bool) -> None:
    """Rename the finished folder to ``out``; with ``replace`` the old folder is moved aside first, put
    back if the rename fails, and removed once the new one is in place."""
    if not replace:
        try:
            os.rename(tmp, out)  # replaces an empty folder; fails if anything appeared in it meanwhile
        except OSError as exc:
            raise OutputError(f"cannot move the written folder to {out}: {exc.strerror or exc}",
                              hint="was something written there meanwhile?") from None
        return
    old = out.parent / f".{out.name}.balprune-old-{os.getpid()}-{secrets.token_hex(4)}"
    try:
        os.rename(out, old)
    except OSError as exc:
        raise OutputError(f"cannot move the old folder {out} aside: {exc.strerror or exc}") from None
    try:
        os.rename(tmp, out)
    except BaseException as exc:
        os.rename(old, out)  # the old folder back where it was
        if isinstance(exc, OSError):
            raise OutputError(f"cannot move the written folder to {out}: {exc.strerror or exc}") from None
        raise
    shutil.rmtree(old, ignore_errors=True)
