"""The one timing function of balprune: CUDA events around every launch, queued behind a spin.

All timed launches are queued behind a long spin kernel, so the host never starves the GPU and the
events measure device time back to back; warm-up first; median, p10 and p90 per launch. A
back-to-back average (two events around all launches) is returned too, and graph replay is timed
separately. "cold" callers pass several closures over weight copies totalling > 4.5x the L2 size
(rotated), "hot" callers one. Needs CuPy and a GPU (imported lazily by the caller's runtime).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np

#: ~75 ms at 2 GHz: longer than the host needs to queue a few hundred timed launches.
SPIN_CYCLES = 150_000_000


@dataclass(frozen=True)
class Timing:
    median_us: float
    p10_us: float
    p90_us: float
    stream_avg_us: float
    host_enqueue_us: float
    spin_covered: bool  # False: the host fell behind the GPU and gaps may be in the figures
    copies: int


def copies_for(nbytes: int, l2_bytes: int) -> int:
    """Weight copies to rotate through so they total more than 4.5x the L2 (cold timing)."""
    return max(1, math.ceil(4.5 * l2_bytes / max(1, nbytes)))


class Timer:
    """Per-device timing helper: the spin kernel, the read-bandwidth probe, event timing, graphs."""

    def __init__(self, device: int = 0) -> None:
        from ..runtime import _gpu
        from ..runtime.kernels import load_module

        self.cp = _gpu.cupy()
        self.device = device
        self.info = _gpu.device_info(device)
        util = load_module("bench_util.cu", device=device)
        self.spin_k = util.get_function("bp_spin")
        self.read_k = util.get_function("bp_read_reduce")
        self.flag = self.cp.zeros(1, dtype=self.cp.int32)

    def spin(self) -> None:
        self.spin_k((1,), (1,), (np.int64(SPIN_CYCLES), self.flag))

    def time(self, fns, iters: int = 200, warmup: int = 10) -> Timing:
        """Per-launch device times (us) of fns[i % len(fns)] for i < iters."""
        cp = self.cp
        for _ in range(warmup):
            for f in fns:
                f()
        cp.cuda.Device(self.device).synchronize()
        starts = [cp.cuda.Event() for _ in range(iters)]
        ends = [cp.cuda.Event() for _ in range(iters)]
        spin_end = cp.cuda.Event()
        self.spin()
        spin_end.record()
        t0 = time.perf_counter()
        for i in range(iters):
            starts[i].record()
            fns[i % len(fns)]()
            ends[i].record()
        host_us = (time.perf_counter() - t0) * 1e6
        ends[-1].synchronize()
        t = np.array([cp.cuda.get_elapsed_time(s, e) for s, e in zip(starts, ends)]) * 1e3
        # Back to back after the spin, the span from its end to the last event is the sum of the
        # intervals plus the event records between them; much more means the host fell behind.
        span_us = cp.cuda.get_elapsed_time(spin_end, ends[-1]) * 1e3
        covered = span_us < 1.5 * float(t.sum()) + 2.0 * iters
        b0, b1 = cp.cuda.Event(), cp.cuda.Event()
        self.spin()
        b0.record()
        for i in range(iters):
            fns[i % len(fns)]()
        b1.record()
        b1.synchronize()
        return Timing(float(np.median(t)), float(np.percentile(t, 10)), float(np.percentile(t, 90)),
                      cp.cuda.get_elapsed_time(b0, b1) * 1e3 / iters, host_us / iters, bool(covered), len(fns))

    def time_calls(self, fn, iters: int = 100, before=None, warmup: int = 3) -> Timing:
        """Per-call device time (us) of ``fn`` (a whole model's unit of work, or a graph's replay).

        ``before`` (e.g. an L2 flush) runs before each call, outside the timed interval. Queued
        behind the spin like ``time``; a call whose host work outlasts its device work shows up as
        ``spin_covered`` False (the figures then include host time: eager launch-bound work).
        """
        cp = self.cp
        for _ in range(warmup):
            if before is not None:
                before()
            fn()
        cp.cuda.Device(self.device).synchronize()
        starts = [cp.cuda.Event() for _ in range(iters)]
        ends = [cp.cuda.Event() for _ in range(iters)]
        spin_start, spin_end = cp.cuda.Event(), cp.cuda.Event()
        spin_start.record()
        self.spin()
        spin_end.record()
        t0 = time.perf_counter()
        for i in range(iters):
            if before is not None:
                before()
            starts[i].record()
            fn()
            ends[i].record()
        host_us = (time.perf_counter() - t0) * 1e6
        ends[-1].synchronize()
        t = np.array([cp.cuda.get_elapsed_time(s, e) for s, e in zip(starts, ends)]) * 1e3
        # Covered: the host had queued every call before the spin ended, so no call waited for it.
        covered = host_us < cp.cuda.get_elapsed_time(spin_start, spin_end) * 1e3
        return Timing(float(np.median(t)), float(np.percentile(t, 10)), float(np.percentile(t, 90)),
                      float(t.mean()), host_us / iters, bool(covered), 1)

    def graph_time(self, fns, reps: int = 20, min_launches: int = 20) -> Timing:
        """Per-launch time (us) from CUDA-graph replays of fns, repeated to >= min_launches launches.

        One graph holds several launches so the graph's own launch cost is amortised as it is in
        a model. torch work in fns is captured too: torch's current stream is pointed at the
        capturing stream. Libraries that cannot be captured (cuSPARSE) raise; callers skip them.
        """
        import torch

        cp = self.cp
        seq = list(fns) * max(1, math.ceil(min_launches / len(fns)))
        s = cp.cuda.Stream(non_blocking=True)
        ts = torch.cuda.ExternalStream(s.ptr, device=torch.device("cuda", self.device))
        with s, torch.cuda.stream(ts):
            for f in seq:  # warm-up outside the capture
                f()
            s.synchronize()
            s.begin_capture()
            for f in seq:
                f()
            g = s.end_capture()
            g.launch(s)
            s.synchronize()
            times = []
            for _ in range(reps):
                e0, e1 = cp.cuda.Event(), cp.cuda.Event()
                e0.record(s)
                g.launch(s)
                e1.record(s)
                e1.synchronize()
                times.append(cp.cuda.get_elapsed_time(e0, e1) * 1e3 / len(seq))
        t = np.array(times)
        return Timing(float(np.median(t)), float(np.percentile(t, 10)), float(np.percentile(t, 90)),
                      float(t.mean()), 0.0, True, len(fns))

    def read_launch(self, nbytes: int):
        """A closure launching bp_read_reduce over a fresh buffer of ``nbytes`` (rounded up to 16).

        The "stream" reference: the time a plain read of a kernel's bytes takes at that size,
        launch and ramp included, timed like any kernel (one buffer per copy for cold timing).
        """
        cp = self.cp
        n4 = max(1, -(-nbytes // 16))
        buf = cp.ones(n4 * 4, dtype=cp.float32)
        grid = min(self.info.multiprocessors * 8, max(1, -(-n4 // 256)))
        sink = cp.empty(grid * 256, dtype=cp.float32)
        args = (buf, np.int64(n4), sink)
        return lambda: self.read_k((grid,), (256,), args)

    def read_bandwidth_gbps(self, nbytes: int = 1 << 32) -> float:
        """Achievable read bandwidth (GB/s): bp_read_reduce streaming ``nbytes``, median of 30."""
        cp = self.cp
        buf = cp.ones(nbytes // 4, dtype=cp.float32)
        grid = self.info.multiprocessors * 8
        sink = cp.empty(grid * 256, dtype=cp.float32)  # one float per thread keeps the loads alive
        n4 = np.int64(nbytes // 16)
        t = self.time([lambda: self.read_k((grid,), (256,), (buf, n4, sink))], iters=30, warmup=3)
        return nbytes / (t.median_us * 1e-6) / 1e9
