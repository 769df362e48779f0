"""Regenerate the format v1 and v2 golden files: python tests/golden/make_golden.py

Only run this when the format changes on purpose; then bump FORMAT_VERSION and FORMAT.md too.
The source checkpoint is built from integer arithmetic (no random generator), so it is the
same on every machine and torch version.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1] / "src"))

from balprune.checkpoint import open_checkpoint  # noqa: E402
from balprune.config import PruneOptions  # noqa: E402
from balprune.patterns.kinds import BalancedPattern, BlockPattern, UnstructuredPattern  # noqa: E402
from balprune.prune.engine import prune_checkpoint  # noqa: E402


def grid(rows: int, cols: int, a: int, b: int) -> torch.Tensor:
    r = torch.arange(rows).view(-1, 1)
    c = torch.arange(cols).view(1, -1)
    return (((r * a + c * b) % 29) - 14).to(torch.float32) / 8


def source_state_dict() -> dict[str, torch.Tensor]:
    return {
        "fc.weight": grid(6, 20, 7, 3),                     # K=20: 4 blocks of 5
        "fc.bias": torch.arange(6, dtype=torch.float32),
        "conv.weight": grid(4, 18, 5, 11).reshape(4, 2, 3, 3).to(torch.float16),
        "ragged.weight": grid(3, 10, 3, 5).to(torch.bfloat16),  # K=10 with 4 blocks: L=3, padding
        "ids": torch.arange(12, dtype=torch.int32).reshape(3, 4),
    }


GOLDEN = {
    # format v1 (offsets indices): these bytes predate format v2 and must not change
    "balanced": PruneOptions(BalancedPattern(0.6, blocks=4), index="offsets"),
    "nm24": PruneOptions(BalancedPattern(0.5, blocks=None, block_size=4), index="offsets"),
    # format v2 (bitmask indices)
    "balanced_bitmask": PruneOptions(BalancedPattern(0.6, blocks=4), index="bitmask"),
    "nm24_bitmask": PruneOptions(BalancedPattern(0.5, blocks=None, block_size=4), index="bitmask"),
    "unstructured": PruneOptions(UnstructuredPattern(0.7)),
    "block": PruneOptions(BlockPattern(0.5, (2, 4))),
    # the optional keys (still format v1): hf:config.json in the metadata, the manifest's `transposed`
    "gpt2_hf": PruneOptions(BalancedPattern(0.5, blocks=2), index="offsets"),
}

#: Goldens pruned from the GPT-2-style HF folder below instead of source.safetensors.
HF_SOURCE = "gpt2-source"
HF_GOLDEN = frozenset({"gpt2_hf"})
GPT2_CONFIG = '{"model_type": "gpt2", "n_embd": 4, "n_layer": 1}\n'


def gpt2_state_dict() -> dict[str, torch.Tensor]:
    """One GPT-2 block's Conv1D weights, stored [in, out] (c_attn [h, 3h] with h = 4), and a bias."""
    return {
        "transformer.h.0.attn.c_attn.weight": grid(4, 12, 5, 3),
        "transformer.h.0.attn.c_attn.bias": torch.arange(12, dtype=torch.float32) / 4,
        "transformer.h.0.mlp.c_fc.weight": grid(4, 16, 7, 2),
    }


def source_of(name: str) -> dict[str, torch.Tensor]:
    """The state dict golden ``name`` was pruned from."""
    return gpt2_state_dict() if name in HF_GOLDEN else source_state_dict()


def _write_source(sd, path: Path) -> None:
    """The golden files' input, byte for byte as they were made (no metadata): its sha256 is in every
    golden manifest, so it must not follow save_state_dict's metadata (which gained format=pt)."""
    from balprune.container import AtomicOutput, PlannedTensor, StreamingWriter, dtype_code

    with AtomicOutput(path, force=True) as out:
        writer = StreamingWriter(out.file, [PlannedTensor(n, dtype_code(t.dtype, name=n), tuple(t.shape))
                                            for n, t in sd.items()], {})
        for n, t in sd.items():
            writer.write(n, t)
        writer.finish()
        out.commit()


def write_all(folder: Path) -> None:
    src = folder / "source.safetensors"
    _write_source(source_state_dict(), src)
    hf = folder / HF_SOURCE
    hf.mkdir(exist_ok=True)
    (hf / "config.json").write_text(GPT2_CONFIG)
    _write_source(gpt2_state_dict(), hf / "model.safetensors")
    for name, options in GOLDEN.items():
        ckpt = open_checkpoint(hf if name in HF_GOLDEN else src)
        prune_checkpoint(ckpt, folder / f"{name}.safetensors", options, force=True)


if __name__ == "__main__":
    write_all(HERE)
    print(f"wrote golden files to {HERE}")
