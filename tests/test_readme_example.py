"""The README's fine-tuning example runs as printed (so the README cannot drift from the API)."""

from __future__ import annotations

import re

import torch
from helpers import REPO

from balprune.formats.packed_file import verify_packed


def _example() -> str:
    text = (REPO / "README.md").read_text()
    section = text.split("### Fine-tuning in your own training loop", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_readme_finetuning_example_runs(tmp_path, monkeypatch):
    code = _example()
    assert "Pruner(model, options, every=50, optimizer=opt)" in code
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(code, "README.md example", "exec"), namespace)
    model = namespace["model"]
    pf = verify_packed(tmp_path / "model.balanced.safetensors")
    assert torch.equal(pf.dense("0.weight"), model[0].weight.detach())
    entry = pf.manifest["tensors"]["0.weight"]
    assert (entry["blocks"], entry["block_length"], entry["keep"]) == (32, 10, 1)
