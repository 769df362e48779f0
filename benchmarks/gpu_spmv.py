"""Batch-1 (and small-batch) timing of the balanced kernel against dense cuBLAS and cuSPARSE CSR.

Usage (on a GPU machine, from the repository root):
    PYTHONPATH=src python3 benchmarks/gpu_spmv.py --out DIR

Everything runs in one process on one stream: the read-bandwidth ceiling (a streaming reduce
kernel) and copy bandwidth, then the 16384 x 8192 matrix at 90% balanced sparsity (B = 32,
L = 256, k = 26): our kernel (several variants), dense torch.mv and CuPy matmul (fp32, fp16),
cuSPARSE CSR through cupyx and torch (fp32). Every kernel passes a float64 correctness gate
before it is timed.

Timing: CUDA events around every launch, all launches queued behind a long spin kernel so the
host never starves the GPU; warm-up first; median and p10/p90 of 200 launches. "cold" rotates
through weight copies totalling > 4.5x the L2 size; "hot" reuses one copy. A back-to-back
average (two events around all 200 launches) is reported too. Bytes counted for our kernel:
values + indices (as stored on the device) + x + y.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import sys
import traceback
from pathlib import Path

import numpy as np
import torch

from balprune.runtime.measure import Timer

ITERS = 200


class Bench(Timer):
    """The library's timer (balprune.runtime.measure: the one timing function), returning dicts for printing."""

    def __init__(self, cp) -> None:
        super().__init__(0)

    def time(self, fns, iters=ITERS, warmup=10) -> dict:
        return dataclasses.asdict(super().time(fns, iters=iters, warmup=warmup))


def copies_for(nbytes: int, l2: int) -> int:
    return max(1, math.ceil(4.5 * l2 / max(1, nbytes)))


def balanced_random(R: int, K: int, B: int, sparsity: float, seed: int):
    """(geometry, values fp32 [R,k,B] GPU, indices [R,k,B] CPU, pruned dense fp32 [R,K] GPU, full W GPU).

    Balanced pruning by per-block top-k of |W| (ties have probability zero with random data).
    """
    from balprune.patterns.balanced import geometry_for
    from balprune.patterns.kinds import BalancedPattern

    g = geometry_for(R, K, BalancedPattern(sparsity, blocks=B))
    gen = torch.Generator(device="cuda").manual_seed(seed)
    w = torch.randn(R, K, device="cuda", generator=gen)
    wp = torch.nn.functional.pad(w, (0, g.padded_width - K)).view(R, g.blocks, g.block_length)
    score = wp.abs()
    if g.padded_width != K:  # padding ranks last
        score[:, -1, K - (g.blocks - 1) * g.block_length:] = -1.0
    top = score.topk(g.keep, dim=-1).indices.sort(dim=-1).values  # [R, B, k]
    vals = torch.gather(wp, -1, top)
    dense = torch.zeros_like(wp).scatter_(-1, top, vals).view(R, g.padded_width)[:, :K].contiguous()
    values = vals.permute(0, 2, 1).contiguous()
    indices = top.permute(0, 2, 1).to(torch.int32).cpu().to(g.index_dtype).contiguous()  # host, uint8/uint16
    return g, values, indices, dense, w


def gate(y, ref64: torch.Tensor, absdot: torch.Tensor, dtype: torch.dtype, n_terms: int, what: str) -> float:
    """Correctness gate before timing: elementwise bound and relative norm (as tests/gpu documents)."""
    u = {torch.float32: 2.0**-24, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}[dtype]
    rel_max = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]
    y64 = y.to(torch.float64).reshape(ref64.shape)
    tiny = 2.0**-24 if dtype == torch.float16 else 1e-30
    tol = u * ref64.abs() + n_terms * 2.0**-24 * absdot + tiny
    ok = bool(torch.isfinite(y64).all()) and bool(((y64 - ref64).abs() <= tol).all())
    rel = float(torch.linalg.norm(y64 - ref64) / torch.linalg.norm(ref64))
    if not ok or rel >= rel_max:
        raise AssertionError(f"{what}: correctness gate failed (rel {rel:.3e}, elementwise ok {ok})")
    return rel


def as_torch_bits(cp, arr, dtype):
    return torch.from_dlpack(arr.view(cp.int16)).view(torch.bfloat16) if dtype == torch.bfloat16 \
        else torch.from_dlpack(arr)


def clone_op(op):
    c = copy.copy(op)
    c.values_dev = op.values_dev.copy()
    c.indices_dev = op.indices_dev.copy()
    return c


def raw_launcher(op, x_cp, y_cp, batch: int):
    """A closure launching op's kernel with pre-built arguments (no per-call Python checks)."""
    return op.prepared_launch(x_cp, y_cp, batch)


def graph_time(cp, fns, reps: int = 20) -> dict:
    """Per-kernel time (us) from CUDA-graph replays of len(fns) launches (the library timer's graph_time)."""
    t = _graph_timer().graph_time(fns, reps)
    return {"graph_median_us": t.median_us, "graph_min_us": t.p10_us, "launches": len(fns)}


_TIMER = None


def _graph_timer() -> Timer:
    global _TIMER
    if _TIMER is None:
        _TIMER = Timer(0)
    return _TIMER


def make_main(dtype):
    """The 16384 x 8192, 90%, B = 32 problem in ``dtype``: (g, host values, host indices, dense pruned, x, full W)."""
    global _MAIN
    if _MAIN is None:
        _MAIN = balanced_random(16384, 8192, 32, 0.9, seed=0)
    g, values32, indices, dense32, w_full = _MAIN
    gen = torch.Generator(device="cuda").manual_seed(123)
    x = torch.randn(g.cols, device="cuda", generator=gen).to(dtype)
    return g, values32.to(dtype).cpu(), indices, dense32.to(dtype), x, w_full


_MAIN = None


def probe(cp) -> int:
    """Each kernel of interest launched twice, for ncu (run under `ncu -k regex:...`)."""
    from balprune.runtime import BalancedLinear

    for dtype in (torch.float16, torch.float32):
        g, hv, hi, dense_p, x, w_full = make_main(dtype)
        x_cp = cp.from_dlpack(x)
        for kw in ({"threads": 1024}, {"threads": 1024, "pipeline": False}):
            op = BalancedLinear(hv, hi, cols=g.cols, block_length=g.block_length, validate=False, **kw)
            y = cp.empty((g.rows,), dtype=x_cp.dtype)
            f = op.prepared_launch(x_cp, y, 1)
            f()
            f()
        wd = w_full.to(dtype)
        torch.mv(wd, x)
        torch.mv(wd, x)
    torch.cuda.synchronize()
    return 0


def ceilings(cp, bench: Bench, record) -> None:
    """Read bandwidth (streaming reduce over 4 GiB) and device-to-device copy bandwidth (2 GiB)."""
    nbytes = 4 << 30
    buf = cp.random.random(nbytes // 4, dtype=cp.float32)
    grid = bench.info.multiprocessors * 8
    sink = cp.empty(grid * 256, dtype=cp.float32)
    n4 = np.int64(nbytes // 16)
    record("read_reduce_4GiB", bench.time([lambda: bench.read_k((grid,), (256,), (buf, n4, sink))], iters=30,
                                          warmup=3), nbytes)
    ref_sum = float(cp.sum(buf, dtype=cp.float64))
    got = float(cp.sum(sink, dtype=cp.float64))
    assert abs(got - ref_sum) <= 1e-3 * abs(ref_sum), (got, ref_sum)
    a_t = torch.empty(nbytes // 8, dtype=torch.float32, device="cuda").uniform_()
    b_t = torch.empty_like(a_t)
    record("copy_d2d_2GiB", bench.time([lambda: b_t.copy_(a_t)], iters=30, warmup=3), 2 * (nbytes // 2),
           "bytes = read + write")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=Path("."))
    ap.add_argument("--quick", action="store_true", help="main matrix only, fewer variants")
    ap.add_argument("--probe", action="store_true", help="launch each kernel twice and exit (for ncu)")
    a = ap.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)

    import cupy as cp
    import cupyx.scipy.sparse as cps

    from balprune.runtime import BalancedLinear

    torch.cuda.init()
    stream = torch.cuda.current_stream()
    cp.cuda.ExternalStream(stream.cuda_stream).use()  # cupy and torch launch on one stream
    if a.probe:
        return probe(cp)
    bench = Bench(cp)
    info = bench.info
    res: dict = {"device": dataclasses.asdict(info), "torch": torch.__version__, "cupy": cp.__version__,
                 "iters": ITERS, "timings": {}, "errors": [], "gates": {}}
    T = res["timings"]

    def record(key, t, nbytes=None, note=""):
        if nbytes is not None:
            t["bytes"] = int(nbytes)
            t["gbps"] = nbytes / (t["median_us"] * 1e-6) / 1e9
        t["note"] = note
        T[key] = t
        print(f"  {key:58s} {t['median_us']:9.2f} us  (p10 {t['p10_us']:.2f}, p90 {t['p90_us']:.2f}, "
              f"b2b {t['stream_avg_us']:.2f}, host {t['host_enqueue_us']:.1f}, covered {t['spin_covered']})"
              + (f"  {t['gbps']:.0f} GB/s" if nbytes else ""), flush=True)

    # ---- 1. ceilings ------------------------------------------------------------------------
    print(f"device: {info}", flush=True)
    ceilings(cp, bench, record)
    read_gbps = T["read_reduce_4GiB"]["gbps"]
    torch.cuda.empty_cache()
    cp.get_default_memory_pool().free_all_blocks()
    res["read_gbps"] = read_gbps
    print(f"read ceiling {read_gbps:.0f} GB/s, L2 {info.l2_bytes / 2**20:.0f} MiB", flush=True)
    # The measurement floor: a one-thread kernel that returns at once.
    empty = [lambda: bench.spin_k((1,), (1,), (np.int64(0), bench.flag))]
    record("empty_kernel", bench.time(empty))
    try:
        res["graph"] = {"empty_kernel": graph_time(cp, empty * 20)}
    except Exception as e:
        traceback.print_exc()
        res["errors"].append(f"graph empty: {type(e).__name__}: {e}")

    # ---- 2. the main matrix -----------------------------------------------------------------
    summary = {}
    res.setdefault("graph", {})
    for dtype in (torch.float32, torch.float16):
        dn = str(dtype).split(".")[-1]
        g, host_vals, host_idx, dense_p, x, w_full = make_main(dtype)
        R, K = g.rows, g.cols
        print(f"main matrix: {g}", flush=True)
        ref = dense_p.double() @ x.double()
        absdot = dense_p.double().abs() @ x.double().abs()
        n_terms = g.keep * g.blocks
        x_cp = cp.from_dlpack(x)

        # dense baselines (the full random matrix; dense time does not depend on the values)
        wd = w_full.to(dtype)
        wds = [wd] + [wd.clone() for _ in range(copies_for(wd.numel() * wd.element_size(), info.l2_bytes) - 1)]
        dbytes = wd.numel() * wd.element_size() + (K + R) * x.element_size()
        yt = torch.mv(wds[0], x)
        record(f"dense_torch_mv_{dn}_cold", bench.time([lambda w=w, x=x: torch.mv(w, x) for w in wds]), dbytes)
        record(f"dense_torch_mv_{dn}_hot", bench.time([lambda wd=wd, x=x: torch.mv(wd, x)]), dbytes)
        wcs = [cp.from_dlpack(w) for w in wds]
        record(f"dense_cupy_matmul_{dn}_cold", bench.time([lambda w=w, x_cp=x_cp: w @ x_cp for w in wcs]), dbytes)
        # (cuBLAS calls cannot be captured into a graph through CuPy: no graph figure for dense)
        del wds, wcs, yt
        if dtype == torch.float32:
            try:
                csr = cps.csr_matrix(cp.from_dlpack(dense_p))
                nnz = int(csr.nnz)
                cbytes = nnz * 8 + (R + 1) * 4 + (K + R) * 4
                y_csr = csr @ x_cp
                res["gates"]["csr_cupyx_float32"] = gate(torch.from_dlpack(y_csr), ref, absdot, dtype, n_terms, "csr")
                csrs = [csr] + [csr.copy() for _ in range(copies_for(cbytes, info.l2_bytes) - 1)]
                record("csr_cupyx_float32_cold", bench.time([lambda c=c, x_cp=x_cp: c @ x_cp for c in csrs]), cbytes,
                       f"nnz {nnz}")
                record("csr_cupyx_float32_hot", bench.time([lambda csr=csr, x_cp=x_cp: csr @ x_cp]), cbytes, f"nnz {nnz}")
                tcsr = dense_p.to_sparse_csr()
                tcsrs = [tcsr] + [tcsr.clone() for _ in range(len(csrs) - 1)]
                res["gates"]["csr_torch_float32"] = gate(torch.mv(tcsr, x), ref, absdot, dtype, n_terms, "tcsr")
                record("csr_torch_float32_cold", bench.time([lambda c=c, x=x: torch.mv(c, x) for c in tcsrs]), cbytes)
                del csr, csrs, tcsr, tcsrs
            except Exception as e:
                traceback.print_exc()
                res["errors"].append(f"csr: {type(e).__name__}: {e}")

        # small batches (SpMM), x [K, N], cold, against dense torch.mm
        if not a.quick:
            for n in (3, 8):
                try:
                    op = BalancedLinear(host_vals, host_idx, cols=K, block_length=g.block_length, validate=False)
                    xb = torch.randn(K, n, device="cuda").to(dtype)
                    yb = op(xb)
                    refb = dense_p.double() @ xb.double()
                    gate(yb, refb, dense_p.double().abs() @ xb.double().abs(), dtype, n_terms, f"spmm{n}")
                    xb_cp = cp.from_dlpack(xb)
                    ops = [op] + [clone_op(op) for _ in range(copies_for(op.weight_bytes, info.l2_bytes) - 1)]
                    ys = [cp.empty((R, n), dtype=xb_cp.dtype) for _ in ops]
                    nb = op.weight_bytes * math.ceil(n / op.plan(n)[0]) + (K + R) * n * x.element_size()
                    record(f"balanced_{dn}_batch{n}_cold", bench.time([raw_launcher(o, xb_cp, yy, n)
                                                                      for o, yy in zip(ops, ys)]), nb,
                           f"plan {op.plan(n)}")
                    wd2 = [w_full.to(dtype), w_full.to(dtype)]
                    record(f"dense_torch_mm_{dn}_batch{n}_cold", bench.time([lambda w=w, xb=xb: w @ xb for w in wd2]))
                    del ops, ys, wd2
                except Exception as e:
                    traceback.print_exc()
                    res["errors"].append(f"spmm {n}: {type(e).__name__}: {e}")
        # (name, BalancedLinear options); "diag" variants compute wrong results on purpose
        # (kernels/balanced_spmv.cu, BP_DIAG) and skip the correctness gate.
        # balanced_spmm first, then the pipelined variants (the default first among them).
        variants = [("regs_t1024", {"threads": 1024, "pipeline": False}), ("tma_t1024", {"threads": 1024}),
                    ("tma_t1024_w8", {"threads": 1024, "team_warps": 8}),
                    ("tma_t1024_w16", {"threads": 1024, "team_warps": 16}), ("tma_t512", {"threads": 512}),
                    ("diag1_tma_nocompute", {"threads": 1024, "defines": ("BP_DIAG=1",)}),
                    ("diag2_tma_nocopy", {"threads": 1024, "defines": ("BP_DIAG=2",)})]
        if a.quick:
            variants = variants[:1]
        best = None
        validated = False
        for vname, kw in variants:
            key = f"balanced_{dn}_{vname}"
            try:
                op = BalancedLinear(host_vals, host_idx, cols=K, block_length=g.block_length,
                                    validate=not validated, **kw)
                validated = True
                y_cp = cp.full((R,), np.nan, dtype=x_cp.dtype)
                launch = raw_launcher(op, x_cp, y_cp, 1)
                launch()
                diag = vname.startswith("diag")
                if not diag:
                    res["gates"][key] = gate(torch.from_dlpack(y_cp), ref, absdot, dtype, n_terms, key)
                    y_wrapped = op(x)  # the public call path on a torch tensor
                    gate(y_wrapped, ref, absdot, dtype, n_terms, key + " (wrapper)")
                cfg = op.launch_config(1)
                nb = op.weight_bytes + K * x.element_size() + R * x.element_size()
                note = (f"grid {cfg['grid']} block {cfg['block']} smem {cfg['shared_mem']} "
                        f"regs {cfg['kernel'].num_regs} ctas/SM {cfg['ctas_per_sm']} pipelined {cfg['pipelined']} "
                        f"group {cfg.get('group_rows')} stages {cfg.get('stages')}")
                if dtype == torch.float16 and vname == "tma_t1024":
                    res["default_plan"] = op.pipeline_plan()
                print(f"{key}: {note}", flush=True)
                hot = bench.time([launch])
                record(key + "_hot", hot, nb, note)
                ops = [op] + [clone_op(op) for _ in range(copies_for(op.weight_bytes, info.l2_bytes) - 1)]
                ys = [cp.empty((R,), dtype=x_cp.dtype) for _ in ops]
                cold = bench.time([raw_launcher(o, x_cp, yy, 1) for o, yy in zip(ops, ys)])
                record(key + "_cold", cold, nb, note)
                try:
                    gt = graph_time(cp, [raw_launcher(o, x_cp, yy, 1) for o, yy in zip(ops, ys)] * 3)
                    res["graph"][key + "_cold"] = gt
                    print(f"  {key + '_cold graph':58s} {gt['graph_median_us']:9.2f} us per launch (CUDA graph)")
                except Exception as e:
                    res["errors"].append(f"graph {key}: {type(e).__name__}: {e}")
                if diag:
                    del ops, ys
                    continue
                for yy in ys:  # every copy computed the same, right answer
                    gate(torch.from_dlpack(yy), ref, absdot, dtype, n_terms, key + " (copy)")
                if vname == "tma_t1024":
                    t_wrap = bench.time([lambda op=op, x_cp=x_cp, y_cp=y_cp: op(x_cp, out=y_cp)], iters=50)
                    record(key + "_wrapper_hot", t_wrap, nb, "public __call__ incl. Python checks")
                if best is None or cold["median_us"] < T[best + "_cold"]["median_us"]:
                    best = key
                del ops, ys
                cp.get_default_memory_pool().free_all_blocks()
            except Exception as e:
                traceback.print_exc()
                res["errors"].append(f"{key}: {type(e).__name__}: {e}")
        summary[dn] = {"best": best}
        del wd
        torch.cuda.empty_cache()
        cp.get_default_memory_pool().free_all_blocks()

    # ---- 3. other shapes (cold, batch 1) --------------------------------------------------------
    if not a.quick:
        global _MAIN
        _MAIN = None
        del dense_p, w_full
        torch.cuda.empty_cache()
        for (R2, K2) in ((4096, 25088), (4096, 4096), (6000, 1500)):
            try:
                g2, v2, i2, d2, w2 = balanced_random(R2, K2, 32, 0.9, seed=1)
                for dtype in (torch.float32, torch.float16):
                    dn = str(dtype).split(".")[-1]
                    x = torch.randn(K2, device="cuda").to(dtype)
                    dp = d2.to(dtype)
                    op = BalancedLinear(v2.to(dtype).cpu(), i2, cols=K2, block_length=g2.block_length)
                    y = op(x)
                    gate(y, dp.double() @ x.double(), dp.double().abs() @ x.double().abs(), dtype,
                         g2.keep * g2.blocks, f"{R2}x{K2}")
                    x_cp = cp.from_dlpack(x)
                    ops = [op] + [clone_op(op) for _ in range(copies_for(op.weight_bytes, info.l2_bytes) - 1)]
                    ys = [cp.empty((R2,), dtype=x_cp.dtype) for _ in ops]
                    nb = op.weight_bytes + (K2 + R2) * x.element_size()
                    record(f"balanced_{dn}_{R2}x{K2}_L{g2.block_length}_k{g2.keep}_cold",
                           bench.time([raw_launcher(o, x_cp, yy, 1) for o, yy in zip(ops, ys)]), nb,
                           f"smem {op.launch_config(1)['shared_mem']}")
                    wd = w2.to(dtype)
                    wds = [wd] + [wd.clone() for _ in range(copies_for(wd.numel() * wd.element_size(),
                                                                       info.l2_bytes) - 1)]
                    record(f"dense_torch_mv_{dn}_{R2}x{K2}_cold", bench.time([lambda w=w, x=x: torch.mv(w, x) for w in wds]),
                           wd.numel() * wd.element_size())
                    if dtype == torch.float32:
                        tcsr = dp.to_sparse_csr()
                        tcsrs = [tcsr] + [tcsr.clone() for _ in range(len(ops) - 1)]
                        record(f"csr_torch_float32_{R2}x{K2}_cold", bench.time([lambda c=c, x=x: torch.mv(c, x) for c in tcsrs]))
                    del ops, ys, wds
                    cp.get_default_memory_pool().free_all_blocks()
            except Exception as e:
                traceback.print_exc()
                res["errors"].append(f"shape {R2}x{K2}: {type(e).__name__}: {e}")

    # ---- 4. summary -------------------------------------------------------------------------------
    print("\n==== summary (16384 x 8192, 90% balanced, batch 1, cold unless noted; median of 200) ====")
    print(f"read ceiling {read_gbps:.0f} GB/s (bp_read_reduce, 4 GiB)")
    for dn in ("float32", "float16"):
        best = summary.get(dn, {}).get("best")
        if best is None:
            print(f"{dn}: no balanced timing")
            continue
        tb = T[best + "_cold"]
        dense = T.get(f"dense_torch_mv_{dn}_cold", {}).get("median_us", float("nan"))
        dense_cp = T.get(f"dense_cupy_matmul_{dn}_cold", {}).get("median_us", float("nan"))
        line = (f"{dn}: best {best}: {tb['median_us']:.2f} us cold ({T[best + '_hot']['median_us']:.2f} hot), "
                f"{tb['gbps']:.0f} GB/s = {100 * tb['gbps'] / read_gbps:.1f}% of read; "
                f"dense torch.mv {dense:.1f} us -> {dense / tb['median_us']:.2f}x; cupy matmul {dense_cp:.1f} us "
                f"-> {dense_cp / tb['median_us']:.2f}x")
        if dn == "float32":
            for c in ("csr_cupyx_float32_cold", "csr_torch_float32_cold"):
                if c in T:
                    line += f"; {c} {T[c]['median_us']:.1f} us -> {T[c]['median_us'] / tb['median_us']:.2f}x"
        print(line)
        summary[dn].update({"balanced_cold_us": tb["median_us"], "pct_of_read": 100 * tb["gbps"] / read_gbps,
                            "speedup_vs_dense_torch": dense / tb["median_us"]})
    res["summary"] = summary
    print("errors:", res["errors"] or "none")
    (a.out / "results.json").write_text(json.dumps(res, indent=1, default=str))
    return 1 if res["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
