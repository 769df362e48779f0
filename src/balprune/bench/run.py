"""``balprune bench``: per-layer batch-1/batch-N latency of a packed file against its peers.

For each pruned layer and batch size, in one process on one GPU: the candidates of bench.peers
(balprune's kernel for the layer's pattern, dense cuBLAS, cuSPARSE CSR, block-sparse and 2:4
peers, and a plain streaming read of the same bytes), each gated against float64 first (a
failing kernel is reported and not timed), then timed cold (weight copies totalling > 4.5x L2,
rotated) and/or hot, eagerly and optionally replayed from a CUDA graph, by the one timing
function (bench.timing.Timer). The device's read bandwidth is measured in the same run; every
measurement carries its bytes, GB/s and % of that figure.

The runtime's path for a layer is the faster of balprune's own paths (its sparse kernel, or dense
cuBLAS where the SIMT kernel loses: large batches, small layers) in the same conditions:
``rows()`` reports both and which one was chosen, so a slowdown is never reported as the result.
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Callable
from pathlib import Path

import torch

from ..errors import GpuRuntimeError
from ..formats.packed_file import read_packed
from .peers import OWN_PATHS, SUBJECT, Candidate, candidates
from .report import BenchReport, Measurement
from .timing import Timer, Timing, copies_for

#: Relative (norm) error a kernel may show against the float64 reference, per storage dtype.
GATE_REL_ERROR = {"F32": 1e-5, "F16": 2e-3, "BF16": 1.6e-2}
_TORCH = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}

Progress = Callable[[str], None]


def _rel_error(y: torch.Tensor, ref: torch.Tensor) -> float:
    y64 = y.to(torch.float64).reshape(ref.shape)
    if not bool(torch.isfinite(y64).all()):
        return float("inf")
    return float(torch.linalg.norm(y64 - ref) / max(float(torch.linalg.norm(ref)), 1e-300))


#: cudaDeviceAttr codes of the rated SM and memory clocks (kHz).
_CLOCK_ATTRS = {"sm_clock_max_khz": 13, "memory_clock_max_khz": 36}


def device_facts(timer: Timer) -> dict:
    """The report's device block: name, SMs, L2, CUDA / driver / CuPy / torch versions, clocks if readable."""
    import cupy as cp

    info = timer.info
    facts = {"name": info.name, "compute_capability": info.compute_capability,
             "multiprocessors": info.multiprocessors, "l2_bytes": info.l2_bytes,
             "cuda_runtime": cp.cuda.runtime.runtimeGetVersion(), "driver": cp.cuda.runtime.driverGetVersion(),
             "cupy": cp.__version__, "torch": torch.__version__}
    for key, attr in _CLOCK_ATTRS.items():
        try:
            facts[key] = int(cp.cuda.runtime.deviceGetAttribute(attr, timer.device))
        except Exception:  # not every CUDA version still reports it: "clocks if readable"
            pass
    return facts


def bench_file(path: str | Path, *, batches: tuple[int, ...] = (1,), modes: tuple[str, ...] = ("cold", "hot"),
               graph: bool = False, iters: int = 200, device: int = 0, layers: tuple[str, ...] = (),
               peers: bool = True, progress: Progress | None = None) -> BenchReport:
    """Benchmark every pruned float layer of ``path`` (see module doc). NoGpuError / GpuRuntimeError."""
    from ..runtime import _gpu

    _gpu.require_device(device)
    pf = read_packed(path)
    with Session(device) as s:
        report = s.new_report(str(path))
        for name in pf.names():
            entry = pf.manifest["tensors"][name]
            if entry["pattern"] not in SUBJECT or entry["dtype"] not in GATE_REL_ERROR:
                continue
            if layers and not any(fnmatch.fnmatchcase(name, g) for g in layers):
                continue
            if progress:
                progress(name)
            s.bench_layer(report, name, pf.load(name), batches=batches, modes=modes, graph=graph,
                          iters=iters, peers=peers)
    return report


class Session:
    """One benchmarking process on one device: the timer, the read-bandwidth figure, GPU errors mapped."""

    def __init__(self, device: int = 0) -> None:
        from ..runtime import _gpu

        self.device = _gpu.require_device(device)
        self.cp = _gpu.cupy()
        self._dev_ctx = self.cp.cuda.Device(self.device)

    def __enter__(self) -> Session:
        torch.cuda.set_device(self.device)
        self._dev_ctx.__enter__()
        self.timer = Timer(self.device)
        self.bandwidth = self.timer.read_bandwidth_gbps()
        return self

    def __exit__(self, *exc) -> None:
        self._dev_ctx.__exit__(*exc)

    def new_report(self, file: str) -> BenchReport:
        return BenchReport(file, device_facts(self.timer), self.bandwidth)

    def bench_layer(self, report: BenchReport, name: str, packed, *, batches, modes, graph, iters,
                    peers: bool = True) -> None:
        cp = self.cp
        try:
            _bench_layer(report, self.timer, packed, name, batches, modes, graph, iters, self.bandwidth,
                         self.device, peers)
        except (cp.cuda.memory.OutOfMemoryError, cp.cuda.runtime.CUDARuntimeError,
                cp.cuda.driver.CUDADriverError, torch.OutOfMemoryError) as exc:
            cp.get_default_memory_pool().free_all_blocks()
            raise GpuRuntimeError(f"layer {name!r}: {type(exc).__name__}: {exc}") from None


def _stream_candidate(timer: Timer) -> Callable[[int], Candidate]:
    def make_stream(nbytes: int) -> Candidate:
        def make(n):
            return [timer.read_launch(nbytes) for _ in range(n)]

        return Candidate("stream", nbytes, make, None, None, True,
                         "plain streaming read of the subject kernel's bytes: the achievable time at this size")
    return make_stream


def _bench_layer(report, timer: Timer, packed, name, batches, modes, graph, iters, bw, device, peers):
    cp = timer.cp
    tdt = packed.dtype
    dtype = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}[tdt]
    rows, cols = packed.shape[0], math.prod(packed.shape[1:])
    l2 = timer.info.l2_bytes
    dev = torch.device("cuda", device)
    gen = torch.Generator(device=dev).manual_seed(0)
    for batch in batches:
        x_t = torch.randn(cols, batch, device=dev, generator=gen).to(tdt)
        if batch == 1:
            x_t = x_t.reshape(cols)
        case = candidates(packed, packed.pattern, x_t, batch, device=device, stream=_stream_candidate(timer), peers=peers)
        for u in case.unavailable:
            report.unavailable.append({"layer": name, "batch": batch, "kernel": u.kernel, "reason": u.reason})
        x64 = x_t.to(torch.float64)
        for c in case.candidates:
            err = None
            if c.run is not None:
                ref = c.weight.to(dev, torch.float64) @ x64
                err = _rel_error(c.run(), ref)
                del ref
            correct = err is None or err < GATE_REL_ERROR[dtype]
            if not correct:
                report.measurements.append(Measurement(name, (rows, cols), dtype, batch, modes[0], False, c.kernel,
                                                       float("nan"), float("nan"), float("nan"), c.nbytes, 0.0, 0.0,
                                                       err, False, "failed the correctness gate; not timed"))
                continue
            for mode in modes:
                fns = c.make(copies_for(c.nbytes, l2) if mode == "cold" else 1)
                runs: list[tuple[bool, Timing]] = [(False, timer.time(fns, iters=iters))]
                if graph and c.graphable:
                    runs.append((True, timer.graph_time(fns)))
                for is_graph, t in runs:
                    gbps = c.nbytes / (t.median_us * 1e-6) / 1e9
                    note = c.note if t.spin_covered else (c.note + "; host fell behind the GPU").strip("; ")
                    report.measurements.append(Measurement(
                        name, (rows, cols), dtype, batch, mode, is_graph, c.kernel, t.median_us, t.p10_us,
                        t.p90_us, int(c.nbytes), gbps, 100.0 * gbps / bw, err, True, note))
                del fns
        del case
        cp.get_default_memory_pool().free_all_blocks()
        torch.cuda.empty_cache()


def _finite(m: Measurement | None) -> bool:
    return m is not None and m.correct and math.isfinite(m.median_us)


def rows(report: BenchReport) -> list[dict]:
    """One row per (layer, batch, mode, graph): each kernel's measurement, the subject, the chosen
    path, the ideal time (subject bytes / read bandwidth) and speedups of subject and path."""
    out: dict[tuple, dict] = {}
    for m in report.measurements:
        key = (m.layer, m.dtype, m.batch, m.mode, m.graph)
        row = out.setdefault(key, {"layer": m.layer, "shape": m.shape, "dtype": m.dtype, "batch": m.batch,
                                   "mode": m.mode, "graph": m.graph, "kernels": {}})
        row["kernels"][m.kernel] = m
    for row in out.values():
        ks = row["kernels"]
        subject = next((k for k in ("balanced", "bsr", "csr") if k in ks), None)
        row["subject"] = subject
        s = ks.get(subject)
        row["ideal_us"] = (s.bytes / (report.read_bandwidth_gbps * 1e3)) if s is not None else None
        own = [ks[k] for k in OWN_PATHS if _finite(ks.get(k)) and (k == "dense" or k == subject)]
        best = min(own, key=lambda m: m.median_us) if own else None
        row["path"] = best.kernel if best else None
        row["path_us"] = best.median_us if best else None
        if best is not None and best.kernel == "dense" and _finite(s):
            row["path_reason"] = f"{subject} kernel {s.median_us / best.median_us:.2f}x slower than dense here"
        else:
            row["path_reason"] = ""
        row["speedup"] = {}
        for k, m in ks.items():
            if k == subject or k == "stream" or not _finite(m):
                continue
            row["speedup"][k] = (m.median_us / s.median_us) if _finite(s) else None
        d = ks.get("dense")
        row["path_speedup_vs_dense"] = (d.median_us / best.median_us) if best and _finite(d) else None
    return list(out.values())


def selection(report: BenchReport) -> list[dict]:
    """The runtime's choice per (layer, batch, mode, graph), for the JSON report."""
    return [{"layer": r["layer"], "batch": r["batch"], "mode": r["mode"], "graph": r["graph"], "path": r["path"],
             "path_us": r["path_us"], "subject": r["subject"], "reason": r["path_reason"],
             "ideal_us": r["ideal_us"]} for r in rows(report)]


__all__ = ["GATE_REL_ERROR", "Session", "bench_file", "device_facts", "rows", "selection"]
