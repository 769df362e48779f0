"""``balprune bench PACKED --model``: end-to-end batch-1 latency of a packed model against dense torch.

For each dtype, in one process on one GPU: balprune's model runtime (runtime.model, every layer
on the path its dispatcher measured fastest) and the dense masked model in torch (cuBLAS/cuDNN,
the same weights with zeros; a vision model's with cuDNN's benchmark mode on and in the faster of
NCHW and channels-last; float32 in IEEE float32 for every runner, torch's default TF32 off, ``meta["model"]["dtypes"][d]["torch_layout"]``), both first checked against the float32 reference outputs
(runtime.measure.relative_error within MODEL_TOLERANCE, README "Tolerance contract": a runner
outside it is reported and not timed; only balprune's runner failing makes ``bench`` fail), then timed per unit
of work (lstm-lm: one token step; ctc-bilstm: one utterance; vgg: one image) eagerly and
replayed from a CUDA graph, hot (back to back, as a server runs it) and cold (L2 flushed by a
read of 4x its size before each unit, outside the timed interval).

Report (schema balprune.bench/2, so ``compare`` works on it): one measurement per (runner,
dtype, mode, graph) with layer "model" and kernel "balprune" or "torch"; one per layer and
measured path (kernel "balanced" / "bsr" / "dense", hot, graph: the dispatcher's figures);
``meta["model"]`` holds the architecture, the unit, each dtype's dispatch decisions and errors,
and the paper's figures for the same workload.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from pathlib import Path

import torch

from ..errors import GpuRuntimeError
from ..runtime.measure import MODEL_TOLERANCE, Timing, capture_graph, exact_float32, relative_error
from .peers import quiet_libraries
from .report import BenchReport, Measurement, is_model_unit
from .run import Session

Progress = Callable[[str], None]

#: The paper's end-to-end figures (Yao et al. 2019, read from ../shared/paper-notes.md): us per unit.
PAPER = {
    "lstm-lm": {"workload": "PTB LSTM LM 2x1500, 80%", "dense_us": 294.1, "balanced_us": 120.2},
    "ctc-bilstm": {"workload": "TIMIT Bi-LSTM 1024, 87.5%", "dense_us": 117.9, "balanced_us": 83.9},
    "vgg16": {"workload": "VGG-16 ImageNet, 92%", "dense_us": 6814.0, "balanced_us": 5213.0,
              "layers": {"classifier.0.weight": {"dense_us": 980.0, "balanced_us": 231.0}}},
}
#: The report code of each runtime dtype.
DTYPE_CODE = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}


def _torch_runner(module, arch, inputs: dict, dev) -> Callable[[], torch.Tensor]:
    """One unit of work of the dense torch model on static inputs (state carried for the LM)."""
    if arch.kind == "lstm-lm":
        module.lstm.flatten_parameters()
        tok = inputs["tokens"].reshape(-1)[:1].reshape(1, 1).to(dev)
        p = next(module.parameters())
        h = torch.zeros(arch.layers, 1, arch.hidden, device=dev, dtype=p.dtype)
        c = torch.zeros_like(h)

        def step():
            out, (h1, c1) = module.lstm(module.embedding(tok), (h, c))
            logits = module.decoder(out)
            h.copy_(h1)
            c.copy_(c1)
            return logits
        return step
    if arch.kind == "ctc-bilstm":
        module.lstm.flatten_parameters()
        frames = inputs["frames"].to(dev, next(module.parameters()).dtype)[:, None, :].contiguous()
        return lambda: module(frames)
    image = inputs["image"].to(dev, next(module.parameters()).dtype)[None].contiguous()
    return lambda: module(image)


def _faster_layout(module, arch, inputs: dict, dev, timer) -> tuple[Callable[[], torch.Tensor], dict]:
    """The dense torch runner of a vision model in the memory layout cuDNN runs faster at batch 1: NCHW
    (``module`` as it is) or channels-last (a copy), each timed hot and eager after a warm-up in which
    cuDNN's benchmark mode (on for the whole vision bench: _cudnn_benchmark) picked its algorithms.
    Returns the runner and ``{"layout": the faster, "eager_hot_us": {layout: median}}`` for the report."""
    import copy

    cl = copy.deepcopy(module).to(memory_format=torch.channels_last)
    image_cl = inputs["image"].to(dev, next(module.parameters()).dtype)[None].contiguous(memory_format=torch.channels_last)
    runners = {"NCHW": _torch_runner(module, arch, inputs, dev), "channels-last": lambda: cl(image_cl)}
    times = {k: timer.time_calls(f, iters=20, warmup=5).median_us for k, f in runners.items()}
    best = min(times, key=times.get)
    return runners[best], {"layout": best, "eager_hot_us": times}


@contextlib.contextmanager
def _cudnn_benchmark(on: bool):
    """torch.backends.cudnn.benchmark set to ``on`` inside, restored after (cuDNN then times its
    algorithms per conv shape once: the dense peer and the runtime's dense path at their best)."""
    before = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = on or before
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = before


def bench_model(path: str | Path, *, dtypes: tuple[str, ...] = ("float32", "float16"),
                modes: tuple[str, ...] = ("hot", "cold"), graph: bool = True, iters: int = 100, frames: int = 50,
                device: int = 0, paths: str = "auto", progress: Progress | None = None) -> BenchReport:
    """Benchmark the packed model at ``path`` end to end (see module doc). The file is verified
    completely, its weights checked against every requested dtype's range and its architecture
    recognised first, in one pass (runtime.model.preflight: exit 4 before any GPU is looked for); then
    NoGpuError without a GPU, GpuRuntimeError on a CUDA failure."""
    from ..models import reference_module, reference_outputs, sample_inputs
    from ..runtime import _gpu
    from ..runtime._linear import TORCH_OF
    from ..runtime.measure import free_device_memory, gpu_failures
    from ..runtime.model import load_model, preflight
    from .llm import bench_llm, llm_preflight

    llm = llm_preflight(path)
    if llm is not None:  # a Llama-family file: decode latency (bench.llm); hot, graph only
        _gpu.require_device(device)
        return bench_llm(path, llm, dtypes=dtypes, iters=iters, device=device, paths=paths, progress=progress)
    checked = preflight(path, dtypes)
    pf, arch = checked
    _gpu.require_device(device)
    inputs = sample_inputs(arch, frames=frames)
    say = progress or (lambda _m: None)
    vision = arch.kind in ("vgg", "resnet")
    # float32 runners (reference, runtime, torch peer) in IEEE float32, not TF32: runtime.measure.exact_float32
    with Session(device) as s, _cudnn_benchmark(vision), exact_float32():
        report = s.new_report(str(path))
        dev = torch.device("cuda", device)
        try:
            say("float32 reference outputs")
            with quiet_libraries():  # torch's own notices (e.g. nn.LSTM's weight layout) are not ours to print
                ref_module = reference_module(pf, arch, dtype=torch.float32, device=dev)
                ref = reference_outputs(ref_module, arch, inputs)
            del ref_module
            model_meta = {"architecture": arch.name, "kind": arch.kind, "frames": frames if arch.kind == "ctc-bilstm" else None,
                          "paper": PAPER.get(arch.name), "tolerance": {d: MODEL_TOLERANCE[d] for d in dtypes}, "dtypes": {}}
            flush = s.timer.read_launch(4 * s.timer.info.l2_bytes)
            for dtype in dtypes:
                say(f"{dtype}: building the runtime (measuring each layer's paths)")
                rt = load_model(path, dtype=dtype, device=device, paths=paths, frames=frames, progress=say,
                                checked=checked)
                unit = rt.unit
                with quiet_libraries():
                    tm = reference_module(pf, arch, dtype=TORCH_OF[dtype], device=dev)
                    if vision:  # the runner timed is the one checked: its own output, in its layout
                        torch_runner, layout = _faster_layout(tm, arch, inputs, dev, s.timer)
                        torch_out = torch_runner()[0].float().cpu()
                    else:
                        torch_out = reference_outputs(tm, arch, inputs)
                        torch_runner, layout = _torch_runner(tm, arch, inputs, dev), None
                errors = {"balprune": relative_error(rt.forward(inputs), ref), "torch": relative_error(torch_out, ref)}
                rt.load_inputs(inputs)
                runners = {"balprune": rt.run, "torch": torch_runner}
                meta = {"unit": unit, "dispatch": rt.describe(), "max_rel_error": errors,
                        "weight_bytes": {"balprune": rt.weight_bytes,
                                         "torch": sum(p.numel() * p.element_size() for p in tm.parameters())},
                        "paths": {c.layer: c.path for c in rt.choices}}
                if layout is not None:
                    meta["torch_layout"] = layout
                    meta["activations"] = rt.activations  # the runtime's layout between its conv stages
                model_meta["dtypes"][dtype] = meta
                record_dispatch(report, rt.choices, dtype, s.bandwidth)
                for runner, fn in runners.items():
                    nbytes = meta["weight_bytes"][runner]
                    if not errors[runner] <= MODEL_TOLERANCE[dtype]:
                        report.measurements.append(untimed_runner(runner, dtype, nbytes, errors[runner], modes[0], False))
                        continue
                    say(f"{dtype}: timing {runner}")
                    timed: list[tuple[bool, Callable[[], object]]] = [(False, fn)]
                    # torch's notices are silenced around its runner's capture and timing calls,
                    # never inside the timed call itself (the timed code path is the same).
                    quiet = quiet_libraries if runner == "torch" else contextlib.nullcontext
                    if graph:
                        try:
                            if runner == "balprune":
                                g = rt.capture()
                                rt.load_inputs(inputs)
                            else:
                                with quiet():
                                    g = capture_graph(fn)
                            timed.append((True, g.replay))
                        except RuntimeError as exc:  # a library that cannot be captured: say so
                            report.unavailable.append({"layer": "model", "batch": 1, "kernel": f"{runner} (graph)",
                                                       "reason": f"{dtype}: {str(exc).splitlines()[0]}"})
                    n = iters if arch.kind == "lstm-lm" else max(10, iters // 5)
                    for is_graph, f in timed:
                        for mode in modes:
                            with quiet():
                                t: Timing = s.timer.time_calls(f, iters=n, before=flush if mode == "cold" else None)
                            gbps = nbytes / (t.median_us * 1e-6) / 1e9
                            note = unit if t.spin_covered else f"{unit}; host fell behind the GPU"
                            report.measurements.append(Measurement(
                                "model", (1, 1), DTYPE_CODE[dtype], 1, mode, is_graph, runner, t.median_us, t.p10_us,
                                t.p90_us, int(nbytes), gbps, 100.0 * gbps / s.bandwidth, errors[runner], True, note))
                del rt, tm, runners, torch_runner
                free_device_memory()
            report.meta["model"] = model_meta
        except gpu_failures() as exc:
            free_device_memory()
            raise GpuRuntimeError(f"model {arch.name}: {type(exc).__name__}: {exc}") from None
    return report


def record_dispatch(report: BenchReport, choices, dtype: str, bandwidth: float) -> None:
    """A model runtime's dispatch figures into ``report``: per stage and measured path one measurement
    (hot, graph: the dispatcher's time), and every unavailable path with its reason."""
    for c in choices:
        for kernel, us in c.times_us.items():
            nb = c.bytes[kernel]
            gbps = nb / (us * 1e-6) / 1e9
            report.measurements.append(Measurement(
                c.layer, c.shape, DTYPE_CODE[dtype], c.batch, "hot", True, kernel, us, us, us, nb, gbps,
                100.0 * gbps / bandwidth, c.errors.get(kernel), True,
                f"dispatch: {c.path} ({c.reason})" if kernel == c.path else ""))
        for kernel, why in c.unavailable.items():
            report.unavailable.append({"layer": c.layer, "batch": c.batch, "kernel": kernel, "reason": why})


def untimed_runner(runner: str, dtype: str, nbytes: int, error: float, mode: str, graph: bool) -> Measurement:
    """The "model" row of a runner outside the tolerance contract: reported as incorrect, not timed."""
    return Measurement("model", (1, 1), DTYPE_CODE[dtype], 1, mode, graph, runner, math.nan, math.nan, math.nan, nbytes,
                       0.0, 0.0, error, False,
                       f"relative error {error:.2e} > tolerance {MODEL_TOLERANCE[dtype]:.0e}; not timed")


def model_rows(report: BenchReport) -> list[dict]:
    """End-to-end rows: one per (unit, dtype, mode, graph) with balprune's and torch's medians and the speedup."""
    by: dict[tuple, dict] = {}
    units = [m for m in report.measurements if is_model_unit(m.layer)]
    for m in units:
        if m.kernel == "transformers":
            continue
        row = by.setdefault((m.layer, m.dtype, m.mode, m.graph),
                            {"unit": m.layer, "dtype": m.dtype, "mode": m.mode, "graph": m.graph})
        row[m.kernel] = m
    for m in units:  # an LLM's transformers peer joins its unit's row even when it ran eager (its note says so)
        if m.kernel != "transformers":
            continue
        key = (m.layer, m.dtype, m.mode, m.graph)
        if key not in by:
            key = next((k for k in by if k[:3] == key[:3]), key)
        by.setdefault(key, {"unit": m.layer, "dtype": m.dtype, "mode": m.mode, "graph": m.graph})[m.kernel] = m
    out = []
    for row in by.values():
        b, t = row.get("balprune"), row.get("torch")
        ok = b is not None and t is not None and b.correct and t.correct
        row["speedup"] = t.median_us / b.median_us if ok else None
        out.append(row)
    order = {"F32": 0, "F16": 1, "BF16": 2}
    return sorted(out, key=lambda r: (r["unit"] != "model", r["unit"], order.get(r["dtype"], 9), r["graph"],
                                      r["mode"] != "hot"))


__all__ = ["PAPER", "bench_model", "is_model_unit", "model_rows", "record_dispatch", "untimed_runner"]
