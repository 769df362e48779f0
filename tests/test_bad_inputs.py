"""Bad inputs and faults (docs: /work/shared/bad-inputs.md, items 1-23; 24-26 are GPU-only).

Every case runs the real CLI on real files (in-process through ``main``; signals and rlimits in
a subprocess) and checks the whole promise: the documented exit code, one ``balprune: error:``
line on stderr and no traceback, the inputs byte-identical afterwards, nothing at the output
path and no ``.NAME.balprune-tmp-PID-RANDOM`` file left behind.
"""

from __future__ import annotations

import builtins
import hashlib
import json
import os
import pickle
import random
import resource
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import REPO, run_subprocess, small_state_dict
from safetensors import safe_open
from safetensors.torch import save_file

# --------------------------------------------------------------------------- helpers


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def listing(folder: Path) -> dict[str, str]:
    """relative path -> sha256 (or link target) of everything under ``folder``, dot files included."""
    folder = Path(folder)
    out: dict[str, str] = {}
    if not folder.exists():
        return out
    for p in sorted(folder.rglob("*")):
        rel = str(p.relative_to(folder))
        if p.is_symlink():
            out[rel] = f"link -> {os.readlink(p)}"
        elif p.is_file():
            st = p.stat()
            # huge (sparse) files: size and mtime; everything else: the full hash
            out[rel] = sha256(p) if st.st_size < (256 << 20) else f"{st.st_size}:{st.st_mtime_ns}"
        else:
            out[rel] = "dir"
    return out


def temp_files(folder: Path) -> list[str]:
    return sorted(str(p) for p in Path(folder).rglob("*") if "balprune-tmp" in p.name)


class Guard:
    """Snapshot folders (inputs and output folder) before a failing run; check nothing changed."""

    def __init__(self, *folders: Path) -> None:
        self.folders = [Path(f) for f in folders]
        self.before = {f: listing(f) for f in self.folders}

    def assert_unchanged(self) -> None:
        for f in self.folders:
            assert temp_files(f) == [], f"temp file left behind in {f}"
            assert listing(f) == self.before[f], f"files under {f} changed"


def assert_one_error_line(err: str, out: str = "") -> str:
    assert "Traceback" not in err and "Traceback" not in out, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, f"expected one stderr line, got {lines!r}"
    assert lines[0].startswith("balprune: error:"), lines[0]
    return lines[0]


def assert_fails(r, code: int, guard: Guard | None = None, *, mentions=(), output: Path | None = None) -> str:
    """The documented failure: exit ``code``, one error line naming ``mentions``, nothing changed."""
    assert r.code == code, f"expected exit {code}, got {r!r}"
    line = assert_one_error_line(r.err, r.out)
    for m in mentions:
        assert m in line, f"{m!r} not named in {line!r}"
    if guard is not None:
        guard.assert_unchanged()
    if output is not None:
        assert not Path(output).exists(), f"{output} appeared"
        assert temp_files(Path(output).parent) == []
    return line


def assert_ok(r) -> None:
    assert r.code == 0, r
    assert "Traceback" not in r.err


# safetensors bytes, built by hand so every field can be broken on purpose

def st_bytes(header: object, data: bytes = b"", *, length: int | None = None, pad: bool = True) -> bytes:
    if isinstance(header, (bytes, bytearray)):
        hb = bytes(header)
    else:
        hb = json.dumps(header).encode()
        if pad:
            hb += b" " * (-len(hb) % 8)
    n = len(hb) if length is None else length
    return struct.pack("<Q", n) + hb + data


def read_st(path: Path) -> tuple[dict, bytes]:
    raw = Path(path).read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def write_st(path: Path, header: dict, data: bytes) -> None:
    Path(path).write_bytes(st_bytes(header, data))


def valid_header() -> tuple[dict, bytes]:
    """A valid two-tensor file: 'w' F32 [2, 3] then 'b' F32 [3]."""
    data = torch.arange(9, dtype=torch.float32).numpy().tobytes()
    header = {"w": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]},
              "b": {"dtype": "F32", "shape": [3], "data_offsets": [24, 36]}}
    return header, data


def tensor_bytes(t: torch.Tensor) -> bytes:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def inspect_entry(cli, packed: Path, name: str) -> dict:
    """The manifest entry of ``name`` from `balprune inspect --json` (tensors as a list or a mapping)."""
    r = cli("inspect", packed, "--json")
    assert_ok(r)
    tensors = json.loads(r.out)["manifest"]["tensors"]
    if isinstance(tensors, dict):
        return tensors[name]
    return next(e for e in tensors if e["name"] == name)


def run_json(cli, *args) -> dict:
    r = cli(*args, "--json")
    assert_ok(r)
    return json.loads(r.out)


def actions(report: dict) -> dict[str, str]:
    return {t["name"]: t["action"] for t in report["tensors"]}


# --------------------------------------------------------------------------- 1. option values

BAD_SPARSITY = ["-0.1", "1.5", "nan", "inf", "50%", "1_0", "", "1.0", "1", "-inf", "0.5.5", "true"]


@pytest.mark.parametrize("value", BAD_SPARSITY)
def test_01_bad_sparsity_is_usage_error_before_any_file(cli, tmp_path, value):
    missing = tmp_path / "does-not-exist.pt"  # a file error would be exit 4: 2 proves the option came first
    g = Guard(tmp_path)
    r = cli("prune", missing, f"--sparsity={value}", "-o", tmp_path / "out.safetensors")
    assert_fails(r, 2, g, mentions=("--sparsity",), output=tmp_path / "out.safetensors")


@pytest.mark.parametrize("value", ["-0.1", "nan", "", "1.0", "50%"])
def test_01_bad_sparsity_on_real_file(cli, small_pt, value):
    g = Guard(small_pt.parent)
    r = cli("prune", small_pt, "--sparsity", value)
    assert_fails(r, 2, g, mentions=("--sparsity",))


@pytest.mark.parametrize("option", ["--blocks", "--block-size"])
@pytest.mark.parametrize("value", ["0", "-3", "2.5", "1_0", "", "x"])
def test_01_bad_blocks_is_usage_error_before_any_file(cli, tmp_path, option, value):
    missing = tmp_path / "does-not-exist.pt"
    g = Guard(tmp_path)
    r = cli("prune", missing, "-s", "0.5", f"{option}={value}", "-o", tmp_path / "out.safetensors")
    assert_fails(r, 2, g, mentions=(option,), output=tmp_path / "out.safetensors")


def test_01_sparsity_zero_warns_and_passes_everything_through(cli, small_pt, tmp_path):
    out = tmp_path / "out.safetensors"
    before = sha256(small_pt)
    r = cli("prune", small_pt, "--sparsity", "0", "-o", out, "--json")
    assert_ok(r)
    assert "warning" in r.err and "sparsity 0" in r.err
    report = json.loads(r.out)
    assert set(actions(report).values()) == {"passed"}
    assert sha256(small_pt) == before
    assert cli("verify", out).code == 0
    # everything passes through unchanged
    with safe_open(str(out), "pt") as f:
        for name, t in small_state_dict().items():
            assert torch.equal(f.get_tensor(name), t), name


# --------------------------------------------------------------------------- 2. keep-count rounding

@pytest.mark.parametrize("s,length,k", [(0.9, 47, 5), (0.5, 3, 2), (0.8, 47, 9), (0.625, 8, 3), (0.92, 25, 2)])
def test_02_keep_count_rule_recorded_in_manifest(cli, tmp_path, s, length, k):
    src = tmp_path / "m.safetensors"
    save_file({"w": torch.randn(4, 3 * length)}, str(src))
    out = tmp_path / "out.safetensors"
    assert_ok(cli("prune", src, "-s", str(s), "--block-size", str(length), "-o", out))
    entry = inspect_entry(cli, out, "w")
    assert entry["keep"] == k and entry["block_length"] == length
    assert entry["sparsity_achieved"] == pytest.approx(1 - k / length)
    assert entry["sparsity_target"] == s


# --------------------------------------------------------------------------- 3. awkward block geometry

def test_03_block_length_beyond_uint16_names_the_tensor(cli, tmp_path):
    src = tmp_path / "m.safetensors"
    save_file({"wide.weight": torch.randn(2, 70000)}, str(src))
    out = tmp_path / "out.safetensors"
    g = Guard(tmp_path)
    r = cli("prune", src, "-s", "0.5", "--blocks", "1", "-o", out)
    assert_fails(r, 4, g, mentions=("'wide.weight'",), output=out)


@pytest.mark.parametrize("args", [("--blocks", "200"), ("--block-size", "1")])
def test_03_block_length_one_passes_through_with_reason(cli, tmp_path, args):
    src = tmp_path / "m.safetensors"
    save_file({"fc.weight": torch.randn(4, 100)}, str(src))
    out = tmp_path / "out.safetensors"
    report = run_json(cli, "prune", src, "-s", "0.5", *args, "-o", out)
    (t,) = report["tensors"]
    assert t["action"] == "passed" and "block length 1" in t["reason"]
    assert cli("verify", out).code == 0


def test_03_more_blocks_than_columns_uses_fewer_blocks(cli, tmp_path):
    src = tmp_path / "m.safetensors"
    save_file({"fc.weight": torch.randn(4, 100)}, str(src))
    out = tmp_path / "out.safetensors"
    report = run_json(cli, "prune", src, "-s", "0.5", "--blocks", "60", "-o", out)
    assert report["tensors"][0]["action"] == "pruned"
    entry = inspect_entry(cli, out, "fc.weight")
    assert entry["blocks_requested"] == 60 and entry["blocks"] == 50 and entry["block_length"] == 2
    assert cli("verify", out).code == 0


# --------------------------------------------------------------------------- 4-5. unsafe pickles

class _OpenPayload:
    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (builtins.open, (self.path, "w"))


class _SystemPayload:
    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


@pytest.mark.parametrize("payload", [_OpenPayload, _SystemPayload])
@pytest.mark.parametrize("how", ["zip", "legacy", "raw-pickle"])
def test_04_pickle_payload_refused_and_never_runs(cli, tmp_path, payload, how):
    canary = tmp_path / "CANARY"
    src = tmp_path / "evil.pt"
    obj = {"w": torch.randn(4, 8), "x": payload(str(canary))}
    if how == "zip":
        torch.save(obj, src)
    elif how == "legacy":
        torch.save(obj, src, _use_new_zipfile_serialization=False)
    else:
        src.write_bytes(pickle.dumps({"x": payload(str(canary)), "y": [1, 2]}))
    assert not canary.exists()  # creating the file did not run the payload
    out = tmp_path / "out.safetensors"
    g = Guard(tmp_path)
    r = cli("prune", src, "-s", "0.5", "-o", out)
    assert not canary.exists(), "the pickle payload ran"
    assert_fails(r, 3, g, output=out)


def test_04_payload_refused_in_a_real_process_with_one_stderr_line(tmp_path):
    """Through the installed entry point: no warning or traceback from torch.load on stderr."""
    canary = tmp_path / "CANARY"
    src = tmp_path / "evil.pt"
    src.write_bytes(pickle.dumps({"x": _OpenPayload(str(canary)), "y": [1, 2]}))
    out = tmp_path / "out.safetensors"
    g = Guard(tmp_path)
    p = run_subprocess("prune", src, "-s", "0.5", "-o", out, timeout=120)
    assert not canary.exists(), "the pickle payload ran"
    assert p.returncode == 3, (p.returncode, p.stderr)
    assert_one_error_line(p.stderr, p.stdout)
    g.assert_unchanged()


def test_04_payload_with_key_still_refused(cli, tmp_path):
    canary = tmp_path / "CANARY"
    src = tmp_path / "evil.pt"
    torch.save({"model": {"w": torch.randn(4, 8)}, "x": _OpenPayload(str(canary))}, src)
    g = Guard(tmp_path)
    r = cli("prune", src, "-s", "0.5", "--key", "model", "-o", tmp_path / "out.safetensors")
    assert not canary.exists()
    assert_fails(r, 3, g, output=tmp_path / "out.safetensors")


def test_05_whole_module_refused_with_globals_and_hint(cli, tmp_path):
    src = tmp_path / "module.pt"
    torch.save(torch.nn.Sequential(torch.nn.Linear(8, 4), torch.nn.ReLU()), src)
    g = Guard(tmp_path)
    r = cli("prune", src, "-s", "0.5", "-o", tmp_path / "out.safetensors")
    line = assert_fails(r, 3, g, mentions=("torch.nn.modules", "state_dict"), output=tmp_path / "out.safetensors")
    assert "Sequential" in line or "Linear" in line


def test_05_training_checkpoint_with_objects_refused(cli, tmp_path):
    import argparse

    src = tmp_path / "train.pt"
    torch.save({"state_dict": small_state_dict(), "args": argparse.Namespace(lr=0.1), "epoch": 3}, src)
    g = Guard(tmp_path)
    r = cli("prune", src, "-s", "0.5", "-o", tmp_path / "out.safetensors")
    assert_fails(r, 3, g, mentions=("argparse.Namespace",), output=tmp_path / "out.safetensors")


# --------------------------------------------------------------------------- 6. nested checkpoints

@pytest.mark.parametrize("wrap", [lambda sd: {"state_dict": sd}, lambda sd: {"model": sd, "epoch": 3},
                                  lambda sd: {"state_dict": sd, "epoch": 1, "lr": 0.1}])
def test_06_wrapped_state_dict_unwrapped(cli, tmp_path, wrap):
    src = tmp_path / "wrapped.pt"
    torch.save(wrap(small_state_dict()), src)
    out = tmp_path / "out.safetensors"
    report = run_json(cli, "prune", src, "-s", "0.5", "-o", out)
    assert set(actions(report)) == set(small_state_dict())
    assert cli("verify", out).code == 0


def test_06_ambiguous_checkpoint_lists_keys_and_asks_for_key(cli, tmp_path):
    src = tmp_path / "two.pt"
    sd = small_state_dict()
    torch.save({"a": sd, "b": small_state_dict(1), "epoch": 1}, src)
    out = tmp_path / "out.safetensors"
    g = Guard(tmp_path)
    r = cli("prune", src, "-s", "0.5", "-o", out)
    assert_fails(r, 4, g, mentions=("'a'", "'b'", "'epoch'", "--key"), output=out)
    report = run_json(cli, "prune", src, "-s", "0.5", "--key", "a", "-o", out)
    assert set(actions(report)) == set(sd)
    assert cli("verify", out).code == 0


def test_06_unknown_key_names_available_keys(cli, tmp_path):
    src = tmp_path / "two.pt"
    torch.save({"a": small_state_dict(), "b": small_state_dict(1)}, src)
    g = Guard(tmp_path)
    r = cli("prune", src, "-s", "0.5", "--key", "nope", "-o", tmp_path / "out.safetensors")
    assert_fails(r, 4, g, mentions=("nope", "'a'"), output=tmp_path / "out.safetensors")


def test_06_not_a_dict_at_all(cli, tmp_path):
    src = tmp_path / "list.pt"
    torch.save([torch.randn(4, 4)], src)
    g = Guard(tmp_path)
    r = cli("prune", src, "-s", "0.5", "-o", tmp_path / "out.safetensors")
    assert_fails(r, 4, g, output=tmp_path / "out.safetensors")


# --------------------------------------------------------------------------- 7. tied weights

def test_07_tied_weights_pruned_once_alias_recorded_and_restored(cli, tmp_path):
    sd = {"embed.weight": torch.randn(32, 64), "fc.weight": torch.randn(16, 64)}
    sd["head.weight"] = sd["embed.weight"]
    src = tmp_path / "tied.pt"
    torch.save(sd, src)
    out = tmp_path / "out.safetensors"
    report = run_json(cli, "prune", src, "-s", "0.5", "-o", out)
    assert report["aliases"] == {"head.weight": "embed.weight"}
    assert [t["name"] for t in report["tensors"]].count("embed.weight") == 1
    assert "head.weight" not in actions(report)
    header, _ = read_st(out)
    assert not any(k.startswith("head.weight") for k in header), "alias written twice"
    info = json.loads(cli("inspect", out, "--json").out)
    assert info["manifest"]["aliases"] == {"head.weight": "embed.weight"}
    dense = tmp_path / "dense.safetensors"
    assert_ok(cli("unpack", out, "-o", dense))
    with safe_open(str(dense), "pt") as f:
        assert set(f.keys()) == {"embed.weight", "head.weight", "fc.weight"}
        e, h = f.get_tensor("embed.weight"), f.get_tensor("head.weight")
    assert torch.equal(e, h)
    assert int((e != 0).sum()) == e.numel() // 2  # pruned (50%)
    assert torch.equal(e[e != 0], sd["embed.weight"][e != 0])


# --------------------------------------------------------------------------- 8. broken safetensors

def _broken_cases() -> dict[str, tuple[bytes, tuple[str, ...]]]:
    h, d = valid_header()
    good = st_bytes(h, d)
    cases: dict[str, tuple[bytes, tuple[str, ...]]] = {}

    def with_entry(name, **change):
        hh = json.loads(json.dumps(h))
        hh[name].update(change)
        return hh

    cases["empty"] = (b"", ())
    cases["seven-bytes"] = (b"\x10\x00\x00\x00\x00\x00\x00", ())
    cases["header-only-length"] = (struct.pack("<Q", 0), ())
    cases["truncated-data"] = (good[:-4], ("'b'",))
    cases["truncated-header"] = (good[:20], ())
    cases["padded-trailing-bytes"] = (good + b"\x00" * 8, ("trailing",))
    cases["header-length-beyond-file"] = (st_bytes(h, d, length=len(good)), ())
    cases["header-length-2**62"] = (st_bytes(h, d, length=2**62), ())
    cases["header-length-2**64-1"] = (st_bytes(h, d, length=2**64 - 1), ())
    cases["header-not-utf8"] = (st_bytes(b'{"w\xff\xfe": 1}   ', d), ("UTF-8",))
    cases["header-not-json"] = (st_bytes(b'{"w": {"dtype": ', d), ("JSON",))
    cases["header-json-array"] = (st_bytes([1, 2, 3], d), ("object",))
    cases["header-json-string"] = (st_bytes("hello", d), ("object",))
    cases["duplicate-keys"] = (st_bytes(b'{"w": {"dtype": "F32", "shape": [3], "data_offsets": [0, 12]}, '
                                        b'"w": {"dtype": "F32", "shape": [3], "data_offsets": [12, 24]}}', d[:24]),
                               ("'w'",))
    gap = json.loads(json.dumps(h))
    gap["b"]["data_offsets"] = [28, 40]
    cases["gap-between-offsets"] = (st_bytes(gap, d + b"\x00" * 4), ("'b'",))
    over = json.loads(json.dumps(h))
    over["b"]["data_offsets"] = [20, 32]
    cases["overlapping-offsets"] = (st_bytes(over, d[:32]), ("'b'",))
    cases["dtype-shape-vs-span"] = (st_bytes(with_entry("w", shape=[2, 4]), d), ("'w'",))
    cases["dtype-vs-span"] = (st_bytes(with_entry("w", dtype="F16"), d), ("'w'",))
    cases["negative-dim"] = (st_bytes(with_entry("w", shape=[-2, 3]), d), ("'w'",))
    cases["non-integer-dim"] = (st_bytes(with_entry("w", shape=[2.5, 3]), d), ("'w'",))
    cases["bool-dim"] = (st_bytes(with_entry("w", shape=[True, 6]), d), ("'w'",))
    cases["string-dim"] = (st_bytes(with_entry("w", shape=["2", 3]), d), ("'w'",))
    cases["huge-declared-shape"] = (st_bytes(with_entry("w", shape=[2**40, 2**40]), d), ("'w'",))
    cases["unknown-dtype-F128"] = (st_bytes(with_entry("w", dtype="F128"), d), ("'w'", "F128"))
    cases["offsets-reversed"] = (st_bytes(with_entry("w", data_offsets=[24, 0]), d), ("'w'",))
    cases["offsets-negative"] = (st_bytes(with_entry("w", data_offsets=[-24, 0]), d), ("'w'",))
    cases["offsets-float"] = (st_bytes(with_entry("w", data_offsets=[0.0, 24.0]), d), ("'w'",))
    cases["offsets-three"] = (st_bytes(with_entry("w", data_offsets=[0, 12, 24]), d), ("'w'",))
    cases["offsets-past-buffer"] = (st_bytes(with_entry("b", data_offsets=[24, 36 + 2**40]), d), ("'b'",))
    cases["entry-extra-key"] = (st_bytes(with_entry("w", extra=1), d), ("'w'",))
    cases["entry-not-object"] = (st_bytes({"w": [1, 2], "b": h["b"]}, d), ("'w'",))
    cases["metadata-not-object"] = (st_bytes({"__metadata__": ["a"], **h}, d), ("__metadata__",))
    return cases


BROKEN = _broken_cases()


@pytest.mark.parametrize("command", ["prune", "verify", "inspect"])
@pytest.mark.parametrize("case", list(BROKEN))
def test_08_broken_safetensors_refused_naming_the_tensor(cli, tmp_path, case, command):
    data, mentions = BROKEN[case]
    src = tmp_path / "broken.safetensors"
    src.write_bytes(data)
    out = tmp_path / "out.safetensors"
    g = Guard(tmp_path)
    args = ("prune", src, "-s", "0.5", "-o", out) if command == "prune" else (command, src)
    r = cli(*args)
    line = assert_fails(r, 4, g, mentions=mentions, output=out)
    assert "out of memory" not in line  # validated before allocating the declared size


def test_08_broken_shard_in_sharded_folder(cli, tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    save_file({"a.weight": torch.randn(8, 16)}, str(folder / "s1.safetensors"))
    (folder / "s2.safetensors").write_bytes(BROKEN["truncated-data"][0])
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"a.weight": "s1.safetensors", "w": "s2.safetensors", "b": "s2.safetensors"}}))
    out = tmp_path / "out.safetensors"
    g = Guard(tmp_path)
    assert_fails(cli("prune", folder, "-s", "0.5", "-o", out), 4, g, mentions=("s2.safetensors",), output=out)


# --------------------------------------------------------------------------- 9. __metadata__

@pytest.mark.parametrize("meta", ["absent", {}, None, {"format": "pt", "note": "x"}])
def test_09_input_metadata_absent_empty_null_is_fine(cli, tmp_path, meta):
    h, d = valid_header()
    w = torch.randn(4, 64)
    h = {"w": {"dtype": "F32", "shape": [4, 64], "data_offsets": [0, 1024]}}
    if meta != "absent":
        h = {"__metadata__": meta, **h}
    src = tmp_path / "m.safetensors"
    write_st(src, h, tensor_bytes(w))
    out = tmp_path / "out.safetensors"
    report = run_json(cli, "prune", src, "-s", "0.5", "-o", out)
    assert actions(report) == {"w": "pruned"}
    assert cli("verify", out).code == 0


@pytest.mark.parametrize("meta", [{"k": 1}, {"k": None}, {"k": ["a"]}, {"k": {"x": "y"}}, {"k": True}])
def test_09_non_string_metadata_value_refused(cli, tmp_path, meta):
    h, d = valid_header()
    src = tmp_path / "m.safetensors"
    write_st(src, {"__metadata__": meta, **h}, d)
    out = tmp_path / "out.safetensors"
    g = Guard(tmp_path)
    assert_fails(cli("prune", src, "-s", "0.5", "-o", out), 4, g, mentions=("__metadata__",), output=out)


@pytest.mark.parametrize("bad_name", ["__metadata__", "layer::values"])
def test_09_reserved_tensor_names_refused(cli, tmp_path, bad_name):
    src = tmp_path / "m.pt"
    torch.save({bad_name: torch.randn(4, 8), "w": torch.randn(4, 8)}, src)
    out = tmp_path / "out.safetensors"
    g = Guard(tmp_path)
    assert_fails(cli("prune", src, "-s", "0.5", "-o", out), 4, g, mentions=(bad_name,), output=out)


# --------------------------------------------------------------------------- 10. sharded folders

def _sharded(folder: Path, *, extra_in_shard: bool = False, missing_shard: bool = False,
             listed_not_held: bool = False) -> None:
    folder.mkdir()
    s1 = {"a.weight": torch.randn(8, 64), "a.bias": torch.randn(8)}
    s2 = {"b.weight": torch.randn(16, 64)}
    if extra_in_shard:
        s2["sneaky.weight"] = torch.randn(4, 32)
    save_file(s1, str(folder / "model-00001-of-00002.safetensors"))
    if not missing_shard:
        save_file(s2, str(folder / "model-00002-of-00002.safetensors"))
    wm = {"a.weight": "model-00001-of-00002.safetensors", "a.bias": "model-00001-of-00002.safetensors",
          "b.weight": "model-00002-of-00002.safetensors"}
    if listed_not_held:
        wm["ghost.weight"] = "model-00002-of-00002.safetensors"
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": wm}))


@pytest.mark.parametrize("via", ["folder", "index"])
def test_10_valid_sharded_folder_prunes(cli, tmp_path, via):
    folder = tmp_path / "model"
    _sharded(folder)
    out = tmp_path / "out.safetensors"
    src = folder if via == "folder" else folder / "model.safetensors.index.json"
    report = run_json(cli, "prune", src, "-s", "0.5", "-o", out)
    assert actions(report) == {"a.weight": "pruned", "a.bias": "passed", "b.weight": "pruned"}
    assert cli("verify", out).code == 0


@pytest.mark.parametrize("fault,mentions", [
    ("missing_shard", ("model-00002-of-00002.safetensors",)),
    ("extra_in_shard", ("sneaky.weight",)),
    ("listed_not_held", ("ghost.weight",)),
])
def test_10_inconsistent_sharded_folder_refused(cli, tmp_path, fault, mentions):
    folder = tmp_path / "model"
    _sharded(folder, **{fault: True})
    out = tmp_path / "out.safetensors"
    g = Guard(tmp_path)
    assert_fails(cli("prune", folder, "-s", "0.5", "-o", out), 4, g, mentions=mentions, output=out)


def test_10_index_pointing_outside_folder_refused(cli, tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    save_file({"a.weight": torch.randn(8, 32)}, str(tmp_path / "outside.safetensors"))
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"a.weight": "../outside.safetensors"}}))
    out = tmp_path / "out.safetensors"
    g = Guard(tmp_path)
    assert_fails(cli("prune", folder, "-s", "0.5", "-o", out), 4, g, output=out)


def test_10_torch_shard_missing(cli, tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    torch.save({"a.weight": torch.randn(8, 32)}, folder / "pytorch_model-00001.bin")
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps(
        {"weight_map": {"a.weight": "pytorch_model-00001.bin", "b.weight": "pytorch_model-00002.bin"}}))
    out = tmp_path / "out.safetensors"
    g = Guard(tmp_path)
    assert_fails(cli("prune", folder, "-s", "0.5", "-o", out), 4, g, mentions=("pytorch_model-00002.bin",),
                 output=out)


# --------------------------------------------------------------------------- 11. non-float dtypes

def _mixed_dtypes() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return {
        "f.weight": torch.randn(16, 64, generator=g),
        "i8.weight": torch.cat([torch.full((1, 64), -128, dtype=torch.int8),
                                torch.randint(-128, 127, (15, 64), generator=g, dtype=torch.int8)]),
        "i32.weight": torch.randint(-2**31, 2**31 - 1, (16, 64), generator=g, dtype=torch.int32),
        "u8.weight": torch.randint(0, 255, (16, 64), generator=g, dtype=torch.uint8),
        "fp8.weight": torch.randn(16, 64, generator=g).to(torch.float8_e4m3fn),
    }


def test_11_integer_and_fp8_pass_through_byte_exact(cli, tmp_path):
    sd = _mixed_dtypes()
    src = tmp_path / "m.safetensors"
    save_file(sd, str(src))
    out = tmp_path / "out.safetensors"
    report = run_json(cli, "prune", src, "-s", "0.5", "-o", out)
    acts = actions(report)
    assert acts.pop("f.weight") == "pruned"
    assert set(acts.values()) == {"passed"} and set(acts) == set(sd) - {"f.weight"}
    assert cli("verify", out).code == 0
    dense = tmp_path / "dense.safetensors"
    assert_ok(cli("unpack", out, "-o", dense))
    for f in (out, dense):
        header, data = read_st(f)
        for name in acts:
            b, e = header[name]["data_offsets"]
            assert data[b:e] == tensor_bytes(sd[name]), f"{name} changed in {f.name}"


def test_11_sub_byte_dtype_passes_through(cli, tmp_path):
    """A packed 4-bit tensor (F4, two values per byte) is copied through byte-exact."""
    w = torch.randn(8, 64)
    q = bytes(range(64))  # F4 [4, 32]: 128 values in 64 bytes
    h = {"q.weight": {"dtype": "F4", "shape": [4, 32], "data_offsets": [0, 64]},
         "w": {"dtype": "F32", "shape": [8, 64], "data_offsets": [64, 64 + 2048]}}
    src = tmp_path / "m.safetensors"
    write_st(src, h, q + tensor_bytes(w))
    out = tmp_path / "out.safetensors"
    report = run_json(cli, "prune", src, "-s", "0.5", "-o", out)
    assert actions(report) == {"q.weight": "passed", "w": "pruned"}
    r = cli("verify", out)
    assert r.code == 0, r
    dense = tmp_path / "dense.safetensors"
    assert_ok(cli("unpack", out, "-o", dense))
    header, data = read_st(dense)
    b, e = header["q.weight"]["data_offsets"]
    assert data[b:e] == q


@pytest.mark.parametrize("name", ["i8.weight", "i32.weight", "u8.weight", "fp8.weight"])
def test_11_strict_refuses_non_float_matrix(cli, tmp_path, name):
    sd = _mixed_dtypes()
    src = tmp_path / "m.safetensors"
    save_file({"f.weight": sd["f.weight"], name: sd[name]}, str(src))
    out = tmp_path / "out.safetensors"
    g = Guard(tmp_path)
    assert_fails(cli("prune", src, "-s", "0.5", "--strict", "-o", out), 4, g, mentions=(f"'{name}'", "--strict"),
                 output=out)


def test_11_f64_is_pruned(cli, tmp_path):
    src = tmp_path / "m.safetensors"
    w = torch.randn(8, 64, dtype=torch.float64)
    save_file({"w": w}, str(src))
    out = tmp_path / "out.safetensors"
    assert actions(run_json(cli, "prune", src, "-s", "0.5", "-o", out)) == {"w": "pruned"}
    assert cli("verify", out).code == 0


# --------------------------------------------------------------------------- 12. NaN / Inf

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("fmt", ["pt", "safetensors"])
def test_12_nan_inf_refused_with_count_and_first_index(cli, tmp_path, dtype, fmt):
    w = torch.randn(8, 64).to(dtype)
    w[2, 5] = float("nan")
    w[3, 0] = float("inf")
    w[7, 63] = float("-inf")
    sd = {"ok.weight": torch.randn(8, 64).to(dtype), "bad.weight": w}
    src = tmp_path / f"m.{fmt}"
    torch.save(sd, src) if fmt == "pt" else save_file(sd, str(src))
    out = tmp_path / "out.safetensors"
    g = Guard(tmp_path)
    line = assert_fails(cli("prune", src, "-s", "0.5", "-o", out), 4, g, mentions=("'bad.weight'",), output=out)
    assert "3 " in line and "[2, 5]" in line, line


@pytest.mark.parametrize("pattern", ["unstructured", "block"])
def test_12_nan_refused_by_other_patterns(cli, tmp_path, pattern):
    w = torch.randn(16, 64)
    w[9, 1] = float("nan")
    src = tmp_path / "m.safetensors"
    save_file({"bad.weight": w}, str(src))
    out = tmp_path / "out.safetensors"
    g = Guard(tmp_path)
    line = assert_fails(cli("prune", src, "-s", "0.5", "-p", pattern, "-o", out), 4, g,
                        mentions=("'bad.weight'",), output=out)
    assert "1 " in line and "[9, 1]" in line, line


def test_12_nan_in_conv_weight_names_4d_index(cli, tmp_path):
    w = torch.randn(8, 16, 3, 3)
    w[1, 2, 0, 1] = float("nan")
    src = tmp_path / "m.safetensors"
    save_file({"conv.weight": w}, str(src))
    out = tmp_path / "out.safetensors"
    g = Guard(tmp_path)
    line = assert_fails(cli("prune", src, "-s", "0.5", "-o", out), 4, g, mentions=("'conv.weight'",), output=out)
    assert "[1, 2, 0, 1]" in line, line


# --------------------------------------------------------------------------- 13. ties and determinism

def _tied_bf16(tmp_path: Path) -> Path:
    g = torch.Generator().manual_seed(5)
    sd = {
        "coarse.weight": (torch.randint(-3, 4, (64, 256), generator=g).float() * 0.5).to(torch.bfloat16),
        "fine.weight": torch.randn(128, 512, generator=g).to(torch.bfloat16),
        "zero.weight": torch.zeros(16, 64, dtype=torch.bfloat16),
        "ones.weight": torch.ones(4, 64, dtype=torch.bfloat16),
    }
    src = tmp_path / "ties.safetensors"
    save_file(sd, str(src))
    return src


def test_13_same_input_gives_byte_identical_output(cli, tmp_path):
    src = _tied_bf16(tmp_path)
    outs = [tmp_path / "a.safetensors", tmp_path / "b.safetensors"]
    for o in outs:
        assert_ok(cli("prune", src, "-s", "0.75", "-o", o))
    assert sha256(outs[0]) == sha256(outs[1])
    third = tmp_path / "c.safetensors"
    assert_ok(cli("prune", src, "-s", "0.75", "-p", "unstructured", "-o", third))
    fourth = tmp_path / "d.safetensors"
    assert_ok(cli("prune", src, "-s", "0.75", "-p", "unstructured", "-o", fourth))
    assert sha256(third) == sha256(fourth)


def test_13_tie_break_lower_index_first_and_all_zero_blocks_keep_k(cli, tmp_path):
    src = _tied_bf16(tmp_path)
    out = tmp_path / "out.safetensors"
    assert_ok(cli("prune", src, "-s", "0.5", "--block-size", "4", "--index", "offsets", "-o", out))
    assert cli("verify", out).code == 0
    header, data = read_st(out)
    for name, rows in (("zero.weight", 16), ("ones.weight", 4)):
        assert header[f"{name}::indices"]["shape"] == [rows, 2, 16]  # exactly k=2 entries per block
    dense = tmp_path / "dense.safetensors"
    assert_ok(cli("unpack", out, "-o", dense))
    with safe_open(str(dense), "pt") as f:
        ones = f.get_tensor("ones.weight").float()
        assert torch.equal(f.get_tensor("zero.weight").float(), torch.zeros(16, 64))
    expected = torch.tensor([1.0, 1.0, 0.0, 0.0]).repeat(4, 16)  # equal magnitudes: lower index kept
    assert torch.equal(ones, expected)


# --------------------------------------------------------------------------- 14. tensor ranks

def test_14_ranks_and_empty_tensors(cli, tmp_path):
    sd = {
        "scalar": torch.tensor(3.5),
        "norm.weight": torch.randn(64),
        "rnn.weight": torch.randn(4, 8, 64),
        "conv.weight": torch.randn(8, 16, 3, 3),
        "conv3d.weight": torch.randn(4, 4, 2, 3, 3),
        "empty.weight": torch.zeros(0, 5),
        "empty_cols.weight": torch.zeros(5, 0),
        "fc.weight": torch.randn(16, 64),
    }
    src = tmp_path / "m.safetensors"
    save_file(sd, str(src))
    out = tmp_path / "out.safetensors"
    acts = actions(run_json(cli, "prune", src, "-s", "0.5", "-o", out))
    assert acts == {"scalar": "passed", "norm.weight": "passed", "rnn.weight": "passed", "conv.weight": "pruned",
                    "conv3d.weight": "passed", "empty.weight": "passed", "empty_cols.weight": "passed",
                    "fc.weight": "pruned"}
    assert cli("verify", out).code == 0
    dense = tmp_path / "dense.safetensors"
    assert_ok(cli("unpack", out, "-o", dense))
    with safe_open(str(dense), "pt") as f:
        assert set(f.keys()) == set(sd)
        for name in ("scalar", "norm.weight", "rnn.weight", "conv3d.weight", "empty.weight", "empty_cols.weight"):
            t = f.get_tensor(name)
            assert t.shape == sd[name].shape and t.dtype == sd[name].dtype and torch.equal(t, sd[name]), name


def test_14_3d_and_5d_pruned_when_included(cli, tmp_path):
    sd = {"rnn.weight": torch.randn(4, 8, 64), "conv3d.weight": torch.randn(4, 4, 2, 3, 3)}
    src = tmp_path / "m.safetensors"
    save_file(sd, str(src))
    out = tmp_path / "out.safetensors"
    acts = actions(run_json(cli, "prune", src, "-s", "0.5", "--include", "*.weight", "-o", out))
    assert acts == {"rnn.weight": "pruned", "conv3d.weight": "pruned"}
    assert cli("verify", out).code == 0


# --------------------------------------------------------------------------- 15. too large for memory

def test_15_tensor_larger_than_memory_refused_by_preflight(cli, tmp_path):
    avail = None
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                avail = int(line.split()[1]) * 1024
    if avail is None:
        pytest.skip("no MemAvailable in /proc/meminfo")
    cols = 1 << 16
    rows = max(1, (avail // 2) // (cols * 4))  # the tensor is half of free memory: 4x of it cannot fit
    nbytes = rows * cols * 4
    src = tmp_path / "huge.safetensors"
    head = st_bytes({"huge.weight": {"dtype": "F32", "shape": [rows, cols], "data_offsets": [0, nbytes]}})
    try:
        with open(src, "wb") as f:
            f.write(head)
            f.truncate(len(head) + nbytes)  # sparse: no disk used
    except OSError as exc:
        pytest.skip(f"cannot create a sparse file here: {exc}")
    out = tmp_path / "out.safetensors"
    g = Guard(tmp_path)
    t0 = time.monotonic()
    r = cli("prune", src, "-s", "0.5", "-o", out)
    assert_fails(r, 4, g, mentions=("GiB",), output=out)
    assert time.monotonic() - t0 < 10  # refused up front, not after reading the data


# --------------------------------------------------------------------------- 16. output is an input

@pytest.mark.parametrize("force", [False, True])
@pytest.mark.parametrize("kind", ["same", "symlink", "hardlink", "relative"])
@pytest.mark.parametrize("fmt", ["pt", "safetensors"])
def test_16_output_equal_to_input_refused(cli, tmp_path, kind, force, fmt, monkeypatch):
    src = tmp_path / f"model.{fmt}"
    torch.save(small_state_dict(), src) if fmt == "pt" else save_file(small_state_dict(), str(src))
    if kind == "same":
        out = src
    elif kind == "symlink":
        out = tmp_path / "link.safetensors"
        out.symlink_to(src)
    elif kind == "hardlink":
        out = tmp_path / "hard.safetensors"
        os.link(src, out)
    else:
        monkeypatch.chdir(tmp_path)
        out = Path(".") / "sub" / ".." / src.name
        (tmp_path / "sub").mkdir()
    g = Guard(tmp_path)
    r = cli("prune", src, "-s", "0.5", "-o", out, *(["--force"] if force else []))
    assert_fails(r, 3, g)


def test_16_output_equal_to_a_shard_refused(cli, tmp_path):
    folder = tmp_path / "model"
    _sharded(folder)
    g = Guard(tmp_path)
    r = cli("prune", folder, "-s", "0.5", "-o", folder / "model-00002-of-00002.safetensors", "--force")
    assert_fails(r, 3, g)


def test_16_unpack_onto_its_input_refused(cli, small_st, tmp_path):
    packed = tmp_path / "packed.safetensors"
    assert_ok(cli("prune", small_st, "-s", "0.5", "-o", packed))
    g = Guard(tmp_path)
    assert_fails(cli("unpack", packed, "-o", packed, "--force"), 3, g)


# --------------------------------------------------------------------------- 17. output exists

def test_17_existing_output_needs_force(cli, small_pt, tmp_path):
    out = tmp_path / "out.safetensors"
    out.write_bytes(b"old contents")
    g = Guard(tmp_path)
    assert_fails(cli("prune", small_pt, "-s", "0.5", "-o", out), 5, g, mentions=("--force",))
    assert out.read_bytes() == b"old contents"
    assert_ok(cli("prune", small_pt, "-s", "0.5", "-o", out, "--force"))
    assert out.read_bytes() != b"old contents"
    assert temp_files(tmp_path) == []
    assert cli("verify", out).code == 0


def test_17_existing_output_of_unpack_needs_force(cli, small_st, tmp_path):
    packed = tmp_path / "packed.safetensors"
    assert_ok(cli("prune", small_st, "-s", "0.5", "-o", packed))
    out = tmp_path / "dense.safetensors"
    out.write_bytes(b"old")
    g = Guard(tmp_path)
    assert_fails(cli("unpack", packed, "-o", out), 5, g, mentions=("--force",))
    assert_ok(cli("unpack", packed, "-o", out, "--force"))
    with safe_open(str(out), "pt") as f:
        assert set(f.keys()) == set(small_state_dict())


def test_17_output_path_is_a_folder(cli, small_pt, tmp_path):
    out = tmp_path / "adir"
    out.mkdir()
    g = Guard(tmp_path)
    assert_fails(cli("prune", small_pt, "-s", "0.5", "-o", out, "--force"), 5, g)


# --------------------------------------------------------------------------- 18. write errors

@pytest.fixture(scope="module")
def medium_st(tmp_path_factory) -> Path:
    """About 8 MiB of F32 weights: the packed output is a few MiB."""
    p = tmp_path_factory.mktemp("medium") / "medium.safetensors"
    g = torch.Generator().manual_seed(1)
    save_file({"l0.weight": torch.randn(1024, 1024, generator=g), "l1.weight": torch.randn(1024, 1024, generator=g),
               "l1.bias": torch.randn(1024, generator=g)}, str(p))
    return p


def _run_with_fsize_limit(limit: int, *args) -> subprocess.CompletedProcess:
    def preexec():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    env = dict(os.environ, PYTHONPATH=str(REPO / "src"), PYTHONDONTWRITEBYTECODE="1")
    return subprocess.run([sys.executable, "-m", "balprune", *map(str, args)], capture_output=True, text=True,
                          env=env, preexec_fn=preexec, timeout=120)


@pytest.mark.parametrize("old_target", [False, True])
def test_18_io_error_during_write_exit_5_temp_removed(medium_st, tmp_path, old_target):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    out = out_dir / "packed.safetensors"
    if old_target:
        out.write_bytes(b"an older target that must survive")
    g = Guard(out_dir, medium_st.parent)
    p = _run_with_fsize_limit(1 << 20, "prune", medium_st, "-s", "0.5", "-o", out,
                              *(["--force"] if old_target else []))
    assert p.returncode == 5, (p.returncode, p.stderr)
    line = assert_one_error_line(p.stderr, p.stdout)
    assert str(out) in line or out.name in line
    g.assert_unchanged()
    if old_target:
        assert out.read_bytes() == b"an older target that must survive"
    else:
        assert not out.exists()


# --------------------------------------------------------------------------- 19. signals

@pytest.fixture(scope="module")
def big_st(tmp_path_factory) -> Path:
    """Enough work (4 x 2048x2048 F32) that a prune takes a few seconds."""
    p = tmp_path_factory.mktemp("big") / "big.safetensors"
    g = torch.Generator().manual_seed(2)
    save_file({f"l{i}.weight": torch.randn(2048, 2048, generator=g) for i in range(4)}, str(p))
    return p


def _start_prune(src: Path, out: Path, *extra: str) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"))
    return subprocess.Popen([sys.executable, "-m", "balprune", "prune", str(src), "-s", "0.5", "-o", str(out), *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def _wait_for_temp(proc: subprocess.Popen, folder: Path) -> None:
    """Poll until the run's temp file exists, then give it a moment to be inside the write loop."""
    deadline = time.monotonic() + 60
    while not temp_files(folder):
        assert proc.poll() is None, f"finished before the temp file was seen: {proc.communicate()}"
        assert time.monotonic() < deadline, "no temp file appeared"
        time.sleep(0.01)
    time.sleep(0.2)
    assert proc.poll() is None, "finished before the signal"


@pytest.mark.parametrize("sig,code,old_target", [(signal.SIGINT, 130, False), (signal.SIGTERM, 143, True)])
def test_19_signal_mid_run_leaves_nothing(big_st, tmp_path, sig, code, old_target):
    out = tmp_path / "packed.safetensors"
    if old_target:
        out.write_bytes(b"an older target that must survive")
    g = Guard(tmp_path, big_st.parent)
    proc = _start_prune(big_st, out, *(["--force"] if old_target else []))
    try:
        _wait_for_temp(proc, tmp_path)
        proc.send_signal(sig)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == code, (proc.returncode, stderr)
    line = assert_one_error_line(stderr, stdout)
    assert "interrupted" in line
    g.assert_unchanged()  # no temp, no new file; an older target byte-identical
    if not old_target:
        assert not out.exists()


def test_19_sigkill_leaves_at_most_a_recognisable_temp_file(big_st, tmp_path):
    out = tmp_path / "packed.safetensors"
    proc = _start_prune(big_st, out)
    try:
        _wait_for_temp(proc, tmp_path)
        proc.kill()
        proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert not out.exists()
    left = sorted(p.name for p in tmp_path.iterdir())
    assert len(left) == 1 and left[0].startswith(f".packed.safetensors.balprune-tmp-{proc.pid}-"), left


# --------------------------------------------------------------------------- 20. output folder

def test_20_missing_output_folder_fails_fast(cli, small_pt, tmp_path):
    out = tmp_path / "no" / "such" / "dir" / "out.safetensors"
    g = Guard(tmp_path)
    line = assert_fails(cli("prune", small_pt, "-s", "0.5", "-o", out), 5, g, output=None)
    assert "does not exist" in line or "no such" in line.lower()
    assert not (tmp_path / "no").exists()


def test_20_missing_output_folder_for_unpack(cli, small_st, tmp_path):
    packed = tmp_path / "packed.safetensors"
    assert_ok(cli("prune", small_st, "-s", "0.5", "-o", packed))
    g = Guard(tmp_path)
    assert_fails(cli("unpack", packed, "-o", tmp_path / "missing" / "d.safetensors"), 5, g)


def test_20_read_only_output_folder(cli, small_pt, tmp_path):
    if os.geteuid() == 0:
        pytest.skip("running as root: permissions do not stop root from writing, so a read-only folder "
                    "cannot be simulated")
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        g = Guard(tmp_path)
        assert_fails(cli("prune", small_pt, "-s", "0.5", "-o", ro / "out.safetensors"), 5, g)
    finally:
        ro.chmod(0o755)


# --------------------------------------------------------------------------- 21. output is valid

@pytest.mark.parametrize("pattern", ["balanced", "unstructured", "block"])
def test_21_output_readable_by_official_reader_and_verifies(cli, small_pt, tmp_path, pattern):
    before = sha256(small_pt)
    out = tmp_path / "out.safetensors"
    assert_ok(cli("prune", small_pt, "-s", "0.5", "-p", pattern, "-o", out))
    assert sha256(small_pt) == before
    assert temp_files(tmp_path) == []
    header, _ = read_st(out)
    with safe_open(str(out), "pt") as f:
        keys = set(f.keys())
        assert keys == set(header) - {"__metadata__"}
        for k in keys:
            f.get_tensor(k)
        assert f.metadata()["format"] == "balprune.packed"
        assert torch.equal(f.get_tensor("fc1.bias"), small_state_dict()["fc1.bias"])
    r = cli("verify", out, "--json")
    assert r.code == 0 and json.loads(r.out)["ok"] is True
    dense = tmp_path / "dense.safetensors"
    assert_ok(cli("unpack", out, "-o", dense))
    with safe_open(str(dense), "pt") as f:
        for name, t in small_state_dict().items():
            d = f.get_tensor(name)
            assert d.shape == t.shape and d.dtype == t.dtype
            assert torch.equal(d[d != 0], t[d != 0]), name  # every kept value is the original


# --------------------------------------------------------------------------- 22-23. corrupt packed files

@pytest.fixture
def packed(cli, tmp_path) -> Path:
    src = tmp_path / "model.pt"
    torch.save(small_state_dict(), src)
    out = tmp_path / "packed.safetensors"
    assert_ok(cli("prune", src, "-s", "0.5", "--index", "offsets", "-o", out))  # the cases edit offsets
    src.unlink()
    return out


def edit_packed(path: Path, *, data_edit=None, header_edit=None, manifest_edit=None, metadata_edit=None) -> None:
    """Rewrite a packed file in place, keeping the data layout (offsets are buffer-relative)."""
    header, data = read_st(path)
    data = bytearray(data)
    if data_edit:
        data_edit(header, data)
    meta = header["__metadata__"]
    if manifest_edit:
        manifest = json.loads(meta["manifest"])
        manifest_edit(manifest)
        meta["manifest"] = json.dumps(manifest, sort_keys=True, separators=(",", ":"))
    if metadata_edit:
        metadata_edit(meta)
    if header_edit:
        data = header_edit(header, data) or data
    write_st(path, header, bytes(data))


def entry_of(manifest: dict, name: str) -> dict:
    return next(e for e in manifest["tensors"] if e["name"] == name)


def _span(header, name):
    return header[name]["data_offsets"]


def _index_out_of_range(header, data):
    b, _ = _span(header, "fc1.weight::indices")
    data[b] = 200  # block length 4


def _index_slightly_out_of_range(header, data):
    b, _ = _span(header, "fc1.weight::indices")
    data[b] = 4  # == block length


def _swap_slots(header, data):
    # indices are [R, k, B] uint8: slots t=0 and t=1 of row 0 block 0 are B bytes apart
    b, _ = _span(header, "fc1.weight::indices")
    blocks = header["fc1.weight::indices"]["shape"][2]
    data[b], data[b + blocks] = data[b + blocks], data[b]


def _duplicate_slot(header, data):
    b, _ = _span(header, "fc1.weight::indices")
    blocks = header["fc1.weight::indices"]["shape"][2]
    data[b + blocks] = data[b]


def _nan_value(header, data):
    b, _ = _span(header, "fc1.weight::values")
    data[b:b + 4] = struct.pack("<f", float("nan"))


def _padding_value(header, data):
    # conv2.weight: K=144, B=29, L=5, k=3: the last block has 4 real columns + 1 padding column.
    # Make the last block of row 0 keep the padding column (offset 4) with a non-zero value.
    b, _ = _span(header, "conv2.weight::indices")
    rows, k, blocks = header["conv2.weight::indices"]["shape"]
    last = b + (k - 1) * blocks + (blocks - 1)  # row 0, slot k-1, block B-1
    data[last] = 4


def _set(name, key, value):
    return lambda m: entry_of(m, name).__setitem__(key, value)


def _add_stored_tensor(header, data):
    header["sneaky"] = {"dtype": "U8", "shape": [8], "data_offsets": [len(data), len(data) + 8]}
    return data + bytearray(8)


def _drop_stored_tensor(header, data):
    # drop fc1.bias from the header and zero-size its bytes: rebuild the data buffer without it
    b, e = header.pop("fc1.bias")["data_offsets"]
    for v in header.values():
        if isinstance(v, dict) and "data_offsets" in v and v["data_offsets"][0] >= e:
            v["data_offsets"] = [v["data_offsets"][0] - (e - b), v["data_offsets"][1] - (e - b)]
    return data[:b] + data[e:]


def _alias_to_nowhere(m):
    m["aliases"]["ghost.weight"] = "nothing.weight"


CORRUPTIONS = {
    # item 22: index content
    "index-out-of-range": (dict(data_edit=_index_out_of_range), ("'fc1.weight'",)),
    "index-equal-block-length": (dict(data_edit=_index_slightly_out_of_range), ("'fc1.weight'",)),
    "indices-unsorted": (dict(data_edit=_swap_slots), ("'fc1.weight'", "unsorted")),
    "indices-duplicated": (dict(data_edit=_duplicate_slot), ("'fc1.weight'",)),
    "value-nan": (dict(data_edit=_nan_value), ("'fc1.weight'",)),
    "padding-column-nonzero": (dict(data_edit=_padding_value), ("'conv2.weight'",)),
    # item 23: manifest vs tensors
    "keep-changed": (dict(manifest_edit=_set("fc1.weight", "keep", 1)), ("'fc1.weight'",)),
    "keep-too-large": (dict(manifest_edit=_set("fc1.weight", "keep", 9)), ("'fc1.weight'",)),
    "keep-float": (dict(manifest_edit=_set("fc1.weight", "keep", 2.0)), ("'fc1.weight'", "keep")),
    "keep-bool": (dict(manifest_edit=_set("fc1.weight", "keep", True)), ("'fc1.weight'", "keep")),
    "keep-string": (dict(manifest_edit=_set("fc1.weight", "keep", "2")), ("'fc1.weight'", "keep")),
    "block-length-changed": (dict(manifest_edit=_set("fc1.weight", "block_length", 5)), ("'fc1.weight'",)),
    "blocks-changed": (dict(manifest_edit=_set("fc1.weight", "blocks", 26)), ("'fc1.weight'",)),
    "shape-changed": (dict(manifest_edit=_set("fc1.weight", "shape", [24, 99])), ("'fc1.weight'",)),
    "dtype-changed": (dict(manifest_edit=_set("fc1.weight", "dtype", "F16")), ("'fc1.weight'",)),
    "dense-dtype-changed": (dict(manifest_edit=_set("fc1.bias", "dtype", "F16")), ("'fc1.bias'",)),
    "dense-shape-changed": (dict(manifest_edit=_set("fc1.bias", "shape", [25])), ("'fc1.bias'",)),
    "index-dtype-changed": (dict(manifest_edit=_set("fc1.weight", "index_dtype", "U16")), ("'fc1.weight'", "index_dtype")),
    "sparsity-achieved-wrong": (dict(manifest_edit=_set("fc1.weight", "sparsity_achieved", 0.25)), ("'fc1.weight'",)),
    "sparsity-nan": (dict(manifest_edit=_set("fc1.weight", "sparsity_achieved", float("nan"))), ("'fc1.weight'",)),
    "pattern-unknown": (dict(manifest_edit=_set("fc1.weight", "pattern", "diagonal")), ("'fc1.weight'", "pattern")),
    "entry-unknown-key": (dict(manifest_edit=_set("fc1.weight", "colour", "red")), ("'fc1.weight'", "colour")),
    "manifest-unknown-key": (dict(manifest_edit=lambda m: m.__setitem__("extra", 1)), ("manifest",)),
    "manifest-missing-key": (dict(manifest_edit=lambda m: m.pop("aliases")), ("manifest",)),
    "manifest-drops-tensor": (dict(manifest_edit=lambda m: m["tensors"].remove(entry_of(m, "fc1.bias"))),
                              ("fc1.bias",)),
    "manifest-duplicate-tensor": (dict(manifest_edit=lambda m: m["tensors"].append(entry_of(m, "fc1.bias"))),
                                  ("fc1.bias",)),
    "alias-to-unknown": (dict(manifest_edit=_alias_to_nowhere), ("ghost.weight",)),
    "format-version-99": (dict(metadata_edit=lambda md: md.__setitem__("format_version", "99")), ("version", "99")),
    "format-version-1.0": (dict(metadata_edit=lambda md: md.__setitem__("format_version", "1.0")), ("version",)),
    "format-name": (dict(metadata_edit=lambda md: md.__setitem__("format", "other")), ("format",)),
    "metadata-unknown-key": (dict(metadata_edit=lambda md: md.__setitem__("extra", "x")), ("extra",)),
    "manifest-not-json": (dict(metadata_edit=lambda md: md.__setitem__("manifest", "{nope")), ("manifest",)),
    "no-metadata": (dict(header_edit=lambda h, d: h.pop("__metadata__") and None), ("metadata",)),
    "stored-tensor-not-in-manifest": (dict(header_edit=_add_stored_tensor), ("sneaky",)),
    "manifest-tensor-not-stored": (dict(header_edit=_drop_stored_tensor), ("fc1.bias",)),
    "part-dtype-changed": (dict(header_edit=lambda h, d: h["fc1.weight::indices"].__setitem__("dtype", "I8")),
                           ("'fc1.weight'",)),
}


@pytest.mark.parametrize("case", list(CORRUPTIONS))
def test_22_23_corrupt_packed_file_refused_by_verify(cli, packed, case):
    edits, mentions = CORRUPTIONS[case]
    edit_packed(packed, **edits)
    g = Guard(packed.parent)
    assert_fails(cli("verify", packed), 4, g, mentions=mentions)


@pytest.mark.parametrize("case", ["index-out-of-range", "indices-unsorted", "keep-changed", "format-version-99"])
def test_22_23_corrupt_packed_file_refused_by_unpack(cli, packed, case):
    edits, mentions = CORRUPTIONS[case]
    edit_packed(packed, **edits)
    out = packed.parent / "dense.safetensors"
    g = Guard(packed.parent)
    assert_fails(cli("unpack", packed, "-o", out), 4, g, mentions=mentions, output=out)


def test_22_23_edit_helper_keeps_a_valid_file(cli, packed):
    """The rewrite itself (new header length, same data) leaves a file that still verifies."""
    edit_packed(packed, manifest_edit=lambda m: None)
    r = cli("verify", packed)
    assert r.code == 0, r


def test_23_plain_safetensors_is_not_a_packed_file(cli, small_st):
    g = Guard(small_st.parent)
    assert_fails(cli("verify", small_st), 4, g)
    assert_fails(cli("inspect", small_st), 4, g)


# --------------------------------------------------------------------------- other bad checkpoints

@pytest.mark.parametrize("case", ["txt-suffix", "no-suffix", "missing", "dangling-symlink", "empty-pt",
                                  "zeros-pt", "garbage-pt", "bytes-pt", "text-pt", "truncated-pt", "empty-folder",
                                  "two-files-folder"])
def test_bad_checkpoint_paths(cli, tmp_path, case):
    if case == "txt-suffix":
        src = tmp_path / "model.txt"
        src.write_text("hello")
    elif case == "no-suffix":
        src = tmp_path / "model"
        torch.save(small_state_dict(), src)
    elif case == "missing":
        src = tmp_path / "missing.pt"
    elif case == "dangling-symlink":
        src = tmp_path / "link.pt"
        src.symlink_to(tmp_path / "gone.pt")
    elif case == "empty-pt":
        src = tmp_path / "empty.pt"
        src.write_bytes(b"")
    elif case == "zeros-pt":
        src = tmp_path / "zeros.pt"
        src.write_bytes(b"\x00" * 4096)
    elif case == "garbage-pt":  # not a pickle at all (fixed bytes: the outcome must not vary by run)
        src = tmp_path / "garbage.pt"
        src.write_bytes(random.Random(0).randbytes(4096))
    elif case == "bytes-pt":
        src = tmp_path / "bytes.pt"
        src.write_bytes(bytes(range(256)) * 16)
    elif case == "text-pt":
        src = tmp_path / "text.pt"
        src.write_text("hello world, this is not a checkpoint\n" * 100)
    elif case == "truncated-pt":
        src = tmp_path / "trunc.pt"
        torch.save(small_state_dict(), src)
        src.write_bytes(src.read_bytes()[:3000])
    elif case == "empty-folder":
        src = tmp_path / "folder"
        src.mkdir()
    else:
        src = tmp_path / "folder"
        src.mkdir()
        save_file({"a": torch.randn(4, 4)}, str(src / "a.safetensors"))
        save_file({"b": torch.randn(4, 4)}, str(src / "b.safetensors"))
    out = tmp_path / "out.safetensors"
    g = Guard(tmp_path)
    assert_fails(cli("prune", src, "-s", "0.5", "-o", out), 4, g, output=out)


@pytest.mark.parametrize("command", ["verify", "inspect"])
def test_missing_packed_file(cli, tmp_path, command):
    assert_fails(cli(command, tmp_path / "missing.safetensors"), 4)


def test_key_on_safetensors_refused(cli, small_st, tmp_path):
    out = tmp_path / "out.safetensors"
    g = Guard(tmp_path)
    assert_fails(cli("prune", small_st, "-s", "0.5", "--key", "model", "-o", out), 4, g, mentions=("--key",),
                 output=out)


def test_missing_sparsity_is_usage_error(cli, small_pt, tmp_path):
    g = Guard(tmp_path)
    assert_fails(cli("prune", small_pt, "-o", tmp_path / "o.safetensors"), 2, g, mentions=("--sparsity",))


@pytest.mark.parametrize("option", ["--include", "--exclude"])
def test_a_glob_over_the_recorded_option_limit_is_refused_before_any_work(cli, tmp_path, option):
    """The packed file records the globs and its reader takes texts of at most spec.MAX_TEXT: such a glob was
    accepted, then the strict re-read refused the written file naming its temp path (a recipe's ran a whole
    fine-tuning first). Now: exit 2 naming the option, nothing written."""
    from balprune.formats.spec import MAX_TEXT

    src = tmp_path / "m.safetensors"
    assert cli("example", "tiny-cnn", "-o", src).code == 0
    out = tmp_path / "o.safetensors"
    before = sorted(p.name for p in tmp_path.iterdir())
    r = cli("prune", src, "-s", "0.5", "-b", "4", option, "x" * (MAX_TEXT + 1), "-o", out)
    assert r.code == 2 and f"{option}: a glob of {MAX_TEXT + 1} characters" in r.err, r.err
    assert sorted(p.name for p in tmp_path.iterdir()) == before
