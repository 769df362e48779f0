"""``balprune bench``: per-layer batch-1/batch-N latency of a packed file against its peers.

For each balanced layer: a correctness gate against a float64 reference first (a failing layer
is reported and not timed), then, in one process on one GPU, the balanced kernel, dense cuBLAS
(torch.mv / torch.mm in the layer's dtype) and cuSPARSE CSR (cupyx, float32 layers), each cold
(weight copies totalling > 4.5x L2, rotated) and/or hot, eagerly and optionally replayed from a
CUDA graph, timed by the one timing function (bench.timing.Timer). The device's read bandwidth is
measured in the same run; every row carries its bytes, GB/s and % of that figure.
"""

from __future__ import annotations

import copy
import fnmatch
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from ..errors import GpuRuntimeError
from ..formats.base import as_matrix
from ..formats.packed_file import read_packed
from .report import BenchReport, Measurement
from .timing import Timer, Timing, copies_for

#: Relative (norm) error a layer may show against the float64 reference, per storage dtype.
GATE_REL_ERROR = {"F32": 1e-5, "F16": 2e-3, "BF16": 1.6e-2}
_TORCH = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}

Progress = Callable[[str], None]


def _rel_error(y: torch.Tensor, ref: torch.Tensor) -> float:
    y64 = y.to(torch.float64).reshape(ref.shape)
    if not bool(torch.isfinite(y64).all()):
        return float("inf")
    return float(torch.linalg.norm(y64 - ref) / max(float(torch.linalg.norm(ref)), 1e-300))


def _clone_balanced(op):
    c = copy.copy(op)
    c.values_dev = op.values_dev.copy()
    c.indices_dev = op.indices_dev.copy()
    return c


def bench_file(path: str | Path, *, batches: tuple[int, ...] = (1,), modes: tuple[str, ...] = ("cold", "hot"),
               graph: bool = False, iters: int = 200, device: int = 0, layers: tuple[str, ...] = (),
               progress: Progress | None = None) -> BenchReport:
    """Benchmark every balanced layer of ``path`` (see module doc). NoGpuError / GpuRuntimeError."""
    from ..runtime import BalancedLinear, _gpu

    _gpu.require_device(device)
    cp = _gpu.cupy()
    pf = read_packed(path)
    torch.cuda.set_device(device)
    with cp.cuda.Device(device):
        timer = Timer(device)
        info = timer.info
        bw = timer.read_bandwidth_gbps()
        report = BenchReport(str(path), {
            "name": info.name, "compute_capability": info.compute_capability, "multiprocessors": info.multiprocessors,
            "l2_bytes": info.l2_bytes, "cuda_runtime": cp.cuda.runtime.runtimeGetVersion(),
            "driver": cp.cuda.runtime.driverGetVersion(), "cupy": cp.__version__, "torch": torch.__version__,
        }, bw)
        for name in pf.names():
            entry = pf.manifest["tensors"][name]
            if entry["pattern"] != "balanced" or entry["dtype"] not in GATE_REL_ERROR:
                continue
            if layers and not any(fnmatch.fnmatchcase(name, g) for g in layers):
                continue
            if progress:
                progress(name)
            try:
                _bench_layer(report, timer, pf.load(name), name, entry, batches, modes, graph, iters, bw,
                             BalancedLinear, device)
            except (cp.cuda.memory.OutOfMemoryError, cp.cuda.runtime.CUDARuntimeError,
                    cp.cuda.driver.CUDADriverError, torch.OutOfMemoryError) as exc:
                cp.get_default_memory_pool().free_all_blocks()
                raise GpuRuntimeError(f"layer {name!r}: {type(exc).__name__}: {exc}") from None
    return report


def _bench_layer(report, timer: Timer, packed, name, entry, batches, modes, graph, iters, bw, BalancedLinear, device):
    cp = timer.cp
    dtype = entry["dtype"]
    tdt = _TORCH[dtype]
    w_host = as_matrix(packed.to_dense())  # dense-with-zeros [R, K], the reference's weights
    rows, cols = w_host.shape
    op = BalancedLinear.from_tensor(packed, device=device, name=name)
    w_dev = w_host.to(device=f"cuda:{device}")
    csr = None
    if dtype == "F32":
        import cupyx.scipy.sparse as cps

        csr = cps.csr_matrix(cp.from_dlpack(w_dev))
    l2 = timer.info.l2_bytes
    gen = torch.Generator(device=f"cuda:{device}").manual_seed(0)
    for batch in batches:
        x_t = torch.randn(cols, batch, device=f"cuda:{device}", generator=gen).to(tdt)
        if batch == 1:
            x_t = x_t.reshape(cols)
        ref = w_host.to(torch.float64) @ x_t.cpu().to(torch.float64)
        y_t = op(x_t)
        err = _rel_error(y_t.cpu(), ref)
        correct = err < GATE_REL_ERROR[dtype]
        shape = (rows, cols)
        xy_bytes = x_t.numel() * x_t.element_size() + y_t.numel() * y_t.element_size()
        kernels: dict[str, tuple[int, Callable[[], list], str]] = {}
        # the balanced kernel: pre-built launches, no per-call Python checks
        x_cp = cp.from_dlpack(x_t.view(torch.int16)).view(cp.uint16) if tdt == torch.bfloat16 else cp.from_dlpack(x_t)
        y_cp = cp.empty(y_t.shape, dtype=x_cp.dtype)

        def balanced_fns(n, op=op, x_cp=x_cp, y_cp=y_cp, batch=batch):
            ops = [op] + [_clone_balanced(op) for _ in range(n - 1)]
            return [o.prepared_launch(x_cp, y_cp, batch) for o in ops]

        kernels["balanced"] = (op.weight_bytes + xy_bytes, balanced_fns, "")
        w_typed = w_dev.to(tdt)

        def dense_fns(n, w=w_typed, x=x_t):
            ws = [w] + [w.clone() for _ in range(n - 1)]
            return [(lambda w=w: torch.mv(w, x)) if x.dim() == 1 else (lambda w=w: torch.mm(w, x)) for w in ws]

        kernels["dense"] = (w_typed.numel() * w_typed.element_size() + xy_bytes, dense_fns, "cuBLAS via torch")
        if csr is not None:
            x32 = cp.from_dlpack(x_t)

            def csr_fns(n, m=csr, x=x32):
                ms = [m] + [m.copy() for _ in range(n - 1)]
                return [(lambda m=m: m @ x) for m in ms]

            csr_bytes = csr.data.nbytes + csr.indices.nbytes + csr.indptr.nbytes + xy_bytes
            kernels["csr"] = (csr_bytes, csr_fns, "cuSPARSE via cupyx")
        for kernel, (nbytes, make, note) in kernels.items():
            if kernel == "balanced" and not correct:
                report.measurements.append(Measurement(name, shape, dtype, batch, modes[0], False, kernel,
                                                       float("nan"), float("nan"), float("nan"), nbytes, 0.0, 0.0,
                                                       err, False, "failed the correctness gate; not timed"))
                continue
            for mode in modes:
                n = copies_for(nbytes, l2) if mode == "cold" else 1
                fns = make(n)
                runs: list[tuple[bool, Timing]] = [(False, timer.time(fns, iters=iters))]
                if graph and kernel != "csr":  # cuSPARSE calls cannot be captured into a CUDA graph
                    runs.append((True, timer.graph_time(fns)))
                for is_graph, t in runs:
                    gbps = nbytes / (t.median_us * 1e-6) / 1e9
                    report.measurements.append(Measurement(
                        name, shape, dtype, batch, mode, is_graph, kernel, t.median_us, t.p10_us, t.p90_us,
                        int(nbytes), gbps, 100.0 * gbps / bw, err if kernel == "balanced" else None, True,
                        note if t.spin_covered else (note + "; host fell behind the GPU").strip("; ")))
                del fns
        cp.get_default_memory_pool().free_all_blocks()


def speedups(report: BenchReport) -> list[dict]:
    """One row per (layer, batch, mode, graph): each kernel's median and balanced's speedups."""
    rows: dict[tuple, dict] = {}
    for m in report.measurements:
        key = (m.layer, m.batch, m.mode, m.graph)
        row = rows.setdefault(key, {"layer": m.layer, "shape": m.shape, "dtype": m.dtype, "batch": m.batch,
                                    "mode": m.mode, "graph": m.graph})
        row[m.kernel] = m
    out = []
    for row in rows.values():
        b = row.get("balanced")
        for peer in ("dense", "csr"):
            p = row.get(peer)
            row[f"speedup_vs_{peer}"] = (p.median_us / b.median_us) if (b and p and b.correct
                                                                        and np.isfinite(b.median_us)) else None
        out.append(row)
    return out
