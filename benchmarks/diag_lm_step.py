"""Where the persistent LM token step's time goes (kernels/lstm_lm_step.cu), on the paper-sized
model: the step as built, then the same launch compiled with BP_LM_DIAG (1: no arithmetic,
2: no weight copies, 3: neither), with no phases at all (launch + epoch only) and with the
first 1 or 2 phases only, each timed
as CUDA-graph replays (hot). Results of the DIAG builds are wrong by design; only times matter.

    python benchmarks/diag_lm_step.py PACKED.safetensors [--dtype float16] [--timeline] [--late]
        [--define NAME=VALUE ...] [--compare "NAME=V,NAME=V" ...]

--late launches with the first weight copy asked for after the prologue (copy_late 1).
--define adds a preprocessor definition to every build (kernel experiments). --compare builds
the kernel once per given set of definitions (plus the shipped build), checks that two steps
from the zero state give the shipped build's logits bit for bit, and times each (graph, hot,
best of 3 trials; the sets' order is rotated per trial so drift does not favour one).

--timeline instead builds the kernel with BP_LM_DIAG=4 (results stay right): thread 0 of every
CTA stamps clock64 at fixed points of the step (and %globaltimer at its start and end, which put
the CTAs' clocks on one axis); printed per point: the median, the earliest and the latest CTA,
in us from the earliest CTA's start (median over 20 eager hot launches).
"""

from __future__ import annotations

import argparse

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("packed")
    ap.add_argument("--dtype", default="float16")
    ap.add_argument("--timeline", action="store_true")
    ap.add_argument("--define", action="append", default=[])
    ap.add_argument("--compare", action="append", default=[])
    ap.add_argument("--late", action="store_true")
    a = ap.parse_args()
    from balprune.runtime._launch import prepared
    from balprune.runtime.kernels import load_module
    from balprune.runtime.measure import cupy_on_torch_stream, measure_us
    from balprune.runtime.model import load_model

    rt = load_model(a.packed, dtype=a.dtype, paths="sparse", measure=False)
    pm = rt.persistent
    print(f"grid {pm.grid}, regions {pm.regions}, region {pm.region_bytes} B, smem {pm.shared_bytes} B, "
          f"weights {pm.weight_bytes / 1e6:.1f} MB, lpr {pm.lpr}")
    nm = pm.kernel_name
    if a.compare:
        compare(rt, nm, [tuple(x for x in c.split(",") if x) for c in a.compare], tuple(a.define), late=a.late)
        return
    if a.timeline:
        timeline(pm, nm, tuple(a.define), late=a.late)
        return
    for threads, lpr in ((1024, 32), (1024, 16)):
        for diag in (0, 1, 2, 3, "empty", "1 phase", "2 phases"):
            defines = tuple(a.define) + ((f"BP_LM_DIAG={diag}",) if isinstance(diag, int) and diag else ())
            fn = load_module("lstm_lm_step.cu", (nm,), device=0, defines=defines).get_function(nm)
            fn.max_dynamic_shared_size_bytes = pm.shared_bytes
            phases = {"empty": 0, "1 phase": 1, "2 phases": 2}.get(diag, pm.phases)
            launch = prepared(fn, (pm.grid,), (threads,), pm.args(min(lpr, pm.lpr), phases, a.late), pm.shared_bytes,
                              cooperative=True)
            with cupy_on_torch_stream():
                launch()
                us = measure_us(launch, reps=50)
            print(f"threads {threads:5d} lanes/row {lpr:2d} diag {diag!s:8s} {us:7.2f} us")


_POINTS = ("phase start", "own-h part done", "input h gathered", "rows done", "weights + sync", "cell stored")


def compare(rt, nm: str, sets: list[tuple[str, ...]], base: tuple[str, ...], trials: int = 3,
            late: bool = False) -> None:
    """Each set of definitions (on top of ``base``): the same logits as the ``base`` build after
    two steps from the zero state (and both builds' error against the float64 ``reference`` of
    those steps), and its time."""
    import cupy as cp

    from balprune.models import relative_error
    from balprune.runtime._launch import prepared
    from balprune.runtime.kernels import load_module
    from balprune.runtime.measure import cupy_on_torch_stream, measure_us

    pm, tokens, reference = rt.persistent, rt.step.gate_tokens, rt.step.reference()

    def build(defines):
        fn = load_module("lstm_lm_step.cu", (nm,), device=0, defines=base + defines).get_function(nm)
        fn.max_dynamic_shared_size_bytes = pm.shared_bytes
        return prepared(fn, (pm.grid,), (1024,), pm.args(pm.lpr, copy_late=late), pm.shared_bytes, cooperative=True)

    def logits(launch):
        rt.reset()
        out = []
        with cupy_on_torch_stream():
            for t in tokens:
                rt.token.fill_(t)
                launch()
                cp.cuda.get_current_stream().synchronize()
                out.append(rt.logits.clone())
        return out

    sets = [()] + sets
    launches = {s: build(s) for s in sets}
    want = logits(launches[()])
    times: dict[tuple, float] = {}
    for s in sets:
        got = logits(launches[s])
        same = all(bool((g.view(-1) == w.view(-1)).all()) for g, w in zip(got, want))
        err = relative_error(got[-1], reference)
        print(f"{' '.join(s) or '(base)':50s} logits {'identical' if same else 'DIFFER'}, error {err:.2e}")
    for trial in range(trials):
        order = sets[trial % len(sets):] + sets[:trial % len(sets)]
        for s in order:
            with cupy_on_torch_stream():
                us = measure_us(launches[s], reps=50)
            times[s] = min(times.get(s, float("inf")), us)
    for s in sets:
        print(f"{' '.join(s) or '(base)':50s} {times[s]:7.2f} us")


def timeline(pm, nm: str, defines: tuple[str, ...] = (), launches: int = 20, late: bool = False) -> None:
    """Per point of the step: median / earliest / latest CTA in us from the earliest start."""
    import cupy as cp

    from balprune.runtime._launch import prepared
    from balprune.runtime.kernels import load_module
    from balprune.runtime.measure import cupy_on_torch_stream

    # A BP_LM_DIAG among ``defines`` replaces 4 (it must keep bit 4: 5 = timeline without arithmetic).
    diag = tuple(d for d in defines if d.startswith("BP_LM_DIAG=")) or ("BP_LM_DIAG=4",)
    rest = tuple(d for d in defines if not d.startswith("BP_LM_DIAG="))
    mod = load_module("lstm_lm_step.cu", (nm,), device=0, defines=diag + rest)
    fn = mod.get_function(nm)
    fn.max_dynamic_shared_size_bytes = pm.shared_bytes
    stamps = cp.ndarray((1024, 32), dtype=cp.uint64, memptr=mod.get_global("bp_lm_stamps"))
    launch = prepared(fn, (pm.grid,), (1024,), pm.args(pm.lpr, copy_late=late), pm.shared_bytes, cooperative=True)
    runs, clocks = [], []
    with cupy_on_torch_stream():
        for i in range(launches + 3):
            stamps.fill(0)
            launch()
            cp.cuda.get_current_stream().synchronize()
            if i >= 3:
                t = stamps[:pm.grid].get().astype(np.float64)
                # clock64 stamps (slots 0..28) onto the globaltimer axis (slots 31 start, 30 end):
                # the SM clock's rate from each CTA's start-to-end span, the median over CTAs.
                ns_per_clock = np.median((t[:, 30] - t[:, 31]) / np.maximum(t[:, 28] - t[:, 0], 1))
                clocks.append(1.0 / ns_per_clock)
                clk = t[:, :29]
                ns = np.where(clk == 0, np.nan, t[:, 31:32] + (clk - t[:, 0:1]) * ns_per_clock)
                runs.append((ns - np.nanmin(ns[:, 0])) / 1e3)
    print(f"SM clock from the stamps: {np.median(clocks):.2f} GHz")
    r = np.stack(runs)  # [launches, grid, 29]
    with np.errstate(all="ignore"):
        med = np.nanmedian(np.nanmedian(r, axis=1), axis=0)
        lo = np.nanmedian(np.nanmin(r, axis=1), axis=0)
        hi = np.nanmedian(np.nanmax(r, axis=1), axis=0)
    rows = [("entry", 0), ("epoch arrived", 25), ("prologue items stored", 26), ("prologue done", 1),
            ("phase 0: record read", 27), ("phase 0: weights landed", 24)]
    for p in range(pm.phases):
        pts = [(f"phase {p}: {name}", 2 + 6 * p + j) for j, name in enumerate(_POINTS)]
        if 0 < p < 3 and pm.phases <= 3:  # extra points of the 2-layer LM (slots 20..23)
            pts.insert(1, (f"phase {p}: weights landed", 18 + 2 * p))
            pts.insert(4, (f"phase {p}: input staged (all threads)", 19 + 2 * p))
        rows += pts
    rows.append(("end (after the launch epoch)", 28))
    print(f"{'point':34s} {'median':>8s} {'first':>8s} {'last':>8s} {'gap':>8s}  (us from the first CTA's start; "
          "gap: from the point above, the same CTA, median)")
    prev = None
    for name, e in rows:
        with np.errstate(all="ignore"):
            gap = np.nanmedian(r[:, :, e] - r[:, :, prev]) if prev is not None else 0.0
        print(f"{name:34s} {med[e]:8.2f} {lo[e]:8.2f} {hi[e]:8.2f} {gap:8.2f}")
        prev = e


if __name__ == "__main__":
    main()
