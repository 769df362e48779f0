"""``balprune bench``: per-layer batch-1/batch-N latency of a packed file against its peers.

For each pruned layer and batch size, in one process on one GPU: the candidates of bench.peers
(balprune's kernel for the layer's pattern, dense cuBLAS, cuSPARSE CSR, block-sparse and 2:4
peers, and a plain streaming read of the same bytes), each gated against float64 first
(runtime.measure.product_tolerance for the layer's dtype, its K and the candidate's accumulation
precision; a failing kernel is reported and not timed: only a failure of balprune's own paths
makes the command fail, report.own_failures), then timed cold (weight copies totalling > 4.5x L2,
rotated) and/or hot, eagerly and optionally replayed from a CUDA graph, by the one timing
function (runtime.measure.Timer). The device's read bandwidth is measured in the same run; every
measurement carries its bytes, GB/s and % of that figure. The packed file is verified completely
(formats.packed_file.verify_packed) before the GPU is looked for.

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
from ..formats.packed_file import verify_packed
from ..runtime.measure import Timer, Timing, copies_for, product_tolerance, relative_error
from .peers import SUBJECT, Candidate, candidates, quiet_libraries
from .report import BenchReport, Measurement

#: The value dtypes bench runs (report codes): the kernels' storage types.
DTYPES = ("F32", "F16", "BF16")

Progress = Callable[[str], None]


def bench_file(path: str | Path, *, batches: tuple[int, ...] = (1,), modes: tuple[str, ...] = ("cold", "hot"),
               graph: bool = False, iters: int = 200, device: int = 0, layers: tuple[str, ...] = (),
               peers: bool = True, progress: Progress | None = None) -> BenchReport:
    """Benchmark every pruned float layer of ``path`` (see module doc). The file is verified
    completely first (FormatError / InvalidInputError, exit 4, before any GPU is looked for);
    then NoGpuError without a GPU, GpuRuntimeError on a device failure."""
    from ..runtime import _gpu

    pf = verify_packed(path)
    _gpu.require_device(device)
    with Session(device) as s:
        report = s.new_report(str(path))
        for name in pf.names():
            entry = pf.manifest["tensors"][name]
            if entry["pattern"] not in SUBJECT or entry["dtype"] not in DTYPES:
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
        return BenchReport(file, self.timer.device_facts(), self.bandwidth)

    def bench_layer(self, report: BenchReport, name: str, packed, *, batches, modes, graph, iters,
                    peers: bool = True) -> None:
        from ..runtime.measure import free_device_memory, gpu_failures

        try:
            _bench_layer(report, self.timer, packed, name, batches, modes, graph, iters, self.bandwidth,
                         self.device, peers)
        except gpu_failures() as exc:
            free_device_memory()
            raise GpuRuntimeError(f"layer {name!r}: {type(exc).__name__}: {exc}") from None


def _stream_candidate(timer: Timer) -> Callable[[int], Candidate]:
    def make_stream(nbytes: int) -> Candidate:
        def make(n):
            return [timer.read_launch(nbytes) for _ in range(n)]

        return Candidate("stream", nbytes, make, None, None, True,
                         "plain streaming read of the subject kernel's bytes: the achievable time at this size")
    return make_stream


def _bench_layer(report, timer: Timer, packed, name, batches, modes, graph, iters, bw, device, peers):
    from ..runtime.measure import free_device_memory

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
            err, bound = None, None
            if c.run is not None:
                ref = c.weight.to(dev, torch.float64) @ x64
                with quiet_libraries():
                    err = relative_error(c.run(), ref)
                del ref
                # K = cols products per output at most; the candidate says how it accumulates.
                bound = product_tolerance(dtype, cols, accumulate=c.accumulate)
            if err is not None and not err <= bound:
                report.measurements.append(Measurement(
                    name, (rows, cols), dtype, batch, modes[0], False, c.kernel, float("nan"), float("nan"),
                    float("nan"), c.nbytes, 0.0, 0.0, err, False,
                    f"failed the correctness gate (relative error {err:.2e} > bound {bound:.2e}); not timed"))
                continue
            for mode in modes:
                # The timing code path is exactly the measurement owner's: the peers silence their
                # libraries' notices where they build and first run them (bench.peers), the notices
                # torch raises once per process, so nothing is wrapped around the timed launches.
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
        free_device_memory()


__all__ = ["DTYPES", "Session", "bench_file"]
