"""Shared helpers: run the real CLI (in-process or as a subprocess) on real files."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from balprune.cli import main
from balprune.save import save_state_dict

REPO = Path(__file__).resolve().parents[1]


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


def run_subprocess(*args: str, **kw) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"))
    return subprocess.run([sys.executable, "-m", "balprune", *map(str, args)], capture_output=True, text=True,
                          env=env, **kw)


def small_state_dict(seed: int = 0, dtype=torch.float32) -> dict[str, torch.Tensor]:
    """A model-like state dict: linears (ragged K), a conv, 1-D tensors, an int buffer."""
    g = torch.Generator().manual_seed(seed)
    return {
        "conv.weight": torch.randn(16, 3, 3, 3, generator=g).to(dtype),
        "conv2.weight": torch.randn(8, 16, 3, 3, generator=g).to(dtype),
        "fc1.weight": torch.randn(24, 100, generator=g).to(dtype),
        "fc1.bias": torch.randn(24, generator=g).to(dtype),
        "fc2.weight": torch.randn(10, 64, generator=g).to(dtype),
        "norm.running_mean": torch.randn(8, generator=g).to(dtype),
        "norm.num_batches_tracked": torch.tensor(7),
        "q.weight": torch.randint(-128, 127, (12, 40), generator=g, dtype=torch.int8),
    }


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
