"""Writing plain (dense) checkpoints atomically: .safetensors streamed, .pt via torch.save."""

from __future__ import annotations

from pathlib import Path

import torch

from .container import AtomicOutput, PlannedTensor, StreamingWriter, dtype_code, verify_written
from .errors import UsageError


def save_state_dict(state_dict: dict[str, torch.Tensor], output: Path, *, force: bool = False,
                    metadata: dict[str, str] | None = None) -> None:
    """Write ``state_dict`` to ``output`` (.safetensors, or .pt/.pth/.bin) atomically.

    A .safetensors file's metadata always holds ``format: pt`` (beside ``metadata``): transformers and
    other safetensors readers refuse a file whose format they do not know."""
    output = Path(output)
    if output.suffix not in (".safetensors", ".pt", ".pth", ".bin"):
        raise UsageError(f"{output}: choose a .safetensors, .pt, .pth or .bin file name")
    with AtomicOutput(output, force=force) as out:
        if output.suffix == ".safetensors":
            plan = [PlannedTensor(n, dtype_code(t.dtype, name=n), tuple(t.shape)) for n, t in state_dict.items()]
            writer = StreamingWriter(out.file, plan, {"format": "pt", **(metadata or {})})
            for n, t in state_dict.items():
                writer.write(n, t)
            writer.finish()
            out.commit(lambda tmp: verify_written(tmp, writer.header_bytes, writer.crc32))
        else:
            torch.save(state_dict, out.file)
            out.commit()
