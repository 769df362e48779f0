"""Pruning at scale: balprune against a plain safetensors load+save of the same checkpoint.

Not a timed test: a benchmark to run by hand (``make bench-prune``) on an idle machine.

1. Creates (once, deterministically) a sharded Hugging Face-style safetensors checkpoint of fp16
   tensors with a LLaMA-7B-like mix of shapes (embedding and lm_head 32000x4096, attention
   4096x4096, MLP 11008x4096 / 4096x11008, 1-D norms), enough whole layers to reach --params,
   split into shards of about --shard-gb with a model.safetensors.index.json. Each shard's
   tensors are generated, saved with safetensors.torch.save_file and freed before the next.
2. Baseline, in a fresh child process: for every shard, safetensors.torch.load_file then
   save_file into a temporary folder.
3. balprune, in a fresh child process:
   ``balprune prune <folder> --blocks 32 --sparsity 0.9 -o <out> --force --json``.

Each child is waited for with os.wait4, so its peak RSS (ru_maxrss) is its own and never mixes
with another measurement's; this driver stays small (the checkpoint is generated in a child of
its own) because a child's ru_maxrss starts from its parent's RSS at fork. Wall time covers the whole child (interpreter start and torch
import included, for both). Both run warm: every shard is read once just before each
measurement, so the input is in the page cache for both; written data is synced (untimed)
between measurements so one run's write-back does not slow the next.

Targets (from the requirement): balprune wall <= 3x the copy's wall; balprune peak RSS <=
2 x largest tensor + 500 MB.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MB = 1_000_000
GB = 1_000_000_000
TIME_RATIO_TARGET = 3.0
RSS_SLACK_BYTES = 500 * MB
SPEC_VERSION = 1

COPY_SCRIPT = r"""
import json, sys, time
from pathlib import Path
from safetensors.torch import load_file, save_file
src, dst = Path(sys.argv[1]), Path(sys.argv[2])
index = json.loads((src / "model.safetensors.index.json").read_text())
for shard in sorted(set(index["weight_map"].values())):
    tensors = load_file(src / shard)
    save_file(tensors, dst / shard, metadata={"format": "pt"})
    del tensors
(dst / "model.safetensors.index.json").write_text(json.dumps(index))
"""


# --------------------------------------------------------------------------- the checkpoint


def layout(params: float, hidden: int, intermediate: int, vocab: int) -> list[tuple[str, tuple[int, ...]]]:
    """Tensor names and shapes, LLaMA-style, with the fewest whole layers reaching ``params``."""
    layer = [
        ("self_attn.q_proj.weight", (hidden, hidden)),
        ("self_attn.k_proj.weight", (hidden, hidden)),
        ("self_attn.v_proj.weight", (hidden, hidden)),
        ("self_attn.o_proj.weight", (hidden, hidden)),
        ("mlp.gate_proj.weight", (intermediate, hidden)),
        ("mlp.up_proj.weight", (intermediate, hidden)),
        ("mlp.down_proj.weight", (hidden, intermediate)),
        ("input_layernorm.weight", (hidden,)),
        ("post_attention_layernorm.weight", (hidden,)),
    ]
    per_layer = sum(math.prod(s) for _, s in layer)
    fixed = 2 * vocab * hidden + hidden
    n_layers = max(1, math.ceil((params - fixed) / per_layer))
    out: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (vocab, hidden))]
    for i in range(n_layers):
        out += [(f"model.layers.{i}.{name}", shape) for name, shape in layer]
    out += [("model.norm.weight", (hidden,)), ("lm_head.weight", (vocab, hidden))]
    return out


def shard_plan(tensors: list[tuple[str, tuple[int, ...]]], shard_bytes: int) -> list[list[tuple[str, tuple[int, ...]]]]:
    """Consecutive tensors grouped into shards of at most ``shard_bytes`` (fp16), HF-style."""
    shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for name, shape in tensors:
        nbytes = 2 * math.prod(shape)
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, shape))
        size += nbytes
    return shards


def checkpoint_ready(folder: Path, spec: dict) -> bool:
    stamp = folder / "bench-spec.json"
    return stamp.is_file() and json.loads(stamp.read_text()) == spec


def make_checkpoint(folder: Path, spec: dict) -> None:
    """Write the checkpoint shard by shard (generate, save, free). Runs in a child process."""
    import torch
    from safetensors.torch import save_file

    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    tensors = layout(spec["params"], spec["hidden"], spec["intermediate"], spec["vocab"])
    shards = shard_plan(tensors, spec["shard_bytes"])
    weight_map: dict[str, str] = {}
    total = 0
    gen = torch.Generator().manual_seed(spec["seed"])
    for i, shard in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        print(f"  generating {file} ({len(shard)} tensors)", file=sys.stderr, flush=True)
        data = {}
        for name, shape in shard:
            if len(shape) == 1:
                t = 1.0 + 0.05 * torch.randn(shape, generator=gen)
            else:
                t = torch.randn(shape, generator=gen) * (1.0 / math.sqrt(shape[1]))
            data[name] = t.to(torch.float16)
            del t
            weight_map[name] = file
            total += 2 * math.prod(shape)
        save_file(data, folder / file, metadata={"format": "pt"})
        del data
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    (folder / "bench-spec.json").write_text(json.dumps(spec))


def shard_files(folder: Path) -> list[Path]:
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    return [folder / f for f in sorted(set(index["weight_map"].values()))]


def warm(files: list[Path]) -> None:
    """Read every file once so it sits in the page cache."""
    buf = bytearray(1 << 24)
    for f in files:
        with open(f, "rb", buffering=0) as fh:
            while fh.readinto(buf):
                pass


# --------------------------------------------------------------------------- measuring


def measure(cmd: list[str], stdout_path: Path, env: dict[str, str] | None = None) -> dict:
    """Run ``cmd`` in a fresh child; its wall time, peak RSS and CPU time (its own, via wait4).

    This process never imports torch or holds tensor data, so the RSS a child inherits at fork
    (counted in its ru_maxrss) is a few tens of MB, far below what is measured.
    """
    with open(stdout_path, "wb") as out, tempfile.TemporaryFile() as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, env=env)
        _, status, ru = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
        err.seek(0)
        stderr = err.read().decode(errors="replace")
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed with exit {proc.returncode}:\n{stderr[-4000:]}")
    return {"wall_s": wall, "peak_rss_bytes": ru.ru_maxrss * 1024, "cpu_s": ru.ru_utime + ru.ru_stime}


def balprune_command() -> list[str]:
    exe = Path(sys.executable).parent / "balprune"
    return [str(exe)] if exe.is_file() else [sys.executable, "-m", "balprune"]


def sync() -> None:
    if hasattr(os, "sync"):
        os.sync()


# --------------------------------------------------------------------------- report


def render(r: dict) -> str:
    def row(label: str, value: str) -> str:
        return f"| {label} | {value} |"

    lines = [
        "| quantity | value |",
        "|---|---|",
        row("parameters", f"{r['params']:,} ({r['n_tensors']} tensors, {r['pruned_tensors']} pruned; {r['n_shards']} shards)"),
        row("input size", f"{r['input_bytes'] / GB:.2f} GB"),
        row("largest tensor", f"{r['largest_tensor_bytes'] / MB:.0f} MB ({r['largest_tensor']})"),
        row("copy wall (load_file + save_file)", f"{r['copy']['wall_s']:.1f} s (CPU {r['copy']['cpu_s']:.1f} s)"),
        row("balprune wall", f"{r['balprune']['wall_s']:.1f} s (CPU {r['balprune']['cpu_s']:.1f} s)"),
        row("wall ratio balprune / copy (target <= 3)",
            f"{r['time_ratio']:.2f} -> {'PASS' if r['time_pass'] else 'FAIL'}"),
        row("copy peak RSS", f"{r['copy']['peak_rss_bytes'] / MB:.0f} MB"),
        row("balprune peak RSS", f"{r['balprune']['peak_rss_bytes'] / MB:.0f} MB"),
        row("RSS target (2 x largest tensor + 500 MB)",
            f"{r['rss_target_bytes'] / MB:.0f} MB -> {'PASS' if r['rss_pass'] else 'FAIL'}"),
        row("peak RSS of `import torch` alone (same venv)", f"{r['import_torch']['peak_rss_bytes'] / MB:.0f} MB"),
        row("balprune peak RSS above the import-torch floor",
            f"{r['balprune_rss_above_import_bytes'] / MB:.0f} MB -> "
            f"{'PASS' if r['rss_above_import_pass'] else 'FAIL'} against the same target"),
        row("output size vs input", f"{r['output_bytes'] / GB:.3f} GB = {r['output_bytes'] / r['input_bytes']:.1%}"),
        row("page cache", "warm for both (input read once just before each run)"),
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--params", type=float, default=1.0e9, help="parameters at least (default 1e9)")
    ap.add_argument("--out-dir", type=Path, default=REPO / "bench-out", help="work folder (default bench-out/)")
    ap.add_argument("--keep", action="store_true", help="keep the checkpoint and outputs afterwards")
    ap.add_argument("--json", type=Path, metavar="FILE", help="also write the figures as JSON")
    ap.add_argument("--shard-gb", type=float, default=1.0, help="largest shard size in GB (default 1.0)")
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--intermediate", type=int, default=11008)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--_generate", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args._generate:
        make_checkpoint(Path(args._generate[0]), json.loads(args._generate[1]))
        return 0

    spec = {"version": SPEC_VERSION, "params": args.params, "hidden": args.hidden, "intermediate": args.intermediate,
            "vocab": args.vocab, "seed": args.seed, "shard_bytes": int(args.shard_gb * GB)}
    tensors = layout(args.params, args.hidden, args.intermediate, args.vocab)
    n_params = sum(math.prod(s) for _, s in tensors)
    input_bytes = 2 * n_params
    largest_name, largest_shape = max(tensors, key=lambda t: math.prod(t[1]))
    largest = 2 * math.prod(largest_shape)

    work = args.out_dir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    need = 2.3 * input_bytes
    free = shutil.disk_usage(work).free
    if free < need:
        raise SystemExit(f"{work}: {free / GB:.1f} GB free, the benchmark needs about {need / GB:.1f} GB")
    ckpt = work / f"ckpt-{n_params}"
    copy_dir = work / "copy-tmp"
    packed = work / "pruned.balanced.safetensors"

    print(f"checkpoint: {n_params:,} fp16 parameters, {input_bytes / GB:.2f} GB in {ckpt}", file=sys.stderr)
    if not checkpoint_ready(ckpt, spec):
        # Generated in a child so this process stays small: a child's ru_maxrss starts from its
        # parent's RSS at fork time (Linux keeps the old mm's high-water mark across exec).
        subprocess.run([sys.executable, __file__, "--_generate", str(ckpt), json.dumps(spec)], check=True)
    files = shard_files(ckpt)
    assert sum(f.stat().st_size for f in files) >= input_bytes
    sync()

    try:
        # The floor every torch process pays before touching a tensor (import torch alone).
        floor = measure([sys.executable, "-c", "import torch, safetensors.torch"], work / "floor.stdout")
        print("baseline: safetensors load_file + save_file per shard ...", file=sys.stderr, flush=True)
        if copy_dir.exists():
            shutil.rmtree(copy_dir)
        copy_dir.mkdir()
        warm(files)
        copy = measure([sys.executable, "-c", COPY_SCRIPT, str(ckpt), str(copy_dir)], work / "copy.stdout")
        shutil.rmtree(copy_dir)
        sync()

        print("balprune prune --blocks 32 --sparsity 0.9 ...", file=sys.stderr, flush=True)
        warm(files)
        cmd = balprune_command() + ["prune", str(ckpt), "--blocks", "32", "--sparsity", "0.9",
                                    "-o", str(packed), "--force", "--json"]
        bal = measure(cmd, work / "balprune-report.json")
        report = json.loads((work / "balprune-report.json").read_text())
        output_bytes = packed.stat().st_size
        sync()
    finally:
        if copy_dir.exists():
            shutil.rmtree(copy_dir)

    versions = subprocess.run([sys.executable, "-c", "import torch; print(torch.__version__, torch.get_num_threads())"],
                              capture_output=True, text=True, check=True).stdout.split()
    rss_target = 2 * largest + RSS_SLACK_BYTES
    result = {
        "schema": "balprune.bench.prune-scale/1",
        "command": "balprune prune <ckpt> --blocks 32 --sparsity 0.9 -o <out> --force --json",
        "params": n_params, "n_tensors": len(tensors), "n_shards": len(files),
        "pruned_tensors": sum(t["action"] == "pruned" for t in report["tensors"]),
        "input_bytes": input_bytes, "largest_tensor": largest_name, "largest_tensor_bytes": largest,
        "import_torch": floor, "copy": copy, "balprune": bal,
        "balprune_rss_above_import_bytes": bal["peak_rss_bytes"] - floor["peak_rss_bytes"],
        "rss_above_import_pass": bal["peak_rss_bytes"] - floor["peak_rss_bytes"] <= rss_target,
        "time_ratio": bal["wall_s"] / copy["wall_s"],
        "time_pass": bal["wall_s"] <= TIME_RATIO_TARGET * copy["wall_s"],
        "rss_target_bytes": rss_target, "rss_pass": bal["peak_rss_bytes"] <= rss_target,
        "output_bytes": output_bytes, "warm": True,
        "driver_peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "torch": versions[0],
                    "torch_threads": int(versions[1]), "platform": platform.platform()},
    }
    print(render(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    if not args.keep:
        shutil.rmtree(ckpt, ignore_errors=True)
        for p in (packed, work / "balprune-report.json", work / "copy.stdout", work / "floor.stdout"):
            p.unlink(missing_ok=True)
    return 0 if result["time_pass"] and result["rss_pass"] else 1


if __name__ == "__main__":
    sys.exit(main())
