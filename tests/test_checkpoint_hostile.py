"""Hostile checkpoints (issue 14, classes 2, 3, 4, 7, 8 and "no tensors"), through the real CLI.

Each case checks the whole contract: the documented exit code, exactly one ``balprune: error:``
line, the inputs byte-identical, no output and no temp file, and a bounded time (FIFOs, devices
and signals run in a subprocess with a timeout, so a hang fails the test instead of stalling it).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import warnings
import zipfile
from pathlib import Path

import pytest
import torch
from helpers import REPO, assert_refused, listing, one_error_line, run_subprocess, small_state_dict
from safetensors.torch import save_file

TIMEOUT = 120  # seconds: far above a refusal (a few seconds of imports), far below a hang




def refused(tmp_path: Path, args: list, code: int, *mentions: str, subprocess_: bool = False, cli=None) -> str:
    """Run ``balprune ARGS`` (output in tmp_path/out.safetensors) and check the whole refusal contract."""
    out = tmp_path / "out.safetensors"
    before = listing(tmp_path)
    start = time.monotonic()
    if subprocess_:
        p = run_subprocess(*args, "-o", out, timeout=TIMEOUT)
        rc, stdout, stderr = p.returncode, p.stdout, p.stderr
    else:
        r = cli(*args, "-o", out)
        rc, stdout, stderr = r.code, r.out, r.err
    return assert_refused(rc, stdout, stderr, code=code, mentions=mentions, folder=tmp_path, before=before,
                          started=start, timeout=TIMEOUT)


def rezip(src: Path, dst: Path, edit=lambda name, data: data, *, extra: list[tuple[str, bytes]] = (),
          compress: str | None = None) -> None:
    """Copy a torch zip checkpoint member by member, ``edit`` applied to each member's bytes."""
    zin = zipfile.ZipFile(src)
    with zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as zout:
        for i in zin.infolist():
            kind = zipfile.ZIP_DEFLATED if i.filename.endswith(compress or "\0") else zipfile.ZIP_STORED
            zout.writestr(i.filename, edit(i.filename, zin.read(i.filename)), compress_type=kind)
        for name, data in extra:
            zout.writestr(name, data)


def small_pt(folder: Path, name: str = "ok.pt") -> Path:
    p = folder / name
    torch.save({"w": torch.arange(12, dtype=torch.float32).reshape(3, 4)}, p)
    return p


# --------------------------------------------------------------------------- 3. non-regular files


@pytest.mark.parametrize("suffix", [".pt", ".safetensors", ".bin"])
def test_fifo_checkpoint_refused_without_hanging(tmp_path, suffix):
    src = tmp_path / f"model{suffix}"
    os.mkfifo(src)
    refused(tmp_path, ["prune", src, "-s", "0.5"], 4, "FIFO", "not a regular file", subprocess_=True)


@pytest.mark.parametrize("device", ["/dev/zero", "/dev/urandom"])
@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_checkpoint_linked_to_a_device_refused(tmp_path, device, suffix):
    src = tmp_path / f"model{suffix}"
    src.symlink_to(device)
    refused(tmp_path, ["prune", src, "-s", "0.5"], 4, "character device", subprocess_=True)


def test_sensitivity_on_a_fifo_checkpoint_refused(tmp_path):
    src = tmp_path / "model.pt"
    os.mkfifo(src)
    before = listing(tmp_path)
    p = run_subprocess("sensitivity", src, "-o", tmp_path / "plan.toml", timeout=TIMEOUT)
    assert p.returncode == 4, p.stderr
    assert "FIFO" in one_error_line(p.stderr, p.stdout)
    assert listing(tmp_path) == before


@pytest.mark.parametrize("fmt", ["safetensors", "torch"])
def test_fifo_shard_refused_before_any_shard_is_read(tmp_path, fmt):
    """Shard 1 is valid, shard 2 a FIFO: refused up front (never reading shard 1 and then hanging)."""
    folder = tmp_path / "model"
    folder.mkdir()
    if fmt == "safetensors":
        names = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
        save_file({"a.weight": torch.randn(8, 32)}, str(folder / names[0]))
        index = folder / "model.safetensors.index.json"
    else:
        names = ["pytorch_model-00001-of-00002.bin", "pytorch_model-00002-of-00002.bin"]
        torch.save({"a.weight": torch.randn(8, 32)}, folder / names[0])
        index = folder / "pytorch_model.bin.index.json"
    os.mkfifo(folder / names[1])
    index.write_text(json.dumps({"weight_map": {"a.weight": names[0], "b.weight": names[1]}}))
    refused(tmp_path, ["prune", folder, "-s", "0.5"], 4, "FIFO", names[1], subprocess_=True)


def test_fifo_shard_index_refused(tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    os.mkfifo(folder / "model.safetensors.index.json")
    refused(tmp_path, ["prune", folder, "-s", "0.5"], 4, "FIFO", subprocess_=True)


# --------------------------------------------------------------------------- 4. size bombs


def test_storage_claiming_more_than_its_record_refused(cli, tmp_path):
    """numel 12 -> 200 in the pickle: with mmap torch would read the zip's own bytes as weights."""
    src = tmp_path / "claim.pt"
    rezip(small_pt(tmp_path), src, lambda n, d: d.replace(b"K\x0ct", b"K\xc8t") if n.endswith(".pkl") else d)
    refused(tmp_path, ["prune", src, "-s", "0.5"], 4, "claims 800 bytes", "holds 48", cli=cli)


def test_storage_claiming_gibibytes_refused_quickly(tmp_path):
    """A 1 KiB file claiming a 4 GiB storage: refused with the figure, nothing allocated or read."""
    src = tmp_path / "huge.pt"
    rezip(small_pt(tmp_path), src,
          lambda n, d: d.replace(b"K\x0ct", b"J\x00\x00\x00\x40t") if n.endswith(".pkl") else d)
    assert src.stat().st_size < 4096
    line = refused(tmp_path, ["prune", src, "-s", "0.5"], 4, "claims 4294967296 bytes", subprocess_=True)
    assert "holds 48" in line


def test_rezipped_honest_checkpoint_still_prunes(cli, tmp_path):
    """The checks are not a format fingerprint: the same members re-zipped by Python load fine."""
    src = tmp_path / "rezip.pt"
    rezip(small_pt(tmp_path), src)
    r = cli("prune", src, "-s", "0.5", "-o", tmp_path / "out.safetensors")
    assert r.code == 0, r.err
    assert (tmp_path / "out.safetensors").exists()


def test_storage_without_its_record_refused(cli, tmp_path):
    src = tmp_path / "norecord.pt"
    rezip(small_pt(tmp_path), src, lambda n, d: d.replace(b"X\x01\x00\x00\x000", b"X\x01\x00\x00\x007")
          if n.endswith(".pkl") else d)
    refused(tmp_path, ["prune", src, "-s", "0.5"], 4, "'7'", "no record", cli=cli)


def test_compressed_or_duplicate_zip_members_refused(cli, tmp_path):
    base = small_pt(tmp_path)
    comp = tmp_path / "compressed.pt"
    rezip(base, comp, compress="data/0")
    refused(tmp_path, ["prune", comp, "-s", "0.5"], 4, "compressed", cli=cli)
    comp.unlink()
    dup = tmp_path / "dup.pt"
    with warnings.catch_warnings():  # zipfile may warn about the duplicate name it is told to write
        warnings.simplefilter("ignore")
        rezip(base, dup, extra=[("ok/data/0", b"\0" * 800)])  # torch names the archive after the file
    refused(tmp_path, ["prune", dup, "-s", "0.5"], 4, "twice", cli=cli)


def test_legacy_file_claiming_more_than_it_holds_refused(tmp_path):
    """Legacy (pre-zip) files allocate every storage at its claimed size: checked before torch.load."""
    honest = tmp_path / "legacy.pt"
    torch.save({"w": torch.randn(4, 8)}, honest, _use_new_zipfile_serialization=False)
    raw = honest.read_bytes()
    assert raw.count(b"K\x20Nt") == 1
    src = tmp_path / "legacy-bomb.pt"
    src.write_bytes(raw.replace(b"K\x20Nt", b"J\x00\x00\x00\x40Nt"))  # 32 -> 2**30 floats: 4 GiB
    refused(tmp_path, ["prune", src, "-s", "0.5"], 4, "4294967296 bytes", subprocess_=True)


def test_legacy_honest_file_still_prunes(cli, tmp_path):
    src = tmp_path / "legacy.pt"
    torch.save(small_state_dict(), src, _use_new_zipfile_serialization=False)
    r = cli("prune", src, "-s", "0.5", "-o", tmp_path / "out.safetensors")
    assert r.code == 0, r.err


@pytest.mark.parametrize("make", [
    lambda: torch.zeros(1).expand(1 << 20, 1 << 10),  # stride 0: 4 bytes stored, 4 GiB dense
    lambda: torch.zeros(2000).as_strided((1000, 1000), (1, 1)),  # overlapping rows
], ids=["stride0", "overlap"])
def test_expanding_views_refused_before_they_are_made_contiguous(tmp_path, make):
    src = tmp_path / "view.pt"
    torch.save({"w": make()}, src)
    assert src.stat().st_size < 16384
    refused(tmp_path, ["prune", src, "-s", "0.5"], 4, "'w'", "expand", subprocess_=True)


def test_honest_non_contiguous_view_still_prunes(cli, tmp_path):
    src = tmp_path / "t.pt"
    torch.save({"w": torch.randn(32, 64).t(), "part": torch.randn(64, 64)[:, :32]}, src)
    r = cli("prune", src, "-s", "0.5", "-o", tmp_path / "out.safetensors")
    assert r.code == 0, r.err


# --------------------------------------------------------------------------- no tensors


def test_pt_with_no_tensors_refused(cli, tmp_path):
    src = tmp_path / "empty.pt"
    torch.save({}, src)
    refused(tmp_path, ["prune", src, "-s", "0.5"], 4, "no tensors", cli=cli)


def test_wrapped_empty_state_dict_refused(cli, tmp_path):
    src = tmp_path / "empty.pt"
    torch.save({"state_dict": {}}, src)
    refused(tmp_path, ["prune", src, "-s", "0.5"], 4, "no tensors", cli=cli)


def test_safetensors_with_no_tensors_refused(cli, tmp_path):
    src = tmp_path / "empty.safetensors"
    save_file({}, str(src))
    refused(tmp_path, ["prune", src, "-s", "0.5"], 4, "no tensors", cli=cli)


# --------------------------------------------------------------------------- 2 and 7. shard folders


def sharded(tmp_path: Path, weight_map: object, *, raw: str | None = None) -> Path:
    folder = tmp_path / "model"
    folder.mkdir()
    save_file({"a.weight": torch.randn(8, 32), "a.bias": torch.randn(8)},
              str(folder / "model-00001-of-00001.safetensors"))
    text = raw if raw is not None else json.dumps({"metadata": {}, "weight_map": weight_map})
    (folder / "model.safetensors.index.json").write_text(text)
    return folder


SHARD = "model-00001-of-00001.safetensors"


def test_index_with_duplicate_keys_refused(cli, tmp_path):
    raw = f'{{"weight_map": {{"a.weight": "{SHARD}", "a.bias": "{SHARD}", "a.weight": "other.safetensors"}}}}'
    folder = sharded(tmp_path, None, raw=raw)
    refused(tmp_path, ["prune", folder, "-s", "0.5"], 4, "duplicate key", "a.weight", cli=cli)


def test_index_with_empty_weight_map_refused(cli, tmp_path):
    folder = sharded(tmp_path, {})
    refused(tmp_path, ["prune", folder, "-s", "0.5"], 4, "empty", cli=cli)


@pytest.mark.parametrize("depth", [100, 100_000])
def test_deeply_nested_index_refused(cli, tmp_path, depth):
    wm = json.dumps({"a.weight": SHARD, "a.bias": SHARD})
    raw = f'{{"weight_map": {wm}, "metadata": {"[" * depth}1{"]" * depth}}}'
    folder = sharded(tmp_path, None, raw=raw)
    refused(tmp_path, ["prune", folder, "-s", "0.5"], 4, f"nested {depth + 1} levels deep", cli=cli)


@pytest.mark.parametrize("file", ["/etc/passwd", "../outside.safetensors", "sub/../" + SHARD, ""])
def test_index_shard_path_not_a_plain_name_refused(cli, tmp_path, file):
    folder = sharded(tmp_path, {"a.weight": SHARD, "a.bias": file})
    refused(tmp_path, ["prune", folder, "-s", "0.5"], 4, "plain file name", cli=cli)


@pytest.mark.parametrize("fmt", ["safetensors", "torch"])
def test_shard_symlinked_outside_the_folder_refused(cli, tmp_path, fmt):
    folder = tmp_path / "model"
    folder.mkdir()
    if fmt == "safetensors":
        save_file({"a.weight": torch.randn(8, 32)}, str(tmp_path / "elsewhere.safetensors"))
        (folder / SHARD).symlink_to(tmp_path / "elsewhere.safetensors")
        (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a.weight": SHARD}}))
        shard = SHARD
    else:
        torch.save({"a.weight": torch.randn(8, 32)}, tmp_path / "elsewhere.bin")
        shard = "pytorch_model-00001-of-00001.bin"
        (folder / shard).symlink_to(tmp_path / "elsewhere.bin")
        (folder / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": {"a.weight": shard}}))
    refused(tmp_path, ["prune", folder, "-s", "0.5"], 4, "outside", shard, cli=cli)


def test_shard_symlink_loop_refused(cli, tmp_path):
    """Two links naming each other: Path.resolve raises RuntimeError on Python 3.11 (exit 70 before); one
    line naming the shard, exit 4."""
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / SHARD).symlink_to("loopy")
    (folder / "loopy").symlink_to(SHARD)
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a.weight": SHARD}}))
    refused(tmp_path, ["prune", folder, "-s", "0.5"], 4, "loop", SHARD, cli=cli)


def test_shard_symlinked_inside_the_folder_is_fine(cli, tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    save_file({"a.weight": torch.randn(8, 32)}, str(folder / "real.safetensors"))
    (folder / SHARD).symlink_to("real.safetensors")
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a.weight": SHARD}}))
    r = cli("prune", folder / "model.safetensors.index.json", "-s", "0.5", "-o", tmp_path / "out.safetensors")
    assert r.code == 0, r.err


# --------------------------------------------------------------------------- 8. signals during torch.load

_SLOW_LOAD = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    import torch

    marker = Path(sys.argv[1])
    real_load = torch.load

    def slow_load(*args, **kwargs):
        marker.write_text("loading")
        time.sleep(60)  # the signal arrives here, inside torch.load as far as balprune can tell
        return real_load(*args, **kwargs)

    torch.load = slow_load
    from balprune.cli import main
    sys.exit(main(sys.argv[2:]))
""")


@pytest.mark.parametrize("sig,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_during_torch_load_exits_130_143(tmp_path, sig, code):
    src = tmp_path / "in" / "model.pt"
    src.parent.mkdir()
    torch.save(small_state_dict(), src)
    before = listing(tmp_path)
    marker = tmp_path / "marker"
    out = tmp_path / "out.safetensors"
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"))
    proc = subprocess.Popen([sys.executable, "-c", _SLOW_LOAD, str(marker), "prune", str(src), "-s", "0.5",
                             "-o", str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        deadline = time.monotonic() + TIMEOUT
        while not marker.exists():
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "torch.load was never reached"
            time.sleep(0.02)
        proc.send_signal(sig)
        stdout, stderr = proc.communicate(timeout=TIMEOUT)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == code, (proc.returncode, stderr)
    line = one_error_line(stderr, stdout)
    assert "interrupted" in line
    marker.unlink()
    assert listing(tmp_path) == before  # no output, no temp file, input unchanged


def test_signal_during_claim_scan_is_not_a_corrupt_file(cli, tmp_path, monkeypatch):
    """The pre-load checks pass an interruption through (they catch a corrupt stream's errors, not it)."""
    from balprune import checkpoint
    from balprune.errors import Interrupted

    def interrupted(self, pid):
        raise Interrupted(signal.SIGTERM)

    monkeypatch.setattr(checkpoint._DryRun, "persistent_load", interrupted)
    src = small_pt(tmp_path)
    refused(tmp_path, ["prune", src, "-s", "0.5"], 143, "interrupted", cli=cli)


@pytest.mark.parametrize("names", [["w\udc80"], ["a", "__metadata__"], ["a", "b::values"], ["a", "b\udc80"]],
                         ids=["surrogate", "reserved-alias", "separator-alias", "surrogate-alias"])
def test_names_balprune_cannot_write_are_refused_aliases_included(cli, tmp_path, names):
    """Every tensor name, tied aliases included (two names, one storage), passes the one name rule
    (container.check_tensor_name) before anything is written: never exit 70, never a file verify refuses."""
    t = torch.randn(8, 32)
    src = tmp_path / "m.pt"
    torch.save({n: t for n in names}, src)
    before = src.read_bytes()
    out = tmp_path / "o.safetensors"
    r = cli("prune", src, "-s", "0.5", "--blocks", "4", "-o", out)
    assert r.code == 4 and r.err.startswith("balprune: error: ") and r.err.count("\n") == 1, r
    assert ascii(names[-1])[1:-1] in r.err or names[-1] in r.err, r.err
    assert src.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["m.pt"]


def test_a_checkpoint_with_both_wrappers_asks_for_key(cli, tmp_path):
    """{'state_dict': ..., 'model': ...}: unwrapping either would silently drop the other's weights, so the
    top-level keys are listed and --key asked for (exit 4); with --key the chosen one is pruned."""
    src = tmp_path / "both.pt"
    torch.save({"state_dict": {"w": torch.randn(8, 32)}, "model": {"v": torch.randn(8, 32)}}, src)
    r = cli("prune", src, "-s", "0.5", "--blocks", "4", "-o", tmp_path / "o.safetensors")
    line = one_error_line(r.err)
    assert r.code == 4 and "--key" in line and "'state_dict'" in line and "'model'" in line, r
    assert cli("prune", src, "-s", "0.5", "--blocks", "4", "--key", "model", "-o", tmp_path / "o.safetensors").code == 0
