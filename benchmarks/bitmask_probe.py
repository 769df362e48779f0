"""Probe: the bitmask kernel against the offsets kernel, dense cuBLAS and a plain read, on LLM linears.

python3 benchmarks/bitmask_probe.py [--shapes 8b|1b] [--layers gate/up,down] [--x-own] [--ctas-per-sm 3] [--dtype float16] [--batch 1,4,16] [--defines A=1,B=2] [--walk 5|6|7]
Per shape x sparsity (balanced, 32 blocks) and N:M: graph-replayed per-launch us (hot, 20 launches
per graph) of the bitmask kernel, the offsets kernel (BalancedLinear defaults), torch dense (cuBLAS)
and a plain read of the bitmask kernel's bytes; with --cold also eager per-launch medians over rotating
copies (> 4.5x L2) of the bitmask kernel, the read and dense; the ratios dense / bitmask and read /
bitmask (hot). Prints one line per case.
"""
from __future__ import annotations

import argparse
import functools
import json
import sys

import torch

from balprune.formats.balanced import BalancedTensor
from balprune.patterns.balanced import balanced_offsets, geometry_for
from balprune.patterns.kinds import BalancedPattern
from balprune.runtime import BalancedLinear
from balprune.runtime._gpu import as_cupy
from balprune.runtime.bitmask import BitmaskLinear
from balprune.runtime.measure import Timer, copies_for
from balprune.runtime.nm24 import Nm24Linear

SHAPES = {"8b": {"q/o": (4096, 4096), "k/v": (1024, 4096), "gate/up": (14336, 4096), "down": (4096, 14336)},
          "1b": {"q/o": (2048, 2048), "k/v": (512, 2048), "gate/up": (8192, 2048), "down": (2048, 8192)}}
CONFIGS = {"50%": BalancedPattern(0.5, blocks=32), "70%": BalancedPattern(0.7, blocks=32),
           "80%": BalancedPattern(0.8, blocks=32), "2:4": BalancedPattern(0.5, blocks=None, block_size=4),
           "4:8": BalancedPattern(0.5, blocks=None, block_size=8)}


def operator(bt, defines, walk, x_own: bool, ctas_per_sm: int = 0) -> BitmaskLinear:
    """The bitmask operator under test; ``x_own``: its plan stages x in the 16-bit type wherever that fits;
    ``ctas_per_sm``: its grid capped at that many CTAs an SM (experiments of this probe: the runtime's rules are
    BitmaskLinear.plan and its launch configuration's occupancy bound)."""
    op = BitmaskLinear.from_tensor(bt, validate=False, defines=defines, **walk)
    if ctas_per_sm:
        config = op._launch_config

        def capped_config(batch: int) -> dict:
            cfg = config(batch)
            grid = min(cfg["grid"][0], op.info.multiprocessors * ctas_per_sm)
            return {**cfg, "grid": (grid, cfg["grid"][1]), "ctas_per_sm": min(cfg["ctas_per_sm"], ctas_per_sm)}

        op._launch_config = capped_config
    if x_own and op.dtype != "float32":
        plan = op.plan

        def own_plan(batch: int) -> tuple[int, bool]:
            nb, _ = plan(batch)
            return nb, True

        op.plan = own_plan
    return op


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="8b")
    ap.add_argument("--layers", default="", help="a comma list of the shapes' layers (q/o, k/v, gate/up, down); default all")
    ap.add_argument("--dtype", default="float16")
    ap.add_argument("--batch", default="1")
    ap.add_argument("--configs", default=",".join(CONFIGS))
    ap.add_argument("--defines", default="")
    ap.add_argument("--walk", type=int, default=None, help="the bitmask kernel's walk (runtime.bitmask.WALKS)")
    ap.add_argument("--json", default="")
    ap.add_argument("--cold", action="store_true")
    ap.add_argument("--x-own", action="store_true",
                    help="stage x in the layer's own 16-bit type at batch tile 1 too (the runtime stages fp32 where it "
                         "fits: fp32 x of K = 14336 takes 56 KB a CTA)")
    ap.add_argument("--ctas-per-sm", type=int, default=0,
                    help="cap the bitmask kernel's grid at this many CTAs an SM (fewer warps, each with a longer run)")
    a = ap.parse_args()
    if a.ctas_per_sm < 0:
        ap.error("--ctas-per-sm is a count of CTAs (0: the runtime's grid)")
    dt = getattr(torch, a.dtype)
    defines = tuple(d for d in a.defines.split(",") if d)
    timer = Timer(0)
    l2 = timer.info.l2_bytes if hasattr(timer.info, "l2_bytes") else 50 << 20
    rows_out = []
    for lname, (R, K) in SHAPES[a.shapes].items():
        if a.layers and lname not in a.layers.split(","):
            continue
        w = (torch.randn(R, K, generator=torch.Generator().manual_seed(R + K)) * 0.02).to(dt)
        wd = w.cuda()
        for cname in a.configs.split(","):
            pat = CONFIGS[cname]
            g = geometry_for(R, K, pat)
            bt = BalancedTensor.from_offsets(w, pat, balanced_offsets(w, g, dtype=g.index_dtype))
            walk = {} if a.walk is None else {"walk": a.walk}
            bm = operator(bt, defines, walk, a.x_own, a.ctas_per_sm)
            off = BalancedLinear.from_tensor(bt, validate=False)
            # 2:4 also runs on the sparse tensor cores (kernels/nm24_sparse_mma.cu)
            nm = Nm24Linear.from_tensor(bt, validate=False) if cname == "2:4" else None
            for batch in (int(b) for b in a.batch.split(",")):
                x = torch.randn(*((K,) if batch == 1 else (K, batch)), device="cuda").to(dt)
                xc = as_cupy(x)
                yb = as_cupy(torch.empty(*((R,) if batch == 1 else (R, batch)), device="cuda", dtype=dt))
                yo = as_cupy(torch.empty_like(torch.empty(*((R,) if batch == 1 else (R, batch)), device="cuda", dtype=dt)))
                fb = bm.prepared_launch(xc, yb, batch)
                fo = off.prepared_launch(xc, yo, batch)
                yn = as_cupy(torch.empty(*((R,) if batch == 1 else (R, batch)), device="cuda", dtype=dt))
                fn = nm.prepared_launch(xc, yn, batch) if nm is not None else None
                fb()
                fo()
                if fn is not None:
                    fn()
                ref = (bt.to_dense().to(torch.float64) @ x.cpu().to(torch.float64).reshape(K, -1)).reshape(yb.shape)
                got = torch.from_dlpack(yb).cpu().to(torch.float64) if dt != torch.bfloat16 else None
                err = float((got - ref).norm() / ref.norm()) if got is not None else float("nan")
                if fn is not None:
                    gn = torch.from_dlpack(yn).cpu().to(torch.float64)
                    res_err_nm24 = float((gn - ref).norm() / ref.norm())
                xm = x if batch > 1 else x.view(K, 1)
                out = torch.empty(R, xm.shape[1], device="cuda", dtype=dt)
                fd = functools.partial(torch.mm, wd, xm, out=out)
                fr = timer.read_launch(bm.weight_bytes)
                res = {}
                peers = [("bitmask", fb), ("offsets", fo), ("dense", fd), ("read", fr)]
                if fn is not None:
                    peers.append(("nm24", fn))
                for label, f in peers:
                    res[label] = timer.graph_time([f]).median_us
                if fn is not None:
                    res["nm24_rel_err"] = res_err_nm24
                    res["nm24_read"] = timer.graph_time([timer.read_launch(nm.weight_bytes)]).median_us
                if a.cold:
                    n = copies_for(bm.weight_bytes, l2)
                    bms = [operator(bt, defines, walk, a.x_own, a.ctas_per_sm) for _ in range(n)]
                    res["bitmask_cold"] = timer.time([o.prepared_launch(xc, yb, batch) for o in bms]).median_us
                    res["read_cold"] = timer.time([timer.read_launch(bm.weight_bytes) for _ in range(n)]).median_us
                    del bms
                    wds = [wd.clone() for _ in range(copies_for(wd.numel() * wd.element_size(), l2))]
                    res["dense_cold"] = timer.time([functools.partial(torch.mm, wc, xm, out=out) for wc in wds]).median_us
                    del wds
                    if nm is not None:
                        nms = [Nm24Linear.from_tensor(bt, validate=False) for _ in range(n)]
                        res["nm24_cold"] = timer.time([o.prepared_launch(xc, yn, batch) for o in nms]).median_us
                        del nms
                line = {"layer": lname, "shape": [R, K], "config": cname, "batch": batch, "dtype": a.dtype,
                        "bitmask_bytes": bm.weight_bytes, "offsets_bytes": off.weight_bytes, "dense_bytes": R * K * w.element_size(),
                        "rel_err": err, "g": bm.segments.g, "lanes": bm.segments.lanes, **{k: (v if k.endswith('err') else round(v, 2)) for k, v in res.items()}}
                line["dense/bitmask"] = round(res["dense"] / res["bitmask"], 2)
                line["dense/offsets"] = round(res["dense"] / res["offsets"], 2)
                line["read/bitmask"] = round(res["read"] / res["bitmask"], 2)
                rows_out.append(line)
                print(json.dumps(line), flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows_out, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
