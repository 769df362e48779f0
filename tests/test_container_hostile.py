"""The safetensors container against hostile paths and headers (issue 14, classes 2-4; bad-inputs.md 28-30).

Input side: a FIFO, a device or a link to one given as a packed file (or checkpoint) is refused
before a byte is read, never a hang (real processes, with a timeout); a header nested deeper than
any real one is exit 4, not a RecursionError; dimensions beyond int64 are refused before torch sees
them. Output side: an existing output path that is not a regular file (a FIFO, /dev/null, a link to
one, a dangling link) is never opened or replaced, with or without --force: exit 5, one line, the
node unchanged, no temp file left; a regular file is still replaced with --force.
"""

from __future__ import annotations

import json
import os
import stat
import struct
import time
from pathlib import Path

import pytest
import torch
from helpers import one_error_line, run_subprocess, sha256, small_state_dict

from balprune.cli import main

#: A hang is the failure mode of FIFOs: every real process gets this long at most.
TIMEOUT = 60




def st_bytes(header: dict | bytes, data: bytes = b"") -> bytes:
    hb = header if isinstance(header, bytes) else json.dumps(header).encode()
    hb += b" " * (-len(hb) % 8)
    return struct.pack("<Q", len(hb)) + hb + data


def temp_files(folder: Path) -> list[str]:
    return sorted(p.name for p in Path(folder).iterdir() if "balprune-tmp" in p.name)


@pytest.fixture(scope="module")
def packed(tmp_path_factory) -> Path:
    """A valid packed file made by the real `balprune prune`."""
    folder = tmp_path_factory.mktemp("made")
    src = folder / "model.pt"
    torch.save(small_state_dict(), src)
    out = folder / "packed.safetensors"
    assert main(["prune", str(src), "-s", "0.5", "-o", str(out)]) == 0
    return out


def _command(command: str, path: Path, out_dir: Path) -> list:
    return {"verify": ["verify", path], "inspect": ["inspect", path],
            "unpack": ["unpack", path, "-o", out_dir / "dense.safetensors"],
            "bench": ["bench", path, "--json", out_dir / "bench.json"],
            "prune": ["prune", path, "-s", "0.5", "-o", out_dir / "pruned.safetensors"]}[command]


# --------------------------------------------------------------------------- non-regular inputs

def _plant(p: Path, kind: str) -> Path:
    """Something that is not a regular file at ``p`` (its folder exists): a FIFO, a link to one, a link to
    a device node, a dangling link; ``dev-null`` is /dev/null itself (``p`` is not used)."""
    if kind == "dev-null":
        return Path("/dev/null")
    if kind == "fifo":
        os.mkfifo(p)
    elif kind == "fifo-link":
        os.mkfifo(p.parent / "pipe")
        p.symlink_to(p.parent / "pipe")
    elif kind.endswith("-link") and kind.startswith("dev-"):  # dev-zero-link, dev-urandom-link, dev-null-link
        p.symlink_to("/dev/" + kind[len("dev-"):-len("-link")])
    elif kind == "dangling-link":
        p.symlink_to(p.parent / "nowhere" / "x.safetensors")
    else:
        raise ValueError(kind)
    return p


def _non_regular_input(tmp_path: Path, kind: str) -> Path:
    return _plant(tmp_path / ("model.safetensors" if kind == "dev-urandom-link" else "packed.safetensors"), kind)


@pytest.mark.parametrize("command", ["verify", "inspect", "unpack", "bench", "prune"])
@pytest.mark.parametrize("kind", ["fifo", "fifo-link", "dev-zero-link", "dev-urandom-link", "dev-null"])
def test_non_regular_input_refused_before_reading(tmp_path, kind, command):
    path = _non_regular_input(tmp_path, kind)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    before = os.stat(path).st_mode
    t0 = time.monotonic()
    r = run_subprocess(*_command(command, path, out_dir), timeout=TIMEOUT)
    assert time.monotonic() - t0 < TIMEOUT
    assert r.returncode == 4, (r.returncode, r.stderr)
    line = one_error_line(r.stderr, r.stdout)
    assert "not a regular file" in line
    assert os.stat(path).st_mode == before  # the FIFO is still a FIFO, the device a device
    assert list(out_dir.iterdir()) == []


# --------------------------------------------------------------------------- hostile headers

def _nested_header(depth: int) -> bytes:
    return b'{"w":{"dtype":"F32","shape":' + b"[" * depth + b"]" * depth + b',"data_offsets":[0,0]}}'


HEADERS = {
    "nesting-bomb-in-entry": (_nested_header(100_000), ("nested",)),
    "nesting-bomb-in-metadata": (b'{"__metadata__":{"x":' + b"[" * 50_000 + b"]" * 50_000 + b"}}", ("nested",)),
    "nesting-just-over-the-limit": (_nested_header(65), ("nested",)),
    "dimension-beyond-int64": (json.dumps({"w": {"dtype": "F32", "shape": [0, 2**64],
                                                 "data_offsets": [0, 0]}}).encode(), ("'w'", "shape")),
    "elements-beyond-int64": (json.dumps({"w": {"dtype": "F32", "shape": [0, 2**40, 2**40],
                                                "data_offsets": [0, 0]}}).encode(), ("'w'", "2^63")),
    "duplicate-tensor-key": (b'{"w":{"dtype":"F32","shape":[0],"data_offsets":[0,0]},'
                             b'"w":{"dtype":"F32","shape":[0],"data_offsets":[0,0]}}', ("duplicate",)),
    "dtype-list": (b'{"w":{"dtype":["F32"],"shape":[0],"data_offsets":[0,0]}}', ("'w'", "dtype")),
    "dtype-dict": (b'{"w":{"dtype":{"F32":1},"shape":[0],"data_offsets":[0,0]}}', ("'w'", "dtype")),
    "shape-string": (b'{"w":{"dtype":"F32","shape":"[0]","data_offsets":[0,0]}}', ("'w'", "shape")),
    "offsets-floats": (b'{"w":{"dtype":"F32","shape":[0],"data_offsets":[0.0,0.0]}}', ("'w'", "data_offsets")),
    "metadata-value-list": (b'{"__metadata__":{"format":["balprune.packed"]}}', ("__metadata__",)),
    "huge-name": (b'{"' + b"n" * 200_000 + b'":{"dtype":"F32","shape":[1],"data_offsets":[0,0]}}', ("tensor",)),
    "nan-literal": (b'{"w":{"dtype":"F32","shape":[NaN],"data_offsets":[0,0]}}', ("JSON",)),
}


@pytest.mark.parametrize("command", ["verify", "inspect", "unpack", "prune"])
@pytest.mark.parametrize("case", list(HEADERS))
def test_hostile_header_refused(cli, tmp_path, case, command):
    header, mentions = HEADERS[case]
    path = tmp_path / "in" / "x.safetensors"
    path.parent.mkdir()
    path.write_bytes(st_bytes(header))
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    before = sha256(path)
    r = cli(*_command(command, path, out_dir))
    assert r.code == 4, r
    line = one_error_line(r.err, r.out)
    for m in mentions:
        assert m in line, f"{m!r} not in {line!r}"
    assert len(line) < 1000
    assert sha256(path) == before
    assert list(out_dir.iterdir()) == []


def test_a_zero_size_tensor_with_large_dims_is_still_read(cli, tmp_path):
    """Within int64 a zero-element tensor of any dims is valid (no bytes, no allocation)."""
    from balprune.container import parse_file, read_bytes, tensor_from_bytes

    p = tmp_path / "x.safetensors"
    p.write_bytes(st_bytes({"w": {"dtype": "F32", "shape": [0, 2**62], "data_offsets": [0, 0]}}))
    e = parse_file(p).entries[0]
    assert tensor_from_bytes(read_bytes(p, e.begin, e.end), e.dtype, e.shape, name="w").shape == (0, 2**62)


# --------------------------------------------------------------------------- non-regular outputs

def _non_regular_output(tmp_path: Path, kind: str) -> Path:
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    return _plant(out_dir / "dense.safetensors", kind)


def _snapshot(p: Path) -> tuple:
    st = os.lstat(p)
    target = os.readlink(p) if stat.S_ISLNK(st.st_mode) else None
    return st.st_mode, st.st_ino, target


@pytest.mark.parametrize("force", [False, True])
@pytest.mark.parametrize("command", ["unpack", "prune"])
@pytest.mark.parametrize("kind", ["fifo", "fifo-link", "dev-null-link", "dev-null", "dangling-link"])
def test_non_regular_output_never_replaced(packed, tmp_path, kind, command, force):
    out = _non_regular_output(tmp_path, kind)
    src = tmp_path / "model.pt"
    torch.save(small_state_dict(), src)
    inp = packed if command == "unpack" else src
    before_in = sha256(inp)
    before = _snapshot(out)
    listing = sorted(p.name for p in (tmp_path / "out").iterdir())
    args = ["unpack", inp, "-o", out] if command == "unpack" else ["prune", inp, "-s", "0.5", "-o", out]
    t0 = time.monotonic()
    r = run_subprocess(*args, *(["--force"] if force else []), timeout=TIMEOUT)
    assert time.monotonic() - t0 < TIMEOUT
    assert r.returncode == 5, (r.returncode, r.stderr)
    line = one_error_line(r.stderr, r.stdout)
    assert str(out) in line
    if kind != "dangling-link":
        assert "not a regular file" in line and "--force" in line
    assert _snapshot(out) == before
    assert sha256(inp) == before_in
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == listing
    assert temp_files(out.parent) == [] if out.parent != Path("/dev") else True


def test_regular_output_still_replaced_with_force(cli, packed, tmp_path):
    out = tmp_path / "dense.safetensors"
    out.write_bytes(b"old")
    r = cli("unpack", packed, "-o", out)
    assert r.code == 5 and "exists" in one_error_line(r.err, r.out)
    assert out.read_bytes() == b"old"
    assert cli("unpack", packed, "-o", out, "--force").code == 0
    assert out.read_bytes()[:8] != b"old" and temp_files(tmp_path) == []


def test_link_to_a_regular_output_is_replaced_by_the_file_not_followed(cli, packed, tmp_path):
    """Existing behaviour kept: with --force a symlink to a regular file is replaced by the new file
    (the rename replaces the link); the file it pointed at is untouched."""
    target = tmp_path / "elsewhere.safetensors"
    target.write_bytes(b"keep me")
    out = tmp_path / "dense.safetensors"
    out.symlink_to(target)
    assert cli("unpack", packed, "-o", out, "--force").code == 0
    assert not out.is_symlink() and target.read_bytes() == b"keep me"


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs on this platform")
def test_nothing_planted_at_temp_names_is_opened_followed_or_removed(tmp_path):
    """Temp files are created exclusively under a fresh random name: a FIFO or a link planted where a
    temp file could go is never opened (a FIFO would block the writer), followed or removed."""
    from balprune.container import AtomicOutput

    final = tmp_path / "o.safetensors"
    victim = tmp_path / "victim"
    victim.write_bytes(b"keep")
    fifo = tmp_path / f".{final.name}.balprune-tmp-{os.getpid()}"
    os.mkfifo(fifo)
    link = tmp_path / f".{final.name}.balprune-tmp-{os.getpid()}-0"
    os.symlink(victim, link)
    with AtomicOutput(final, force=True) as out:
        assert out.temp_path.name.startswith(f".{final.name}.balprune-tmp-{os.getpid()}-")
        assert out.temp_path not in (fifo, link) and stat.S_ISREG(os.lstat(out.temp_path).st_mode)
        out.file.write(b"new")
        out.commit()
    assert final.read_bytes() == b"new" and victim.read_bytes() == b"keep"
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode) and os.path.islink(link)
