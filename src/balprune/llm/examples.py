"""Hugging Face folders of the Llama family with random weights, written shard by shard.

``write_hf_folder(cfg, folder)`` writes what ``from_pretrained`` and ``open_llm`` read: config.json,
``model-0000K-of-0000N.safetensors`` shards and ``model.safetensors.index.json`` (and a tokenizer.json when
given one; ``write_example`` gives the presets llm.text's small byte-level BPE, ids < vocab_size). Weights are drawn
N(0, 0.02) (norm weights 1, biases 0.02-normal too), each tensor from its own generator seeded by
(seed, tensor name), so the bytes do not depend on the shard size. Only one tensor is in memory at a
time (llama-8b is 16 GB in bfloat16; its largest tensor, the embedding, is 1 GB). Every file goes
through balprune's atomic writer (temp file, fsync, re-read and CRC check, rename). A new folder is
built beside its final path (``.NAME.balprune-tmp-PID-RANDOM``) and renamed into place when complete, so an
interrupted run leaves nothing at the final path; with ``force`` over an existing folder each file is
replaced atomically and config.json comes last.

Presets (``PRESETS``): ``llama-tiny`` (4 layers, hidden 64, GQA 4:2, llama3 RoPE scaling, tied: seconds
on a CPU), ``llama-1b`` (Llama-3.2-1B shapes, tied, bfloat16: 2.5 GB), ``llama-8b`` (Llama-3-8B
shapes, bfloat16: 16 GB).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import zlib
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import torch

from ..container import (
    AtomicOutput,
    PlannedTensor,
    StreamingWriter,
    dtype_code,
    temp_folder_beside,
    verify_written,
    write_bytes_atomic,
)
from ..errors import OutputError, UsageError
from .family import ARCHITECTURES, Llama3RopeScaling, LlmConfig, expected_tensors

#: Default largest shard (HF's save_pretrained default is 5 GB: llama-8b comes out in 4 shards).
MAX_SHARD_BYTES = 5 * 10**9

_LLAMA32_ROPE = Llama3RopeScaling(factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                  original_max_position_embeddings=8192)

PRESETS: dict[str, tuple[str, LlmConfig]] = {
    "llama-tiny": ("Llama-3-style, 4 layers, hidden 64, GQA 4:2, vocabulary 512, tied, float32 (seconds on a CPU)",
                   LlmConfig(model_type="llama", vocab_size=512, hidden_size=64, intermediate_size=176,
                             num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                             rms_norm_eps=1e-5, rope_theta=500000.0,
                             rope_scaling=replace(_LLAMA32_ROPE, original_max_position_embeddings=256),
                             tie_word_embeddings=True, attention_bias=False, max_position_embeddings=2048,
                             torch_dtype="float32")),
    "llama-100m": ("Llama-style, 12 layers, hidden 768, GQA 12:4, vocabulary 32000, tied, float32: 100M parameters "
                   "(400 MB; the CPU-scale calibration target)",
                   LlmConfig(model_type="llama", vocab_size=32000, hidden_size=768, intermediate_size=2048,
                             num_hidden_layers=12, num_attention_heads=12, num_key_value_heads=4, head_dim=64,
                             rms_norm_eps=1e-5, rope_theta=500000.0, rope_scaling=None,
                             tie_word_embeddings=True, attention_bias=False, max_position_embeddings=4096,
                             torch_dtype="float32")),
    "llama-1b": ("Llama-3.2-1B shapes: 16 layers, hidden 2048, GQA 32:8, vocabulary 128256, tied, bfloat16 (2.5 GB)",
                 LlmConfig(model_type="llama", vocab_size=128256, hidden_size=2048, intermediate_size=8192,
                           num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8, head_dim=64,
                           rms_norm_eps=1e-5, rope_theta=500000.0, rope_scaling=_LLAMA32_ROPE,
                           tie_word_embeddings=True, attention_bias=False, max_position_embeddings=131072,
                           torch_dtype="bfloat16")),
    "llama-8b": ("Llama-3-8B shapes: 32 layers, hidden 4096, GQA 32:8, vocabulary 128256, untied, bfloat16 (16 GB)",
                 LlmConfig(model_type="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                           num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                           rms_norm_eps=1e-5, rope_theta=500000.0, rope_scaling=None,
                           tie_word_embeddings=False, attention_bias=False, max_position_embeddings=8192,
                           torch_dtype="bfloat16")),
}

_TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def config_dict(cfg: LlmConfig) -> dict[str, object]:
    """config.json for ``cfg`` in transformers 4.x form (rope_theta + rope_scaling, torch_dtype), which
    transformers 4.x and 5.x both load and ``family.parse_config`` reads back to ``cfg``."""
    d: dict[str, object] = {
        "architectures": [ARCHITECTURES[cfg.model_type]],
        "model_type": cfg.model_type,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_hidden_layers,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_key_value_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": cfg.rms_norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": None,
        "max_position_embeddings": cfg.max_position_embeddings,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "initializer_range": 0.02,
        "use_cache": True,
        "bos_token_id": 1 if cfg.vocab_size > 2 else None,
        "eos_token_id": 2 if cfg.vocab_size > 2 else None,
    }
    if cfg.rope_scaling is not None:
        r = cfg.rope_scaling
        d["rope_scaling"] = {"rope_type": "llama3", "factor": r.factor, "low_freq_factor": r.low_freq_factor,
                             "high_freq_factor": r.high_freq_factor,
                             "original_max_position_embeddings": r.original_max_position_embeddings}
    if cfg.model_type in ("llama", "qwen3"):
        d["attention_bias"] = cfg.attention_bias
    if cfg.model_type == "llama":
        d["mlp_bias"] = False
    if cfg.model_type == "mistral":
        d["sliding_window"] = cfg.sliding_window
    if cfg.model_type in ("qwen2", "qwen3"):
        d["use_sliding_window"] = False
    if cfg.torch_dtype is not None:
        d["torch_dtype"] = cfg.torch_dtype
    return d


def shard_names(count: int) -> list[str]:
    """The weight file names of an HF folder of ``count`` shards, as transformers writes them."""
    return [f"model-{k + 1:05d}-of-{count:05d}.safetensors" for k in range(count)]


def _plan_shards(plan: list[PlannedTensor], max_shard_bytes: int) -> list[list[PlannedTensor]]:
    """Greedy, in model order: a new shard starts when the next tensor would pass the limit."""
    shards: list[list[PlannedTensor]] = [[]]
    size = 0
    for t in plan:
        if shards[-1] and size + t.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += t.nbytes
    return shards


def random_tensor(name: str, shape: tuple[int, ...], dtype: torch.dtype, seed: int, std: float = 0.02) -> torch.Tensor:
    """The example value of tensor ``name``: ones for norm weights, else N(0, std) drawn from a generator
    seeded by (seed, name); generated in ``dtype`` directly (no float32 copy of a 1 GB embedding)."""
    if name.endswith("norm.weight"):
        return torch.ones(shape, dtype=dtype)
    g = torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63))
    return torch.empty(shape, dtype=dtype).normal_(0.0, std, generator=g)


def write_hf_folder(cfg: LlmConfig, folder: str | os.PathLike[str], *, seed: int = 0, force: bool = False,
                    max_shard_bytes: int = MAX_SHARD_BYTES, dtype: torch.dtype | None = None,
                    progress: Callable[[str, int, int], None] | None = None,
                    tensor_fn: Callable[[str, tuple[int, ...], torch.dtype], torch.Tensor] | None = None,
                    tokenizer_json: bytes | None = None) -> Path:
    """Write an HF causal-LM folder for ``cfg`` with random weights (module docstring); returns the folder.

    ``folder`` is created if missing (its parent must exist); an existing folder must be empty unless
    ``force``, which replaces the files this writer names (each atomically) and leaves others alone.
    ``dtype`` defaults to cfg.torch_dtype (float32 if unset). ``progress(name, done, total)`` is called
    after each tensor. ``tensor_fn(name, shape, dtype)`` replaces the random values (tests).
    ``tokenizer_json``: the bytes of a tokenizer.json to write beside the weights (None: none written).
    Raises OutputError (exit 5) for an unusable folder, UsageError (exit 2) for a bad shard size.
    """
    if not isinstance(max_shard_bytes, int) or max_shard_bytes < 1:
        raise UsageError(f"max_shard_bytes must be a positive integer, got {max_shard_bytes!r}")
    out = Path(folder)
    if dtype is None:
        dtype = _TORCH_DTYPES[cfg.torch_dtype or "float32"]
    dtype_name = next((k for k, v in _TORCH_DTYPES.items() if v == dtype), None)
    if dtype_name is None:
        raise UsageError(f"dtype must be one of {', '.join(_TORCH_DTYPES)}, got {dtype}")
    cfg = replace(cfg, torch_dtype=dtype_name)
    in_place = _prepare_folder(out, force)
    plan = [PlannedTensor(n, dtype_code(dtype, name=n), s) for n, s in expected_tensors(cfg).items()]
    shards = _plan_shards(plan, max_shard_bytes)
    files = shard_names(len(shards))
    _check_free_space(out, plan, shards, files, in_place)
    if in_place:  # --force over a non-empty folder: each file replaced atomically, config.json last
        _write_files(cfg, out, shards, files, dtype, seed, True, progress, tensor_fn, tokenizer_json)
        return out
    # A new (or empty) folder is built beside it and renamed into place: it appears complete or not at all.
    tmp = temp_folder_beside(out)
    try:
        _write_files(cfg, tmp, shards, files, dtype, seed, False, progress, tensor_fn, tokenizer_json)
        try:
            os.rename(tmp, out)  # replaces an empty folder; fails if anything appeared in it meanwhile
        except OSError as exc:
            raise OutputError(f"cannot move the written folder to {out}: {exc.strerror or exc}",
                              hint="was something written there meanwhile?") from None
    finally:
        if tmp.is_dir() and not tmp.is_symlink():
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def _write_files(cfg: LlmConfig, out: Path, shards: list[list[PlannedTensor]], files: list[str], dtype: torch.dtype,
                 seed: int, force: bool, progress: Callable[[str, int, int], None] | None,
                 tensor_fn: Callable[[str, tuple[int, ...], torch.dtype], torch.Tensor] | None,
                 tokenizer_json: bytes | None = None) -> None:
    """The shards (one tensor in memory at a time), then the index (and tokenizer.json), then config.json;
    each file atomic."""
    make = tensor_fn or (lambda n, s, d: random_tensor(n, s, d, seed))
    done, total = 0, sum(len(s) for s in shards)
    weight_map: dict[str, str] = {}
    for file, shard in zip(files, shards):
        with AtomicOutput(out / file, force=force) as atomic:
            writer = StreamingWriter(atomic.file, shard, {"format": "pt"})
            for t in shard:
                writer.write(t.name, make(t.name, t.shape, dtype))
                weight_map[t.name] = file
                done += 1
                if progress is not None:
                    progress(t.name, done, total)
            writer.finish()
            atomic.commit(lambda tmp, w=writer: verify_written(tmp, w.header_bytes, w.crc32))
    index = {"metadata": {"total_size": sum(t.nbytes for shard in shards for t in shard)},
             "weight_map": dict(sorted(weight_map.items()))}
    write_bytes_atomic(out / "model.safetensors.index.json", _json_bytes(index), force=force)
    if tokenizer_json is not None:
        write_bytes_atomic(out / "tokenizer.json", tokenizer_json, force=force)
    write_bytes_atomic(out / "config.json", config_json(cfg).encode(), force=force)


def _check_free_space(out: Path, plan: list[PlannedTensor], shards: list[list[PlannedTensor]], files: list[str],
                      in_place: bool) -> None:
    """OutputError (exit 5) before any work when the file system cannot hold the folder."""
    need = sum(t.nbytes for t in plan) + (1 << 20)
    if in_place:  # files replaced one at a time: the old ones' space comes back, one shard's worth is extra
        old = sum((out / f).stat().st_size for f in files if (out / f).is_file())
        need = max(need - old, max(sum(t.nbytes for t in s) for s in shards))
    try:
        free = shutil.disk_usage(out if out.exists() else out.parent).free
    except OSError:
        return
    if need > free:
        raise OutputError(f"{out}: the folder needs {need / 1e9:.2f} GB, the file system has {free / 1e9:.2f} GB free")


def write_example(name: str, folder: str | os.PathLike[str], *, seed: int = 0, force: bool = False,
                  progress: Callable[[str, int, int], None] | None = None) -> Path:
    """``write_hf_folder`` of preset ``name`` (a key of PRESETS), with the example tokenizer.json
    (llm.text.example_tokenizer_json: the same bytes for every seed); UsageError (exit 2) for an unknown one."""
    from .text import example_tokenizer_json

    if name not in PRESETS:
        raise UsageError(f"unknown LLM example {name!r}; choose one of {', '.join(PRESETS)}")
    cfg = PRESETS[name][1]
    return write_hf_folder(cfg, folder, seed=seed, force=force, progress=progress,
                           tokenizer_json=example_tokenizer_json(cfg.vocab_size))


def folder_bytes(cfg: LlmConfig, dtype: torch.dtype | None = None) -> int:
    """Bytes of weights ``write_hf_folder`` writes for ``cfg`` (for a free-space check before writing)."""
    dtype = dtype or _TORCH_DTYPES[cfg.torch_dtype or "float32"]
    item = torch.empty((), dtype=dtype).element_size()
    return sum(math.prod(s) * item for s in expected_tensors(cfg).values())


def config_json(cfg: LlmConfig) -> str:
    """The text of the config.json written for ``cfg`` (``config_dict``, indented, newline-terminated)."""
    return json.dumps(config_dict(cfg), indent=2) + "\n"


def _json_bytes(obj: object) -> bytes:
    return (json.dumps(obj, indent=2) + "\n").encode()


def _prepare_folder(out: Path, force: bool) -> bool:
    """True when writing into an existing non-empty folder (force); False when building beside it."""
    if out.is_symlink():
        raise OutputError(f"output {out} is a symbolic link; give the folder's own path")
    if out.exists():
        if not out.is_dir():
            raise OutputError(f"output {out} exists and is not a folder")
        if any(out.iterdir()):
            if not force:
                raise OutputError(f"output folder {out} is not empty",
                                  hint="pass --force to replace the files it writes")
            return True
        return False
    if not out.parent.is_dir():
        raise OutputError(f"output folder {out.parent} does not exist")
    if not os.access(out.parent, os.W_OK | os.X_OK):
        raise OutputError(f"cannot write in {out.parent}")
    return False
