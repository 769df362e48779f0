"""Shared helpers: run the real CLI (in-process or as a subprocess) on real files."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from helpers import REPO, run_subprocess, small_state_dict  # noqa: E402,F401

from balprune.cli import main  # noqa: E402
from balprune.save import save_state_dict  # noqa: E402


class CliResult:
    def __init__(self, code: int, out: str, err: str) -> None:
        self.code, self.out, self.err = code, out, err

    def __repr__(self) -> str:
        return f"CliResult(code={self.code}, err={self.err!r})"


@pytest.fixture
def cli(capsys):
    """Run ``balprune ARGS`` in-process; returns (exit code, stdout, stderr)."""

    def run(*args: str) -> CliResult:
        code = main([str(a) for a in args])
        captured = capsys.readouterr()
        return CliResult(code, captured.out, captured.err)

    return run


@pytest.fixture
def small_pt(tmp_path) -> Path:
    p = tmp_path / "model.pt"
    torch.save(small_state_dict(), p)
    return p


@pytest.fixture
def small_st(tmp_path) -> Path:
    p = tmp_path / "model.safetensors"
    save_state_dict(small_state_dict(), p)
    return p
