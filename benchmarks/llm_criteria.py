#!/usr/bin/env python3
"""Issue 17: one-shot LLM pruning criteria x patterns x sparsity on a trained llama-lm (perplexity).

Run from the repository root (CPU is fine; ``--device cuda`` on the GPU machine):

    PYTHONPATH=src python3 benchmarks/llm_criteria.py --out runs/llm-criteria

What it does:

1. trains the dense model of ``--recipe`` (default configs/llama-lm-criteria.toml) into
   ``OUT/dense.pt`` with ``finetune.run.train_dense`` -- the same file and key a ``balprune sweep
   RECIPE --out OUT`` trains and reuses, so the fine-tuned rows start from this very model -- and
   reuses it when it is already there;
2. writes it as an HF folder ``OUT/dense-hf`` (``tasks.llama_lm.export_run``: config.json,
   tokenizer.json, safetensors) and the task's token ids as ``OUT/train.npy`` (calibration) and
   ``OUT/test.npy`` (evaluation);
3. for each criterion (magnitude, wanda, sparsegpt), pattern and sparsity, runs the user's commands:
   ``python3 -m balprune prune OUT/dense-hf --include 'model.layers.*' PATTERN --sparsity S
   [--criterion C --calibration OUT/train.npy --samples 128 --seq-len 128] -o PACKED --json`` and
   ``python3 -m balprune eval PACKED --like OUT/dense-hf --data OUT/test.npy --seq-len 128 --json``;
   each result is kept as ``OUT/results/<label>.json`` and reused on the next run;
4. prints, and writes to OUT/table.md and OUT/summary.json, the perplexity table (rows: pattern and
   sparsity; columns: criteria) with the dense model's, and the issue's targets PASS/MISS:
   balanced block length 32 with wanda or sparsegpt within 3% of per-row wanda at 50% and within 6%
   at 60%; at 50% the published ordering 2:4 > 4:8 > balanced-32 (perplexity) for each calibrated
   criterion; wanda and sparsegpt below magnitude at every pattern and sparsity.

Patterns (``--patterns``): ``per-row`` (balanced with one block per row: Wanda's own "unstructured",
which compares weights within an output row), ``b32`` (32 blocks per row), ``l32`` (block length
32), ``4:8``, ``2:4`` (50% only), ``block8x8`` (8 x 8 tiles). Only the decoder layers' linears are
pruned (``--include 'model.layers.*'``); the embedding, the head and the norms stay dense, as LLM
pruning leaves them.

The aggregation functions are pure (dicts in, dicts out) and tested on the CPU by
tests/test_llm_criteria_bench.py.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CRITERIA = ("magnitude", "wanda", "sparsegpt")
#: pattern label -> the prune options that select it (sparsity added per run; N:M fixes its own).
PATTERNS: dict[str, tuple[str, ...]] = {
    "per-row": ("--blocks", "1"),
    "b32": ("--blocks", "32"),
    "l32": ("--block-size", "32"),
    "4:8": ("--nm", "4:8"),
    "2:4": ("--nm", "2:4"),
    "block8x8": ("--pattern", "block", "--block-shape", "8x8"),
}
NM_SPARSITY = {"4:8": 0.5, "2:4": 0.5}


@dataclass(frozen=True)
class Job:
    criterion: str
    pattern: str
    sparsity: float

    @property
    def label(self) -> str:
        return f"{self.criterion}-{self.pattern.replace(':', 'of')}-s{round(self.sparsity * 100)}"


def plan(criteria: list[str], patterns: list[str], sparsities: list[float]) -> list[Job]:
    """Every (criterion, pattern, sparsity) to run; an N:M pattern only at its own sparsity."""
    jobs = []
    for c in criteria:
        for p in patterns:
            for s in sparsities:
                if p in NM_SPARSITY and not math.isclose(s, NM_SPARSITY[p]):
                    continue
                jobs.append(Job(c, p, s))
    return jobs


def prune_command(job: Job, folder: Path, calibration: Path, packed: Path, samples: int, seq_len: int) -> list[str]:
    cmd = [sys.executable, "-m", "balprune", "prune", str(folder), "--include", "model.layers.*",
           *PATTERNS[job.pattern]]
    if job.pattern not in NM_SPARSITY:
        cmd += ["--sparsity", f"{job.sparsity:g}"]
    if job.criterion != "magnitude":
        cmd += ["--criterion", job.criterion, "--calibration", str(calibration), "--samples", str(samples),
                "--seq-len", str(seq_len)]
    return cmd + ["-o", str(packed), "--force", "--json"]


def eval_command(model: Path, like: Path | None, data: Path, seq_len: int, device: str) -> list[str]:
    cmd = [sys.executable, "-m", "balprune", "eval", str(model), "--data", str(data), "--seq-len", str(seq_len),
           "--device", device, "--json"]
    return cmd + (["--like", str(like)] if like is not None else [])


# ---------------------------------------------------------------- aggregation (pure, tested on CPU)

def table(results: dict[str, dict], jobs: list[Job]) -> dict[tuple[str, float], dict[str, float]]:
    """{(pattern, sparsity): {criterion: perplexity}} from {label: eval JSON}."""
    rows: dict[tuple[str, float], dict[str, float]] = {}
    for j in jobs:
        r = results.get(j.label)
        if r is not None:
            rows.setdefault((j.pattern, j.sparsity), {})[j.criterion] = float(r["perplexity"])
    return rows


def _rel(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a / b - 1.0


def evaluate_targets(rows: dict[tuple[str, float], dict[str, float]]) -> list[dict]:
    """The issue's accuracy targets against the table; a target whose cells are missing is 'n/a'."""
    out = []

    def check(name: str, measured: str, ok: bool | None) -> None:
        out.append({"target": name, "measured": measured, "status": "n/a" if ok is None else ("PASS" if ok else "MISS")})

    for s, limit in ((0.5, 0.03), (0.6, 0.06)):
        ref = rows.get(("per-row", s), {}).get("wanda")
        for c in ("wanda", "sparsegpt"):
            d = _rel(rows.get(("l32", s), {}).get(c), ref)
            check(f"l32 {c} within {limit:.0%} of per-row wanda at {s:.0%}",
                  "n/a" if d is None else f"{d:+.2%}", None if d is None else d <= limit)
    for c in CRITERIA:
        a, b, d = (rows.get((p, 0.5), {}).get(c) for p in ("2:4", "4:8", "l32"))
        ok = None if None in (a, b, d) else a > b > d
        shown = "n/a" if ok is None else f"2:4 {a:.2f} > 4:8 {b:.2f} > l32 {d:.2f}"
        check(f"{c}: 2:4 worse than 4:8 worse than balanced-32 at 50%", shown, ok)
    ahead = [(key, row) for key, row in sorted(rows.items()) if "magnitude" in row]
    for c in ("wanda", "sparsegpt"):
        pairs = [(row[c], row["magnitude"], key) for key, row in ahead if c in row]
        if not pairs:
            check(f"{c} ahead of magnitude everywhere", "n/a", None)
            continue
        worst = max(pairs, key=lambda t: t[0] / t[1])
        check(f"{c} ahead of magnitude everywhere",
              f"{len([p for p in pairs if p[0] < p[1]])}/{len(pairs)} cells; closest {worst[2][0]} "
              f"{worst[2][1]:.0%}: {worst[0]:.2f} vs {worst[1]:.2f}", all(p[0] < p[1] for p in pairs))
    return out


def render(rows: dict[tuple[str, float], dict[str, float]], dense: float | None, targets: list[dict],
           criteria: list[str]) -> str:
    lines = [f"dense perplexity: {dense:.3f}" if dense is not None else "dense perplexity: n/a", "",
             "| pattern | sparsity | " + " | ".join(criteria) + " |", "|---|---:|" + "---:|" * len(criteria)]
    order = {p: i for i, p in enumerate(PATTERNS)}
    for (p, s), row in sorted(rows.items(), key=lambda kv: (kv[0][1], order.get(kv[0][0], 99))):
        cells = [f"{row[c]:.3f}" if c in row else "" for c in criteria]
        lines.append(f"| {p} | {s:.0%} | " + " | ".join(cells) + " |")
    lines += ["", "| target | measured | status |", "|---|---|---|"]
    lines += [f"| {t['target']} | {t['measured']} | {t['status']} |" for t in targets]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- running

def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO / "src"), env.get("PYTHONPATH")]))
    return env


def _run_json(cmd: list[str], log) -> dict:
    print("$ " + shlex.join(cmd), file=log, flush=True)
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, env=_env())
    print(f"  ({time.perf_counter() - t0:.1f} s, rc {p.returncode})", file=log, flush=True)
    if p.returncode != 0:
        raise SystemExit(f"command failed (rc {p.returncode}): {shlex.join(cmd)}\n{p.stderr[-2000:]}")
    return json.loads(p.stdout)


def prepare(args: argparse.Namespace) -> tuple[Path, Path, Path, int]:
    """Dense model, HF folder, token files: (folder, train.npy, test.npy, seq_len)."""
    sys.path.insert(0, str(REPO / "src"))
    import numpy as np

    from balprune.finetune.recipe import load_recipe
    from balprune.finetune.run import train_dense
    from balprune.tasks import make_task
    from balprune.tasks.llama_lm import export_run

    out = args.out
    recipe = load_recipe(args.recipe)
    task = make_task(recipe.task, recipe.task_options, None)
    t0 = time.perf_counter()

    def progress(e):
        if e.step % 100 == 0 or e.step == e.stage_steps:
            print(f"dense step {e.step}/{e.stage_steps} loss {e.loss:.3f} ({time.perf_counter() - t0:.0f} s)", flush=True)

    history = train_dense(recipe, out / "dense.pt", task=task, device=args.device, progress=progress)
    print(f"dense model: {json.dumps(history[-1].metrics)}", flush=True)
    folder = export_run(args.recipe, out / "dense.pt", out / "dense-hf", force=True)
    np.save(out / "train.npy", task.ids["train"].numpy())
    np.save(out / "test.npy", task.ids["test"].numpy())
    return Path(folder), out / "train.npy", out / "test.npy", int(recipe.task_options["seq_len"])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--recipe", type=Path, default=REPO / "configs" / "llama-lm-criteria.toml")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--criteria", default=",".join(CRITERIA))
    ap.add_argument("--patterns", default=",".join(PATTERNS))
    ap.add_argument("--sparsities", default="0.5,0.6,0.7")
    ap.add_argument("--samples", type=int, default=128)
    args = ap.parse_args(argv)
    criteria = [c for c in args.criteria.split(",") if c]
    patterns = [p for p in args.patterns.split(",") if p]
    for p in patterns:
        if p not in PATTERNS:
            ap.error(f"unknown pattern {p!r} (one of {', '.join(PATTERNS)})")
    sparsities = [float(s) for s in args.sparsities.split(",") if s]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results").mkdir(exist_ok=True)
    (args.out / "packed").mkdir(exist_ok=True)
    folder, train_ids, test_ids, seq_len = prepare(args)
    log = sys.stdout
    dense_file = args.out / "results" / "dense.json"
    if not dense_file.exists():
        dense_file.write_text(json.dumps(_run_json(eval_command(folder, None, test_ids, seq_len, args.device), log)))
    dense = json.loads(dense_file.read_text())["perplexity"]
    results = {}
    jobs = plan(criteria, patterns, sparsities)
    for i, job in enumerate(jobs):
        res = args.out / "results" / f"{job.label}.json"
        if not res.exists():
            packed = args.out / "packed" / f"{job.label}.safetensors"
            print(f"[{i + 1}/{len(jobs)}] {job.label}", flush=True)
            report = _run_json(prune_command(job, folder, train_ids, packed, args.samples, seq_len), log)
            ev = _run_json(eval_command(packed, folder, test_ids, seq_len, args.device), log)
            ev["prune"] = {k: report.get(k) for k in ("sparsity", "notes") if k in report}
            res.write_text(json.dumps(ev, indent=2))
            packed.unlink()  # the table needs the perplexity, not 42 packed files
        results[job.label] = json.loads(res.read_text())
    rows = table(results, jobs)
    targets = evaluate_targets(rows)
    text = render(rows, dense, targets, criteria)
    print(text)
    (args.out / "table.md").write_text(text)
    summary = {"dense_perplexity": dense, "samples": args.samples, "seq_len": seq_len,
               "rows": [{"pattern": p, "sparsity": s, **row} for (p, s), row in sorted(rows.items())],
               "targets": targets}
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
