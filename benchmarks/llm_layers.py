#!/usr/bin/env python3
"""Issue 15: one Llama decoder layer (its seven linears), balanced-sparse against dense cuBLAS.

Run on the GPU machine, from the repository root:

    PYTHONPATH=src python3 benchmarks/llm_layers.py --out bench-out/llm-layers

(add ``--index bitmask`` (or offsets, auto) to forward ``--index`` to ``balprune prune``; ``--models 8b``,
``--dtypes float16``, ``--configs 50,2:4``, ``--batch 1,4,16`` narrow the run; ``--dry-run`` prints the
commands without running them; ``--summarize-only`` re-reads the reports already in --out.)

What it does, for each model (``8b``: Llama-3-8B, ``1b``: Llama-3.2-1B) and dtype (float16, bfloat16):

1. writes the decoder layer 0 checkpoint under --workdir (default a temp dir) as
   ``<model>.layer0.<dtype>.safetensors``: HF names (``model.layers.0.self_attn.q_proj.weight`` ...
   ``model.layers.0.mlp.down_proj.weight``), [out, in] shapes, weights N(0, 0.02) from a seeded torch
   generator (the fp16 and bf16 files round the same float32 draws);
2. prunes it balanced with 32 blocks per row at 50/70/80% (``--blocks 32 --sparsity 0.5``) and with
   ``--nm 2:4`` and ``--nm 4:8``: ``python3 -m balprune prune CKPT ... -o PACKED --force --json``;
3. benchmarks every packed file: ``python3 -m balprune bench PACKED --batch 1,4,16 --graph --cold
   --no-peers --json OUT/bench-<model>-<dtype>-<config>.json`` (``--no-peers``: only balprune's
   kernel, dense cuBLAS and the plain read are timed, the three this summary reads; ``--peers`` keeps
   CSR / BSR / 2:4; ``--mode hot|both`` instead of cold).

Then it prints, and writes to OUT/summary.json and OUT/table.txt:

* per model, dtype, config and batch, the sum over the seven linears of the runtime's path (per layer
  the faster of balprune's balanced kernel and dense, as ``bench`` selects it: the report's
  ``selection``) against the sum of dense cuBLAS, and ``x dense`` = dense / path, with CUDA graph
  replay; beside it the eager ratio, the balanced kernel's own sum and ratio (every layer on the
  kernel), and how many layers the runtime sent to dense;
* per layer at batch 1 (graph), the balanced kernel's fraction of the same run's plain read of its own
  bytes (stream time / kernel time), flagged ``!`` where the layer moves >= 8 MB and is below 90%;
* each packed file's size as % of the dense checkpoint of the same dtype, and the achieved sparsity;
* the issue's targets beside the measured figures, PASS/MISS: Llama-3-8B, batch 1, graph: >= 1.5x at
  50% and 2:4, >= 2.2x at 70%, >= 2.7x at 80%; batch 4 at least 90% of the batch-1 ratio; batch 16
  never slower than dense; Llama-3.2-1B faster than dense at every config, batch 1; files (fp16): 50% and
  2:4 <= 57% of the dense bytes, 80% <= 27%.

Only the standard library, torch and safetensors are imported; balprune runs as ``python3 -m balprune``
subprocesses (with this checkout's src/ on PYTHONPATH). The aggregation functions are pure (dicts in,
dicts out) and tested on the CPU by tests/test_llm_layers_bench.py.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

#: The seven linears of a decoder layer, in order: short name -> HF tensor name suffix.
LINEARS = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.o_proj",
           "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj"}


def _shapes(hidden: int, kv: int, inter: int) -> dict[str, tuple[int, int]]:
    return {"q": (hidden, hidden), "k": (kv, hidden), "v": (kv, hidden), "o": (hidden, hidden),
            "gate": (inter, hidden), "up": (inter, hidden), "down": (hidden, inter)}


#: [out, in] shapes of each model's linears (Llama-3-8B: hidden 4096, 8 KV heads of 128, intermediate 14336).
MODELS = {"8b": ("Llama-3-8B", _shapes(4096, 1024, 14336)),
          "1b": ("Llama-3.2-1B", _shapes(2048, 512, 8192))}
DTYPES = {"float16": "F16", "bfloat16": "BF16"}  # CLI name -> the bench report's dtype code
STD = 0.02
BLOCKS = 32
STREAM_FLAG_BYTES = 8_000_000  # "8 MB"
STREAM_FLAG_PCT = 90.0

SCHEMA = "balprune.llm-layers/1"


def tensor_name(short: str, layer: int = 0) -> str:
    return f"model.layers.{layer}.{LINEARS[short]}.weight"


# ----------------------------------------------------------------------------------------------- configs

@dataclass(frozen=True)
class Config:
    """One pruning configuration: its label ("50%", "2:4"), file tag and `balprune prune` options."""

    label: str
    tag: str
    prune_args: tuple[str, ...]
    sparsity: float  # requested


def parse_config(text: str) -> Config:
    """'50' / '50%' / '0.5' -> balanced 32 blocks at 50%; 'N:M' -> --nm N:M."""
    s = text.strip().rstrip("%")
    if ":" in s:
        n, m = (int(p) for p in s.split(":"))
        if not 0 < n < m:
            raise argparse.ArgumentTypeError(f"bad N:M {text!r}")
        return Config(f"{n}:{m}", f"nm{n}-{m}", ("--nm", f"{n}:{m}"), 1 - n / m)
    v = float(s)
    frac = v / 100 if v >= 1 else v
    if not 0 < frac < 1:
        raise argparse.ArgumentTypeError(f"bad sparsity {text!r}")
    pct = round(frac * 100, 4)
    label = f"{pct:g}%"
    return Config(label, f"b{BLOCKS}-s{pct:g}", ("--blocks", str(BLOCKS), "--sparsity", f"{round(frac, 6):g}"), frac)


def _csv(text: str) -> list[str]:
    items = [s.strip() for s in text.split(",") if s.strip()]
    if not items:
        raise argparse.ArgumentTypeError(f"empty list {text!r}")
    return items


# ------------------------------------------------------------------------------------------- aggregation

def _finite(m: dict | None) -> bool:
    return m is not None and bool(m.get("correct", True)) and isinstance(m.get("median_us"), (int, float)) \
        and math.isfinite(m["median_us"]) and m["median_us"] > 0


def index_measurements(report: dict) -> dict[tuple, dict]:
    """(layer, batch, mode, graph, kernel) -> measurement. One report holds one dtype (one packed file)."""
    return {(m["layer"], m["batch"], m["mode"], m["graph"], m["kernel"]): m for m in report["measurements"]}


def runtime_path(report: dict, ms: dict[tuple, dict], layer: str, batch: int, mode: str, graph: bool
                 ) -> tuple[str, float] | None:
    """The runtime's path for one layer row and its time: the report's ``selection`` entry where it has
    one (schema /2), else the same rule computed here (bench.report.rows): the faster of the subject
    kernel (balanced) and dense among the measurements that passed their gate. None: neither timed."""
    for s in report.get("selection") or ():
        if (s["layer"], s["batch"], s["mode"], s["graph"]) == (layer, batch, mode, graph):
            if s.get("path") is None or not isinstance(s.get("path_us"), (int, float)):
                return None
            return s["path"], float(s["path_us"])
    own = [ms.get((layer, batch, mode, graph, k)) for k in ("balanced", "dense")]
    own = [m for m in own if _finite(m)]
    if not own:
        return None
    best = min(own, key=lambda m: m["median_us"])
    return best["kernel"], float(best["median_us"])


def _us(ms, layer, batch, mode, graph, kernel) -> float | None:
    m = ms.get((layer, batch, mode, graph, kernel))
    return float(m["median_us"]) if _finite(m) else None


def layer_sums(report: dict, layers: list[str], batch: int, mode: str, graph: bool) -> dict:
    """Sums over ``layers`` (the seven linears' tensor names) at one batch, mode and graph flag.

    dense_us: dense cuBLAS; path_us: the runtime's path (runtime_path); kernel_us: the balanced kernel on
    every layer; ratio = dense_us / path_us, kernel_ratio = dense_us / kernel_us (None where a term is
    missing: a layer not in the report, or a kernel that failed its gate and so was not timed).
    on_dense: the layers the runtime sends to dense; missing: what could not be summed, and why."""
    ms = index_measurements(report)
    dense = path = kern = 0.0
    on_dense, missing = [], []
    for name in layers:
        d = _us(ms, name, batch, mode, graph, "dense")
        b = _us(ms, name, batch, mode, graph, "balanced")
        p = runtime_path(report, ms, name, batch, mode, graph)
        if d is None:
            missing.append(f"{name}: no timed dense")
            dense = math.nan
        else:
            dense += d
        if b is None:
            missing.append(f"{name}: no timed balanced kernel")
            kern = math.nan
        else:
            kern += b
        if p is None:
            missing.append(f"{name}: no runtime path")
            path = math.nan
        else:
            path += p[1]
            if p[0] != "balanced":
                on_dense.append(name)

    def ok(x: float) -> float | None:
        return x if math.isfinite(x) else None

    dense, path, kern = ok(dense), ok(path), ok(kern)
    return {"batch": batch, "mode": mode, "graph": graph, "dense_us": dense, "path_us": path, "kernel_us": kern,
            "ratio": dense / path if dense and path else None,
            "kernel_ratio": dense / kern if dense and kern else None,
            "on_dense": on_dense, "missing": missing}


def stream_fractions(report: dict, layers: list[str], mode: str, graph: bool, batch: int = 1) -> list[dict]:
    """Per layer: the balanced kernel's time against the same run's plain read of the bytes it moves
    (kernel "stream", same layer/batch/mode/graph): pct = 100 * stream_us / balanced_us. flag: the kernel
    moves >= STREAM_FLAG_BYTES and reaches less than STREAM_FLAG_PCT of the plain read."""
    ms = index_measurements(report)
    out = []
    for name in layers:
        b = ms.get((name, batch, mode, graph, "balanced"))
        s = _us(ms, name, batch, mode, graph, "stream")
        bu = float(b["median_us"]) if _finite(b) else None
        pct = 100.0 * s / bu if s and bu else None
        nbytes = int(b["bytes"]) if b is not None else None
        out.append({"layer": name, "bytes": nbytes, "balanced_us": bu, "stream_us": s, "pct": pct,
                    "flag": bool(pct is not None and nbytes is not None and nbytes >= STREAM_FLAG_BYTES
                                 and pct < STREAM_FLAG_PCT)})
    return out


def summarize_report(report: dict, layers: list[str], batches: list[int]) -> dict:
    """Everything the table needs from one bench report: sums per (mode, graph, batch), stream fractions
    at batch 1 per (mode, graph). Keys "cold/graph", "hot/eager", ... for the combinations present."""
    combos = sorted({(m["mode"], bool(m["graph"])) for m in report["measurements"]})
    sums, stream = {}, {}
    for mode, graph in combos:
        key = f"{mode}/{'graph' if graph else 'eager'}"
        sums[key] = {str(b): layer_sums(report, layers, b, mode, graph) for b in batches}
        stream[key] = stream_fractions(report, layers, mode, graph, batch=min(batches))
    return {"sums": sums, "stream": stream, "index": index_encodings(report), "device": report.get("device", {}),
            "read_bandwidth_gbps": report.get("read_bandwidth_gbps"),
            "unavailable": report.get("unavailable", [])}


def index_encodings(report: dict) -> list[str]:
    """The index encodings the balanced kernel ran with, from its measurements' notes ("bitmask indices";
    bench writes them from the concurrent index-encoding work on; empty for older reports)."""
    found = set()
    for m in report["measurements"]:
        first = (m.get("note") or "").split(";")[0].strip()
        if m["kernel"] == "balanced" and first.endswith(" indices"):
            found.add(first[: -len(" indices")])
    return sorted(found)


def _ratio(result: dict, key: str, batch: int) -> float | None:
    s = (result.get("bench") or {}).get("sums", {}).get(key, {}).get(str(batch))
    return s["ratio"] if s else None


def _check(target: str, measured: float | None, ok: bool | None, shown: str) -> dict:
    return {"target": target, "measured": measured, "shown": shown,
            "verdict": "MISS" if not ok else "PASS"}


#: Llama-3-8B, batch 1, graph: minimum dense / path ratio per config label.
TARGET_8B_B1 = {"50%": 1.5, "2:4": 1.5, "70%": 2.2, "80%": 2.7}
#: Packed file size as % of the dense checkpoint (float16) per config label.
TARGET_FILE_PCT = {"50%": 57.0, "2:4": 57.0, "80%": 27.0}


def evaluate_targets(results: list[dict], key: str = "cold/graph") -> list[dict]:
    """The issue's targets against ``results`` (one dict per model, dtype, config: "model", "dtype",
    "config", "bench" = summarize_report(...) or None, "file_pct" = packed / dense file bytes in %).
    Batch-4 and batch-16 targets are the 8B's; a result without the figure is a MISS ("n/a")."""
    out = []

    def fmt(x, unit="x"):
        return "n/a" if x is None else (f"{x:.2f}x" if unit == "x" else f"{x:.1f}%")

    for r in results:
        who = f"{MODELS[r['model']][0]} {r['dtype']} {r['config']}"
        r1, r4, r16 = (_ratio(r, key, b) for b in (1, 4, 16))
        if r["model"] == "8b":
            if r["config"] in TARGET_8B_B1:
                t = TARGET_8B_B1[r["config"]]
                out.append(_check(f"{who}: batch 1 >= {t}x dense", r1, r1 is not None and r1 >= t, fmt(r1)))
            if _has_batch(r, key, 4):
                ok = r1 is not None and r4 is not None and r4 >= 0.9 * r1
                out.append(_check(f"{who}: batch 4 ratio >= 90% of batch 1's ({fmt(r1)})", r4, ok, fmt(r4)))
            if _has_batch(r, key, 16):
                out.append(_check(f"{who}: batch 16 not slower than dense (>= 1.00x)", r16,
                                  r16 is not None and r16 >= 1.0, fmt(r16)))
        elif r["model"] == "1b":
            out.append(_check(f"{who}: batch 1 faster than dense (> 1.00x)", r1, r1 is not None and r1 > 1.0, fmt(r1)))
        if r["dtype"] == "float16" and r["config"] in TARGET_FILE_PCT:
            t = TARGET_FILE_PCT[r["config"]]
            p = r.get("file_pct")
            out.append(_check(f"{who}: file <= {t:g}% of dense", p, p is not None and p <= t, fmt(p, "%")))
    return out


def _has_batch(r: dict, key: str, batch: int) -> bool:
    return str(batch) in ((r.get("bench") or {}).get("sums", {}).get(key, {}))


# ------------------------------------------------------------------------------------------------ table

def _f(x: float | None, spec: str, width: int) -> str:
    return f"{'-':>{width}}" if x is None else f"{x:{width}{spec}}"


def render(results: list[dict], targets: list[dict], key: str, batches: list[int]) -> str:
    """The printed summary (plain text, fixed columns)."""
    mode, g = key.split("/")
    eager_key = f"{mode}/eager"
    lines = []
    for model in dict.fromkeys(r["model"] for r in results):
        name, _ = MODELS[model]
        rs = [r for r in results if r["model"] == model]
        lines += ["", f"== {name} decoder layer: sum of the 7 linears (q k v o gate up down), {mode}, "
                      f"{'CUDA graph' if g == 'graph' else 'eager'} ==",
                  f"{'dtype':<9} {'config':<6} {'batch':>5} {'dense us':>9} {'path us':>9} {'x dense':>8} "
                  f"{'eager x':>8} {'kernel us':>9} {'kernel x':>8} {'on dense':>8}  note"]
        for r in rs:
            sums = (r.get("bench") or {}).get("sums", {})
            if r.get("bench") is None:
                lines.append(f"{r['dtype']:<9} {r['config']:<6} {'-':>5}  no report ({r.get('error') or 'missing'})")
                continue
            for b in batches:
                s = sums.get(key, {}).get(str(b))
                e = sums.get(eager_key, {}).get(str(b))
                if s is None:
                    lines.append(f"{r['dtype']:<9} {r['config']:<6} {b:>5}  not in the report")
                    continue
                note = "; ".join(([r["error"]] if r.get("error") else []) + s["missing"][:2]) \
                    + (" ..." if len(s["missing"]) > 2 else "")
                lines.append(f"{r['dtype']:<9} {r['config']:<6} {b:>5} {_f(s['dense_us'], '.1f', 9)} "
                             f"{_f(s['path_us'], '.1f', 9)} {_f(s['ratio'], '.2f', 8)} "
                             f"{_f(e['ratio'] if e else None, '.2f', 8)} {_f(s['kernel_us'], '.1f', 9)} "
                             f"{_f(s['kernel_ratio'], '.2f', 8)} {len(s['on_dense']):>6}/{len(LINEARS)}  {note}")
        b1 = min(batches)
        lines += ["", f"{name}: balanced kernel as % of the same run's plain read of its bytes, batch {b1}, "
                      f"{mode}, {g} (! = moves >= {STREAM_FLAG_BYTES / 1e6:g} MB and below {STREAM_FLAG_PCT:g}%)",
                  f"{'dtype':<9} {'config':<6} " + " ".join(f"{k:>7}" for k in LINEARS)]
        for r in rs:
            fr = {x["layer"]: x for x in ((r.get("bench") or {}).get("stream", {}).get(key) or [])}
            cells = []
            for short in LINEARS:
                x = fr.get(tensor_name(short))
                cells.append(f"{'-':>7}" if not x or x["pct"] is None else f"{x['pct']:6.0f}{'!' if x['flag'] else '%'}")
            lines.append(f"{r['dtype']:<9} {r['config']:<6} " + " ".join(cells))
        lines += ["", f"{name}: packed file size against the dense checkpoint of the same dtype",
                  f"{'dtype':<9} {'config':<6} {'dense MB':>9} {'packed MB':>9} {'% dense':>8} {'sparsity':>9}  index"]
        for r in rs:
            sp = r.get("sparsity_achieved")
            lines.append(f"{r['dtype']:<9} {r['config']:<6} {_f(_mb(r.get('dense_file_bytes')), '.1f', 9)} "
                         f"{_f(_mb(r.get('packed_file_bytes')), '.1f', 9)} {_f(r.get('file_pct'), '.1f', 8)} "
                         f"{_f(100 * sp if sp is not None else None, '.1f', 8)}%  "
                         f"{','.join((r.get('bench') or {}).get('index') or []) or '-'}")
    lines += ["", f"Targets of issue 15 ({mode}, {g})", f"{'measured':>9}  verdict  target"]
    for t in targets:
        lines.append(f"{t['shown']:>9}  {t['verdict']:<7}  {t['target']}")
    n_miss = sum(t["verdict"] == "MISS" for t in targets)
    lines.append(f"{len(targets) - n_miss} of {len(targets)} targets met")
    return "\n".join(lines) + "\n"


def _mb(x: int | None) -> float | None:
    return None if x is None else x / 1e6


# ------------------------------------------------------------------------------------------------ plan

@dataclass
class Job:
    """One (model, dtype, config): its files and the two balprune commands."""

    model: str
    dtype: str
    config: Config
    dense: Path
    packed: Path
    prune: list[str]
    prune_json: Path
    bench: list[str]
    bench_json: Path
    bench_txt: Path
    files_json: Path

    @property
    def stem(self) -> str:
        return f"{self.model}-{self.dtype}-{self.config.tag}"


def dense_path(workdir: Path, model: str, dtype: str) -> Path:
    return workdir / f"{model}.layer0.{dtype}.safetensors"


def plan(args: argparse.Namespace) -> list[Job]:
    """The jobs in run order (model, dtype, config), with their exact command lines."""
    bp = [sys.executable, "-m", "balprune"]
    batch = ",".join(str(b) for b in args.batch)
    bench_mode = {"cold": ["--cold"], "hot": ["--hot"], "both": []}[args.mode]
    jobs = []
    for model in args.models:
        for dtype in args.dtypes:
            dense = dense_path(args.workdir, model, dtype)
            for cfg in args.configs:
                stem = f"{model}-{dtype}-{cfg.tag}"
                packed = args.workdir / f"{model}.layer0.{dtype}.{cfg.tag}.safetensors"
                prune = [*bp, "prune", str(dense), *cfg.prune_args]
                if args.index is not None:
                    prune += ["--index", args.index]
                prune += ["-o", str(packed), "--force", "--json"]
                bench = [*bp, "bench", str(packed), "--batch", batch, "--graph", *bench_mode]
                if not args.peers:
                    bench.append("--no-peers")
                if args.iters is not None:
                    bench += ["--iters", str(args.iters)]
                bench += ["--json", str(args.out / f"bench-{stem}.json")]
                jobs.append(Job(model, dtype, cfg, dense, packed, prune, args.out / f"prune-{stem}.json", bench,
                                args.out / f"bench-{stem}.json", args.out / f"bench-{stem}.txt",
                                args.out / f"files-{stem}.json"))
    return jobs


# ------------------------------------------------------------------------------------------------- work

def write_checkpoint(workdir: Path, model: str, dtypes: list[str], seed: int) -> dict[str, Path]:
    """Write the layer-0 checkpoint of ``model`` in each dtype (same float32 draws, rounded); returns the paths."""
    import torch
    from safetensors.torch import save_file

    _, shapes = MODELS[model]
    tensors: dict[str, dict[str, torch.Tensor]] = {d: {} for d in dtypes}
    for i, (short, shape) in enumerate(shapes.items()):
        g = torch.Generator().manual_seed(seed * 1000 + i)
        w = torch.randn(shape, generator=g, dtype=torch.float32).mul_(STD)
        for d in dtypes:
            tensors[d][tensor_name(short)] = w.to(getattr(torch, d)).contiguous()
        del w
    paths = {}
    for d in dtypes:
        p = dense_path(workdir, model, d)
        save_file(tensors[d], str(p), metadata={"format": "pt"})
        paths[d] = p
        tensors[d].clear()
    return paths


def _env() -> dict[str, str]:
    src = str(REPO / "src")
    pp = os.environ.get("PYTHONPATH", "")
    return dict(os.environ, PYTHONPATH=src + (os.pathsep + pp if pp else ""), PYTHONUNBUFFERED="1", COLUMNS="200")


def _run(argv: list[str], stdout: Path, stderr: Path) -> tuple[int, float]:
    t0 = time.perf_counter()
    with open(stdout, "wb") as out, open(stderr, "wb") as err:
        rc = subprocess.run(argv, stdout=out, stderr=err, env=_env()).returncode
    return rc, time.perf_counter() - t0


def run_job(job: Job) -> None:
    """Prune and bench one job; records file sizes and exit codes in job.files_json."""
    rc, secs = _run(job.prune, job.prune_json, job.prune_json.with_suffix(".err"))
    info: dict = {"prune_rc": rc, "prune_s": round(secs, 1), "prune_cmd": shlex.join(job.prune),
                  "dense_file_bytes": job.dense.stat().st_size}
    print(f"prune {job.stem}: rc={rc} ({secs:.0f} s)", flush=True)
    if rc == 0:
        info["packed_file_bytes"] = job.packed.stat().st_size
        rc, secs = _run(job.bench, job.bench_txt, job.bench_txt.with_suffix(".err"))
        info.update(bench_rc=rc, bench_s=round(secs, 1), bench_cmd=shlex.join(job.bench))
        print(f"bench {job.stem}: rc={rc} ({secs:.0f} s)", flush=True)
    job.files_json.write_text(json.dumps(info, indent=2) + "\n")


def collect(job: Job, batches: list[int]) -> dict:
    """One result row from the files a job left in --out (missing pieces become None and an error)."""
    layers = [tensor_name(s) for s in LINEARS]
    r: dict = {"model": job.model, "dtype": job.dtype, "config": job.config.label, "bench_json": str(job.bench_json),
               "bench": None, "error": None}
    errors = []
    if job.files_json.exists():
        info = json.loads(job.files_json.read_text())
        r.update({k: info.get(k) for k in ("dense_file_bytes", "packed_file_bytes", "prune_rc", "bench_rc")})
        if info.get("prune_rc"):
            errors.append(f"prune exit {info['prune_rc']}")
        if info.get("bench_rc"):
            errors.append(f"bench exit {info['bench_rc']}")
    d, p = r.get("dense_file_bytes"), r.get("packed_file_bytes")
    r["file_pct"] = 100.0 * p / d if d and p else None
    try:
        pr = json.loads(job.prune_json.read_text())
        r["sparsity_achieved"] = pr.get("sparsity_achieved")
    except (OSError, ValueError):
        r["sparsity_achieved"] = None
    try:
        report = json.loads(job.bench_json.read_text())
    except (OSError, ValueError) as exc:
        errors.append(f"no bench report ({type(exc).__name__})")
    else:
        r["bench"] = summarize_report(report, layers, batches)
    r["error"] = "; ".join(errors) or None
    return r


# ------------------------------------------------------------------------------------------------- main

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("llm-layers-out"),
                    help="results: bench/prune JSON, summary.json, table.txt (default ./llm-layers-out)")
    ap.add_argument("--workdir", type=Path, default=None,
                    help="checkpoints and packed files (default: a temp dir, removed at the end)")
    ap.add_argument("--models", type=_csv, default=["8b", "1b"], help="comma-separated: 8b,1b")
    ap.add_argument("--dtypes", type=_csv, default=["float16", "bfloat16"], help="comma-separated: float16,bfloat16")
    ap.add_argument("--configs", type=lambda t: [parse_config(c) for c in _csv(t)],
                    default=[parse_config(c) for c in ("50", "70", "80", "2:4", "4:8")],
                    help="comma-separated sparsities in %% (balanced, 32 blocks) and N:M (default 50,70,80,2:4,4:8)")
    ap.add_argument("--batch", type=lambda t: [int(x) for x in _csv(t)], default=[1, 4, 16],
                    help="batch sizes for bench (default 1,4,16)")
    ap.add_argument("--index", choices=["auto", "offsets", "bitmask"], default=None,
                    help="forwarded to `balprune prune --index` (not passed when omitted)")
    ap.add_argument("--mode", choices=["cold", "hot", "both"], default="cold",
                    help="bench timings: cold (default; weights rotated through > 4.5x L2), hot, or both "
                         "(the summary then reads cold)")
    ap.add_argument("--peers", action="store_true", help="also time bench's peers (CSR, BSR, 2:4): slower")
    ap.add_argument("--iters", type=int, default=None, help="forwarded to bench --iters")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dry-run", action="store_true", help="print the commands instead of running them")
    ap.add_argument("--summarize-only", action="store_true",
                    help="do not run anything: summarize the reports already in --out")
    args = ap.parse_args(argv)
    for m in args.models:
        if m not in MODELS:
            ap.error(f"--models: unknown {m!r} (known: {', '.join(MODELS)})")
    for d in args.dtypes:
        if d not in DTYPES:
            ap.error(f"--dtypes: unknown {d!r} (known: {', '.join(DTYPES)})")
    if any(b < 1 for b in args.batch):
        ap.error("--batch: sizes must be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    tmp = None
    if args.workdir is None:
        if args.dry_run or args.summarize_only:
            args.workdir = Path(tempfile.gettempdir()) / "balprune-llm-layers"
        else:
            tmp = tempfile.TemporaryDirectory(prefix="balprune-llm-layers-")
            args.workdir = Path(tmp.name)
    jobs = plan(args)
    if args.dry_run:
        for model in args.models:
            for dtype in args.dtypes:
                shapes = MODELS[model][1]
                n = sum(r * c for r, c in shapes.values())
                print(f"# write {dense_path(args.workdir, model, dtype)}: {MODELS[model][0]} layer 0, 7 linears, "
                      f"{n:,} weights, {dtype}, N(0, {STD}), seed {args.seed}")
        for job in jobs:
            print(shlex.join(job.prune) + f" > {shlex.quote(str(job.prune_json))}")
            print(shlex.join(job.bench) + f" > {shlex.quote(str(job.bench_txt))}")
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    try:
        if not args.summarize_only:
            args.workdir.mkdir(parents=True, exist_ok=True)
            for model in args.models:
                print(f"writing {MODELS[model][0]} layer 0 ({', '.join(args.dtypes)}) under {args.workdir}", flush=True)
                write_checkpoint(args.workdir, model, args.dtypes, args.seed)
                for job in (j for j in jobs if j.model == model):
                    run_job(job)
    finally:
        if tmp is not None:
            tmp.cleanup()
    key = f"{'hot' if args.mode == 'hot' else 'cold'}/graph"
    results = [collect(j, args.batch) for j in jobs]
    targets = evaluate_targets(results, key)
    text = render(results, targets, key, args.batch)
    print(text, end="")
    (args.out / "table.txt").write_text(text)
    summary = {"schema": SCHEMA, "key": key, "batches": args.batch, "index": args.index, "seed": args.seed,
               "blocks": BLOCKS, "std": STD, "results": results, "targets": targets}
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2, allow_nan=False) + "\n")
    print(f"wrote {args.out / 'summary.json'} and {args.out / 'table.txt'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
