#!/usr/bin/env python3
"""Issue 17: how long `balprune prune FOLDER --criterion wanda|sparsegpt` takes, and its peak memory.

Run from the repository root:

    PYTHONPATH=src python3 benchmarks/llm_prune_time.py --model llama-100m --device cpu --out runs/prune-time
    PYTHONPATH=src python3 benchmarks/llm_prune_time.py --model llama-1b --device cuda --out runs/prune-time

What it does:

1. ``python3 -m balprune example MODEL -o OUT/MODEL`` (random weights, std 0.02), reused when there;
2. writes ``OUT/calib.npy``: ``2 x samples x seq_len`` token ids drawn uniformly from the vocabulary
   (seeded), the calibration file of a random-weight model;
3. times ``python3 -m balprune prune OUT/MODEL --criterion C --calibration OUT/calib.npy --samples S
   --seq-len L --blocks 32 --sparsity 0.5 --device D -o OUT/MODEL.packed.safetensors --force --json``
   as one child process (wall clock from start to exit: imports, reading, calibration, writing), the
   child reporting its own peak resident memory and, on CUDA, torch's peak allocated device memory;
4. prints, and writes to OUT/<model>-<criterion>-<device>.json: the time, the peaks, and the budget
   the issue sets for the device peak, "2 decoder layers plus activations" = 2 x one decoder layer's
   weights in float32 (calibration runs in float32) + the calibration hidden states (samples x
   seq_len x hidden x 4 bytes) -- beside the targets: llama-1b with wanda on the H200 <= 3 minutes
   with its device peak under that budget; a 100M-parameter folder on the CPU machine <= 10 minutes.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shlex
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
#: (model, device) -> the issue's time limit in seconds.
TIME_TARGETS = {("llama-1b", "cuda"): 180.0, ("llama-100m", "cpu"): 600.0}


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO / "src"), env.get("PYTHONPATH")]))
    return env


def child(report: Path, argv: list[str]) -> None:
    """Run the balprune CLI in this process, then write its peak memory to ``report``."""
    from balprune.cli import main

    code = 1
    try:
        sys.argv = ["balprune", *argv]
        code = main()
    finally:
        peak = {"rc": code, "max_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
        try:
            import torch

            if torch.cuda.is_available() and torch.cuda.is_initialized():
                peak["cuda_max_allocated_bytes"] = torch.cuda.max_memory_allocated()
                peak["cuda_max_reserved_bytes"] = torch.cuda.max_memory_reserved()
                peak["gpu"] = torch.cuda.get_device_name()  # the figure's machine (the target names the H200)
        except Exception as exc:  # the figures are extras: never hide the command's own outcome
            peak["cuda_error"] = str(exc)[:200]
        report.write_text(json.dumps(peak))
    sys.exit(code)


def budget_bytes(cfg, samples: int, seq_len: int) -> dict[str, int]:
    """The issue's device-memory budget: 2 decoder layers (float32) plus the calibration hidden states."""
    h, q, kv, inter = cfg.hidden_size, cfg.q_dim, cfg.kv_dim, cfg.intermediate_size
    layer = 4 * (2 * h * q + 2 * h * kv + 3 * h * inter + 2 * h)
    activations = 4 * samples * seq_len * h
    return {"layer_bytes": layer, "activation_bytes": activations, "budget_bytes": 2 * layer + activations}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="llama-100m")
    ap.add_argument("--criterion", default="wanda", choices=("wanda", "sparsegpt"))
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--samples", type=int, default=128)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--child-report", type=Path, help=argparse.SUPPRESS)
    args, rest = ap.parse_known_args(argv)
    if args.child_report is not None:
        child(args.child_report, rest[1:] if rest[:1] == ["--"] else rest)
    sys.path.insert(0, str(REPO / "src"))
    import numpy as np

    from balprune.llm.examples import PRESETS

    cfg = PRESETS[args.model][1]
    args.out.mkdir(parents=True, exist_ok=True)
    folder = args.out / args.model
    if not (folder / "config.json").exists():
        cmd = [sys.executable, "-m", "balprune", "example", args.model, "-o", str(folder), "--force"]
        print("$ " + shlex.join(cmd), flush=True)
        subprocess.run(cmd, check=True, env=_env())
    calib = args.out / "calib.npy"
    rng = np.random.default_rng(0)
    np.save(calib, rng.integers(0, cfg.vocab_size, size=2 * args.samples * args.seq_len, dtype=np.int64))
    tag = f"{args.model}-{args.criterion}-{args.device}"
    report = args.out / f"{tag}.peak.json"
    prune_args = ["prune", str(folder), "--criterion", args.criterion, "--calibration", str(calib),
                  "--samples", str(args.samples), "--seq-len", str(args.seq_len), "--blocks", "32",
                  "--sparsity", "0.5", "--device", args.device, "-o", str(args.out / f"{tag}.safetensors"),
                  "--force", "--json"]
    cmd = [sys.executable, str(Path(__file__).resolve()), "--out", str(args.out), "--child-report", str(report),
           "--", *prune_args]
    print("$ balprune " + shlex.join(prune_args), flush=True)
    t0 = time.perf_counter()
    p = subprocess.run(cmd, env=_env(), stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        print(f"prune failed (rc {p.returncode})", file=sys.stderr)
        return 1
    peak = json.loads(report.read_text())
    result = {"model": args.model, "criterion": args.criterion, "device": args.device, "samples": args.samples,
              "seq_len": args.seq_len, "wall_s": round(wall, 1), **peak, **budget_bytes(cfg, args.samples, args.seq_len)}
    limit = TIME_TARGETS.get((args.model, args.device))
    lines = [f"{tag}: {wall:.1f} s wall" + ("" if limit is None else
                                            f" (target <= {limit:.0f} s: {'PASS' if wall <= limit else 'MISS'})"),
             f"  peak resident memory {peak['max_rss_bytes'] / 2**20:.0f} MiB"]
    if "cuda_max_allocated_bytes" in peak:
        used, budget = peak["cuda_max_allocated_bytes"], result["budget_bytes"]
        result["device_peak_within_budget"] = used <= budget
        lines.append(f"  peak device memory {used / 2**20:.0f} MiB; budget 2 layers + activations "
                     f"{budget / 2**20:.0f} MiB ({'PASS' if used <= budget else 'MISS'})")
    print("\n".join(lines))
    (args.out / f"{tag}.json").write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
