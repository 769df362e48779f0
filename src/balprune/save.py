"""Writing plain (dense) checkpoints atomically: .safetensors streamed, .pt via torch.save."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from .container import AtomicOutput, PlannedTensor, StreamingWriter, dtype_code, verify_written
from .errors import OutputError, UsageError


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
            _torch_save(state_dict, out)
            out.commit()


def save_torch_atomic(obj: object, output: Path, *, force: bool = False) -> None:
    """torch.save ``obj`` (tensors and plain values: weights_only loads it) to ``output`` atomically."""
    with AtomicOutput(Path(output), force=force) as out:
        _torch_save(obj, out)
        out.commit()


def _torch_save(obj: object, out: AtomicOutput) -> None:
    """torch.save into the temp file; a failed write is an output error (exit 5), never exit 70.

    torch's zip writer reports a full disk as RuntimeError ("unexpected pos ..."), not OSError."""
    try:
        torch.save(obj, out.file)
    except (RuntimeError, OSError) as exc:
        free = shutil.disk_usage(out.temp_path.parent).free
        reason = "disk full" if free < (1 << 20) else f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
        raise OutputError(f"cannot write {out.final_path}: {reason}; nothing was written") from None
