"""Measurement: the one owner of timing, CUDA-graph capture, correctness gates and the relative error.

``balprune bench`` (bench/) and the model runtime's dispatcher (runtime/model/stages.py) both
measure through this module, so a figure means the same thing wherever it is printed:

* ``Timer``: the per-launch timing function (CUDA events around every launch, queued behind a
  spin kernel), graph replay timing, the read-bandwidth probe and the plain-read reference launch;
* ``capture_graph`` / ``measure_us``: one call captured in a CUDA graph (torch ops and balprune's
  kernels in one graph) and the dispatcher's hot per-call time from its replays;
* ``relative_error``: ||y - ref|| / ||ref|| in float64 (inf for a non-finite output);
* ``pick_path``: which of a stage's correct timed paths runs (the fastest; a near-tie to fewer bytes);
* the gates: ``product_tolerance`` (one matrix product against float64 arithmetic on the same
  rounded operands, the bound derived below), ``STAGE_TOLERANCE`` (a runtime stage: a product,
  or a whole recurrence / token step) and ``MODEL_TOLERANCE`` (a whole model's outputs against the
  float32 reference model: README "Tolerance contract").

Importing this module touches no GPU and imports no CuPy: everything that needs one imports it
lazily (through runtime._gpu) when called. Nothing outside runtime/ imports CuPy.

The bound of one product (``product_tolerance``)
-------------------------------------------------
y = W x with K products per output, W and x already rounded to the storage dtype, compared with
the float64 product of those same values (the float64 reference is exact to ~1e-16: negligible).
A kernel (1) forms the products, (2) accumulates them in some precision with unit roundoff u_acc,
(3) rounds each result once to the output dtype (unit roundoff u_out, round to nearest):

* (3) is deterministic: |fl(s) - s| <= u_out |s| per element, so at most u_out norm-wise.
* (1)+(2): to first order the accumulated error of an output is e = sum_j d_j s_j, with s_j the
  partial sums in the kernel's order and |d_j| <= u_acc (products of 16-bit values are exact in
  fp32; a product rounded in u_acc adds a term of the same form). Higham & Mary's probabilistic
  model ("A new approach to probabilistic rounding error analysis", SIAM J. Sci. Comput. 41(5),
  2019) takes the d_j as independent, mean-zero random variables; by Hoeffding/Azuma,
  |e| <= lambda u_acc sqrt(sum_j s_j^2) except with probability 2 exp(-lambda^2 / 2). Their
  componentwise bound uses |W||x| in place of the partial sums, which grows like K u_acc for
  zero-mean data and says nothing for 16-bit accumulation; the partial sums themselves are what
  the error is made of. For zero-mean data (trained weights; the random inputs of bench and the
  dispatcher) the partial sums are a random walk: E s_j^2 = (j / K) y^2, so the root mean square
  of e is (u_acc / sqrt(3)) sqrt(K / 2) |y| = 0.41 sqrt(K) u_acc |y| for recursive summation, and
  less for blocked or tree summation (fp32 partials of a block, then a 16-bit sum of the blocks:
  ~0.06 sqrt(K) u_acc; tests/test_measure.py simulates both). Norm-wise over the rows and batch
  columns the errors average, so the relative error concentrates near that root mean square.

Hence the bound used for every gate of one product:

    rel_error <= u_out + C * sqrt(K) * u_acc,        C = ACCUMULATION_FACTOR = 1

C = 1 is 2.4 root-mean-squares of the recursive (worst ordinary) summation, lambda = 2.4 for a
single output and far more norm-wise over many. K is the products per output (the matrix's
columns: an upper bound for a sparse kernel). Consequences:
  - balprune's kernels accumulate in fp32 (u_acc = 2^-24): the bound is u_out plus at most 1.5e-5
    at K = 65536; an fp16 layer is held to ~5e-4, so one wrong index, a dropped block or a row of
    the wrong sign (relative errors of 1e-2 and far above) fails.
  - a library that does not say how it accumulates (cuBLAS with torch's default
    allow_fp16_reduced_precision_reduction, cuSPARSE, torch's BSR and 2:4 paths) is held to
    16-bit accumulation (u_acc = u_out) for 16-bit values: 2e-2 + 5e-4 at K = 1024 fp16, 0.12 at
    K = 65536 (the error a 16-bit sum can legitimately have); only gross errors fail there.
The model ignores overflow and subnormals (fp16 partial sums beyond 65504 are inf: a failure).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch

# --------------------------------------------------------------------------- gates and errors

#: Unit roundoff u = 2^-p of each precision (round to nearest): the relative error of one rounding.
UNIT_ROUNDOFF: dict[str, float] = {"float64": 2.0**-53, "float32": 2.0**-24, "float16": 2.0**-11,
                                   "bfloat16": 2.0**-8}
#: The report's dtype codes (safetensors names) and torch dtypes, as precision names.
_NAMES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
          torch.float64: "float64", torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}
#: C of the accumulation term (module doc): 2.4 root-mean-squares of recursive summation.
ACCUMULATION_FACTOR = 1.0

#: Bound on relative_error(path output, float64 reference) of one runtime stage (a product, or an
#: LSTM layer's whole recurrence / two token steps, rounded to the dtype where the kernels store
#: it), per value dtype. Not product_tolerance: a stage's error is dominated by the roundings of
#: what it stores between steps (h, gates, activations in the model dtype: a few units of
#: roundoff, compounding over the steps), not by one product's K: float16 4e-3 ~ 8 u, bfloat16
#: 3e-2 ~ 8 u. The float32 bound, ~2 u of TF32 (10-bit mantissa), admits TF32, which torch uses
#: by default for float32 convolutions (torch.backends.cudnn.allow_tf32); the runtime's float32
#: dense conv path turns it off (exact_float32), since the whole model is held to 1e-4. A wrong
#: index or gate gives errors of order 1e-1 and above: every bound still catches it. (The values are the dispatcher's since it was written: the paths it
#: takes, and so the figures, do not change with the move to this module.)
STAGE_TOLERANCE: dict[str, float] = {"float32": 1e-3, "float16": 4e-3, "bfloat16": 3e-2}

#: Bound on relative_error(runtime output, float32 reference model output), per runtime dtype
#: (README "Tolerance contract"; models.reference says why): float32 1e-4 (only the summation
#: order differs), float16 2e-2 and bfloat16 8e-2 (activations rounded to 16 bits at every layer
#: boundary, compounding through the layers and an LSTM's steps).
MODEL_TOLERANCE: dict[str, float] = {"float32": 1e-4, "float16": 2e-2, "bfloat16": 8e-2}


@contextmanager
def exact_float32() -> Iterator[None]:
    """Inside: torch's float32 convolutions, RNNs and matmuls on CUDA compute in float32 (IEEE), not TF32;
    the previous settings are restored after.

    torch lets cuDNN use TF32 (a 10-bit mantissa) for float32 convolutions and RNNs by default, so
    a "float32" torch conv differs from float32 arithmetic by ~1e-4-1e-3 per layer, which compounds
    through a 50-layer ResNet past MODEL_TOLERANCE["float32"] (measured: 1.7e-4 between the exact
    sparse stages and a TF32 reference). The float32 reference model and the runtime's float32
    dense conv path run inside this, so float32 means float32 on both sides of the gate.

    The switches are process-wide while it is active (other threads see them too), and on torch >= 2.9
    (the precision API) torch's legacy switches (``torch.backends.cudnn.allow_tf32``,
    ``torch.backends.cudnn.flags``) raise when read inside it: torch refuses a mix of the two APIs.
    """
    cudnn = torch.backends.cudnn
    if hasattr(getattr(cudnn, "conv", None), "fp32_precision"):  # torch >= 2.9: the precision API
        knobs = (cudnn.conv, cudnn.rnn, torch.backends.cuda.matmul)
        before = [k.fp32_precision for k in knobs]
        for k in knobs:
            k.fp32_precision = "ieee"
        try:
            yield
        finally:
            for k, b in zip(knobs, before):
                k.fp32_precision = b
    else:  # older torch: the allow_tf32 switches
        before = (cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
        cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
        try:
            yield
        finally:
            cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = before


def float32_is_exact() -> bool:
    """Whether torch's float32 convolutions on CUDA compute in IEEE float32 now (inside exact_float32, or
    set so by the caller): one flag read, for code on a hot path that would otherwise enter the context."""
    conv = getattr(torch.backends.cudnn, "conv", None)
    if hasattr(conv, "fp32_precision"):
        return conv.fp32_precision == "ieee"
    return not torch.backends.cudnn.allow_tf32


def precision(dtype) -> str:
    """The precision name ("float32", "float16", ...) of a name, a report code ("F16") or a torch dtype."""
    if isinstance(dtype, str) and dtype in UNIT_ROUNDOFF:
        return dtype
    try:
        return _NAMES[dtype]
    except (KeyError, TypeError):
        raise ValueError(f"unknown precision {dtype!r}") from None


def unit_roundoff(dtype) -> float:
    """u = 2^-p of ``dtype`` (a name, report code or torch dtype): 2^-24 float32, 2^-11 float16, 2^-8 bfloat16."""
    return UNIT_ROUNDOFF[precision(dtype)]


def product_tolerance(dtype, k: int, *, accumulate=None) -> float:
    """The norm-wise relative error one product y = W x may show (module doc):
    u_out + ACCUMULATION_FACTOR * sqrt(k) * u_acc.

    ``dtype``: the output (storage) precision; ``k``: products per output (>= 1);
    ``accumulate``: the accumulation precision, None for "as the output" (a library that does not
    say: 16 bits for 16-bit values).
    """
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k must be a positive int, got {k!r}")
    u_out = unit_roundoff(dtype)
    u_acc = u_out if accumulate is None else unit_roundoff(accumulate)
    return u_out + ACCUMULATION_FACTOR * math.sqrt(int(k)) * u_acc


def elementwise_tolerance(ref: torch.Tensor, absdot: torch.Tensor, n, dtype, *, accumulate="float32") -> torch.Tensor:
    """The deterministic (worst-case) per-element form of the same bound, for tests that know the
    terms: u_out |ref| + n u_acc sum|w x| + tiny (n: products per output, a number or a column).

    Higham's gamma_n = n u_acc (every rounding of the sum at its worst) on sum|w x|, plus the one
    rounding of the output; tiny = 2^-24 absolute for float16 outputs (half of fp16's smallest
    subnormal), else 1e-30. Norm-wise it implies at most u_out + n u_acc || |W||x| || / ||W x||,
    which ``product_tolerance`` sharpens (sqrt(n) instead of n) under the random-rounding model.
    """
    u_out = unit_roundoff(dtype)
    u_acc = unit_roundoff(accumulate)
    tiny = 2.0**-24 if precision(dtype) == "float16" else 1e-30
    return u_out * ref.abs() + n * u_acc * absdot + tiny


def relative_error(y: torch.Tensor, ref: torch.Tensor) -> float:
    """``||y - ref|| / max(||ref||, 1e-300)`` over all elements, in float64 on ``y``'s device;
    inf when either holds inf/NaN. ``y`` is read in ``ref``'s shape ([rows] and [rows, 1] alike);
    ValueError when the element counts differ (a caller bug, not a numerical difference)."""
    if y.numel() != ref.numel():
        raise ValueError(f"relative_error: shapes differ: {list(y.shape)} vs {list(ref.shape)}")
    y64 = y.detach().to(torch.float64).reshape(ref.shape)
    if not bool(torch.isfinite(y64).all()):
        return math.inf
    r64 = ref.detach().to(device=y64.device, dtype=torch.float64)
    # The same operations as bench's and the dispatcher's earlier functions: the same figures.
    ref_norm = float(torch.linalg.norm(r64))
    if not math.isfinite(ref_norm):  # ref holds inf/NaN
        return math.inf
    return float(torch.linalg.norm(y64 - r64) / max(ref_norm, 1e-300))


# --------------------------------------------------------------------------- timing (needs a GPU)

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
    """The one timing function: CUDA events around every launch, queued behind a spin.

    All timed launches are queued behind a long spin kernel, so the host never starves the GPU
    and the events measure device time back to back; warm-up first; median, p10 and p90 per
    launch. A back-to-back average (two events around all launches) is returned too, and graph
    replay is timed separately. "cold" callers pass several closures over weight copies totalling
    > 4.5x the L2 size (rotated), "hot" callers one. Building one needs CuPy and a GPU.
    """

    def __init__(self, device: int = 0) -> None:
        from . import _gpu
        from .kernels import load_module

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

    def device_facts(self) -> dict:
        """A report's device block: name, SMs, L2, CUDA / driver / CuPy / torch versions, clocks if readable."""
        cp = self.cp
        info = self.info
        facts = {"name": info.name, "compute_capability": info.compute_capability,
                 "multiprocessors": info.multiprocessors, "l2_bytes": info.l2_bytes,
                 "cuda_runtime": cp.cuda.runtime.runtimeGetVersion(), "driver": cp.cuda.runtime.driverGetVersion(),
                 "cupy": cp.__version__, "torch": torch.__version__}
        for key, attr in _CLOCK_ATTRS.items():
            try:
                facts[key] = int(cp.cuda.runtime.deviceGetAttribute(attr, self.device))
            except Exception:  # not every CUDA version still reports it: "clocks if readable"
                pass
        return facts


#: cudaDeviceAttr codes of the rated SM and memory clocks (kHz).
_CLOCK_ATTRS = {"sm_clock_max_khz": 13, "memory_clock_max_khz": 36}


def gpu_failures() -> tuple[type[BaseException], ...]:
    """The exception types of a GPU failure during a measurement (out of memory, CUDA runtime or
    driver errors): callers map them to GpuRuntimeError (exit 7) after ``free_device_memory``."""
    from . import _gpu

    cp = _gpu.cupy()
    return (cp.cuda.memory.OutOfMemoryError, cp.cuda.runtime.CUDARuntimeError, cp.cuda.driver.CUDADriverError,
            torch.OutOfMemoryError)


def free_device_memory() -> None:
    """Give CuPy's and torch's cached device memory back (between layers, after a failure)."""
    from . import _gpu

    _gpu.cupy().get_default_memory_pool().free_all_blocks()
    torch.cuda.empty_cache()


# --------------------------------------------------------------------------- graphs and the dispatcher's time

class on_torch_stream_ctx:
    """``torch.cuda.graph(g)`` that also points CuPy at the capturing stream, so balprune's kernels
    and torch's ops land in one graph in issue order."""

    def __init__(self, graph: torch.cuda.CUDAGraph) -> None:
        self._g = torch.cuda.graph(graph)
        self._cp_stream = None

    def __enter__(self):
        self._g.__enter__()
        self._cp_stream = cupy_on_torch_stream()
        self._cp_stream.__enter__()
        return self

    def __exit__(self, *exc):
        self._cp_stream.__exit__(*exc)
        return self._g.__exit__(*exc)


def cupy_on_torch_stream():
    """A CuPy stream context for torch's current stream (enter it around launches of our kernels)."""
    from . import _gpu

    return _gpu.cupy().cuda.ExternalStream(torch.cuda.current_stream().cuda_stream)


def capture_graph(fn: Callable[[], object], warmup: int = 3) -> torch.cuda.CUDAGraph:
    """A CUDA graph of one call of ``fn`` (torch ops and balprune's kernels alike). Warm-up calls
    run first on a side stream, as torch's graph docs ask (library handles, workspaces, kernel
    loads happen outside the capture); RuntimeError when the work cannot be captured."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side), cupy_on_torch_stream():
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with on_torch_stream_ctx(g):
        fn()
    torch.cuda.synchronize()
    return g


def measure_us(fn: Callable[[], None], reps: int = 20, trials: int = 3) -> float:
    """Device time (us) of one call of ``fn``: ``reps`` calls captured in a CUDA graph, replayed
    ``trials`` times, best per-call mean (hot: what the layer costs inside a captured model).
    Falls back to back-to-back eager calls when the work cannot be captured."""
    def many():
        for _ in range(reps):
            fn()
    try:
        replay = capture_graph(many, warmup=1).replay
    except RuntimeError:
        torch.cuda.synchronize()
        replay = many
    best = math.inf
    for _ in range(trials + 1):
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record()
        replay()
        e1.record()
        e1.synchronize()
        best = min(best, e0.elapsed_time(e1) * 1e3 / reps)
    return best


#: Timed paths within this fraction of the fastest tie, and the one of them that reads the fewest bytes runs: the
#: same speed with less memory. Launch-bound products differ by run-to-run noise at this level (the 1B decode A/B
#: of kernels/NOTES.md v32 bound a q/k/v product dense in one run and bitmask in the other, 5.1-5.4 us), and a
#: packed model should not keep a dense copy for noise.
TIE_FRACTION = 0.03


def pick_path(times_us: dict[str, float], nbytes: dict[str, int]) -> tuple[str, str]:
    """The path the model runtime's dispatcher binds (and ``bench`` reports as the runtime's) among correct timed
    paths (``times_us``: path -> us; ``nbytes``: path -> bytes it reads) and why: the fewest bytes among those
    within TIE_FRACTION of the fastest (the faster among equal bytes)."""
    fastest = min(times_us, key=times_us.get)
    ties = [p for p in times_us if times_us[p] <= times_us[fastest] * (1.0 + TIE_FRACTION)]
    path = min(ties, key=lambda p: (nbytes.get(p, float("inf")), times_us[p]))
    others = [p for p in times_us if p != path]
    if not others:
        return path, "the only correct path"
    o = fastest if path != fastest else others[0]
    reason = f"{path} {times_us[path]:.1f} us vs {o} {times_us[o]:.1f} us ({times_us[o] / times_us[path]:.2f}x)"
    if path != fastest:
        reason += (f"; within {TIE_FRACTION:.0%} of the fastest, {nbytes[path] / 1e6:.2f} MB read against "
                   f"{nbytes[fastest] / 1e6:.2f} MB")
    return path, reason


__all__ = ["ACCUMULATION_FACTOR", "MODEL_TOLERANCE", "STAGE_TOLERANCE", "TIE_FRACTION", "Timer", "Timing", "UNIT_ROUNDOFF",
           "capture_graph", "copies_for", "cupy_on_torch_stream", "elementwise_tolerance", "exact_float32",
           "float32_is_exact", "free_device_memory",
           "gpu_failures", "measure_us", "on_torch_stream_ctx", "precision", "product_tolerance",
           "relative_error", "unit_roundoff"]
