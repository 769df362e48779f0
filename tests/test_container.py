"""The atomic writer's re-read check (bad-inputs item 21) exercised directly on real files."""

from __future__ import annotations

import pytest
import torch

from balprune.container import AtomicOutput, PlannedTensor, StreamingWriter, parse_file, verify_written
from balprune.errors import OutputError


def _write(out: AtomicOutput) -> StreamingWriter:
    t = torch.arange(64, dtype=torch.float32).reshape(8, 8)
    w = StreamingWriter(out.file, [PlannedTensor("a", "F32", (8, 8)), PlannedTensor("b", "U8", (3,))], {"k": "v"})
    w.write("b", torch.tensor([1, 2, 3], dtype=torch.uint8))
    w.write("a", t)
    w.finish()
    return w


def test_corruption_after_write_is_caught_before_rename(tmp_path):
    final = tmp_path / "out.safetensors"
    with AtomicOutput(final) as out:
        w = _write(out)

        def corrupt_then_check(tmp):
            raw = bytearray(tmp.read_bytes())
            raw[-5] ^= 0xFF  # flip bits inside the data of the last tensor laid out
            tmp.write_bytes(bytes(raw))
            verify_written(tmp, w.header_bytes, w.crc32)

        with pytest.raises(OutputError, match="differs when read back"):
            out.commit(corrupt_then_check)
    assert not final.exists()
    assert list(tmp_path.iterdir()) == []


def test_clean_write_commits_and_is_aligned(tmp_path):
    final = tmp_path / "out.safetensors"
    with AtomicOutput(final) as out:
        w = _write(out)
        out.commit(lambda tmp: verify_written(tmp, w.header_bytes, w.crc32))
    pf = parse_file(final)
    assert [e.name for e in pf.entries] == ["a", "b"] and pf.metadata == {"k": "v"}
    assert pf.entry("a").begin % 8 == 0
    assert list(tmp_path.iterdir()) == [final]


def test_writer_refuses_a_missing_or_misshapen_tensor(tmp_path):
    with AtomicOutput(tmp_path / "o.safetensors") as out:
        w = StreamingWriter(out.file, [PlannedTensor("a", "F32", (2,))], {})
        with pytest.raises(ValueError):
            w.write("a", torch.zeros(3))
        with pytest.raises(ValueError, match="never written"):
            w.finish()
    assert list(tmp_path.iterdir()) == []
