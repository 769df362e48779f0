"""Where the persistent LM token step's time goes (kernels/lstm_lm_step.cu), on the paper-sized
model: the step as built, then the same launch compiled with BP_LM_DIAG (1: no arithmetic,
2: no weight copies, 3: neither), with no phases at all (launch + epoch only) and with the
first 1 or 2 phases only, each timed
as CUDA-graph replays (hot). Results of the DIAG builds are wrong by design; only times matter.

    python benchmarks/diag_lm_step.py PACKED.safetensors [--dtype float16]
"""

from __future__ import annotations

import argparse

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("packed")
    ap.add_argument("--dtype", default="float16")
    a = ap.parse_args()
    from balprune.runtime._launch import prepared
    from balprune.runtime.kernels import load_module
    from balprune.runtime.model import load_model
    from balprune.runtime.model.stages import cupy_on_torch_stream, measure_us

    rt = load_model(a.packed, dtype=a.dtype, paths="sparse", measure=False)
    pm = rt.persistent
    print(f"grid {pm.grid}, regions {pm.regions}, region {pm.region_bytes} B, smem {pm.shared_bytes} B, "
          f"weights {pm.weight_bytes / 1e6:.1f} MB, lpr {pm.lpr}")
    nm = pm.kernel_name
    for threads, lpr in ((1024, 32), (1024, 16)):
        for diag in (0, 1, 2, 3, "empty", "1 phase", "2 phases"):
            defines = (f"BP_LM_DIAG={diag}",) if isinstance(diag, int) and diag else ()
            fn = load_module("lstm_lm_step.cu", (nm,), device=0, defines=defines).get_function(nm)
            fn.max_dynamic_shared_size_bytes = pm.shared_bytes
            phases = {"empty": 0, "1 phase": 1, "2 phases": 2}.get(diag, pm.phases)
            args = (np.uint64(pm.desc.data_ptr()), np.int32(phases), np.int32(pm.regions),
                    np.uint32(pm.region_bytes), np.int32(pm.xcap), np.int32(pm.ucap), np.int32(pm.hcap),
                    np.uint64(pm.ctl.data_ptr()), np.int32(min(lpr, pm.lpr)))
            launch = prepared(fn, (pm.grid,), (threads,), args, pm.shared_bytes, cooperative=True)
            with cupy_on_torch_stream():
                launch()
                us = measure_us(launch, reps=50)
            print(f"threads {threads:5d} lanes/row {lpr:2d} diag {diag!s:8s} {us:7.2f} us")


if __name__ == "__main__":
    main()
