"""The one owner of "may this command write there": no output replaces an input, no two outputs share a file.

Every command that writes files calls ``check_io`` with all of its inputs and all of its outputs
before any work (and again, for inputs it only learns on the way, such as the shards of a folder
or a recipe's ``init`` checkpoint, before it reads them for real):

- two outputs naming one file: UsageError (exit 2), a mistake on the command line;
- an output naming an input: UnsafeInputError (exit 3), refused for safety;
- an input lying inside a folder the command replaces or empties (``trees``: a sweep's ``runs/``):
  UnsafeInputError (exit 3).

"One file" means the same file whichever way it is named: the same path, a symlink to it, or a
hard link (same st_dev and st_ino). A path that does not exist yet is compared by its real path
(links in its folders, or a dangling link at its end, resolved), so ``-o x --json ./d/../x`` is
caught before either exists. Nothing is opened or read here: only stat and realpath.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from .errors import UnsafeInputError, UsageError

#: (label shown in the message, e.g. "--json" or "checkpoint", path or None when not given)
Named = Iterable[tuple[str, "str | os.PathLike[str] | None"]]


def _identity(path: Path) -> tuple:
    """What makes two names one file: (dev, inode) when it exists, else its real path."""
    try:
        st = os.stat(path)
    except (OSError, ValueError):
        return ("path", os.path.realpath(path))
    return ("file", st.st_dev, st.st_ino)


def _given(named: Named) -> list[tuple[str, Path]]:
    return [(label, Path(p)) for label, p in named if p is not None]


def _named(label: str, path: Path) -> str:
    return f"{label} {path}" if label else str(path)


def _inside(path: Path, folder: Path) -> bool:
    real, top = os.path.realpath(path), os.path.realpath(folder)
    return os.path.commonpath([real, top]) == top


def check_io(*, inputs: Named = (), outputs: Named = (), trees: Named = ()) -> None:
    """Refuse outputs that collide with each other or with an input (module docstring).

    ``inputs`` and ``outputs`` are (label, path) pairs (None paths are skipped); ``trees`` are
    folders whose contents the command replaces or deletes. Raises UsageError (exit 2) for two
    outputs on one file and UnsafeInputError (exit 3) for an output over an input.
    """
    outs = _given(outputs)
    ins = _given(inputs)
    seen: dict[tuple, tuple[str, Path]] = {}
    for label, path in outs:
        key = _identity(path)
        if key in seen:
            other_label, other = seen[key]
            same = f"{path}" if str(path) == str(other) else f"{other} and {path}"
            raise UsageError(f"{other_label} and {label} name the same file ({same}); give each output its own path")
        seen[key] = (label, path)
    for label, path in ins:
        hit = seen.get(_identity(path))
        if hit is not None:
            out_label, out = hit
            raise UnsafeInputError(f"output {_named(out_label, out)} is the input {_named(label, path)}; refusing to "
                                   "write over an input", hint="choose another output path")
    for tree_label, tree in _given(trees):
        for label, path in ins:
            if _inside(path, tree):
                raise UnsafeInputError(f"input {_named(label, path)} lies in {tree}, which {tree_label} replaces; "
                                       "refusing to delete an input", hint="move the input or choose another folder")
