"""The pieces every packed-model runtime is built from: the element-wise kernels, one matrix
product with its candidate paths, and the dispatcher that measures them and keeps the fastest correct.

Data flow of a build: the model class (lstm.py, vgg.py) reads its weights from the packed file,
makes one Projection per matrix product on buffers it owns (and, for LSTMs, one stage over
several of them: recurrence.Recurrence, a layer's every step; lm_step.LmStep, a whole token
step), and calls ``dispatch`` on each with a sample input already in place; ``dispatch`` gates every path against a float64 torch product
of the same (rounded) operands, times the correct ones on this GPU, and binds the fastest. The
model then runs only bound launches: no checks, no allocation, no host work beyond the launch
calls, so one forward can be captured in a CUDA graph.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from ...errors import GpuRuntimeError, UsageError
from ...patterns.registry import MODEL_BITMASK_PATH
from .._linear import STORAGE, TORCH_OF
from ..measure import STAGE_TOLERANCE, cupy_on_torch_stream, measure_us, pick_path, relative_error

__all__ = ["Choice", "CupyViews", "ModelKernels", "Projection", "dispatch", "launch_variants",
           "model_kernel_variants", "ptr", "sparse_alternatives", "sparse_operator", "split_candidate"]

# Paths a Projection can take: "balanced" / "bsr", balprune's kernel for the layer's pattern
# (in launch variants: "balanced (threads=512, x raw)"), and "dense", the same masked matrix
# through cuBLAS (torch), on tensor cores where cuBLAS uses them; "balanced_bitmask", the bitmask
# kernel of a bitmask-stored balanced layer, and "balanced_nm24", a 2:4 layer on the sparse tensor
# cores (sparse_alternatives). Each is gated against the
# float64 product of the same rounded operands by runtime.measure (relative_error <=
# STAGE_TOLERANCE[dtype]: the measurement module owns the bound and says why) before it is timed.

_MODEL_KERNELS = ("lstm_cell", "embedding_row", "bias_relu_pool2", "im2col", "add_relu")
_THREADS = 256


def model_kernel_variants() -> list[str]:
    """Every instantiation of kernels/model_ops.cu the model runtimes launch (the compile test builds them)."""
    return [f"bp::{k}<{STORAGE[d][1]}>" for k in _MODEL_KERNELS for d in STORAGE]


def split_candidate(key: str) -> tuple[str, str | None]:
    """A candidate key "path" or "path (variant)" as (path, variant or None): the dispatcher's naming of a
    launch variant timed on its own."""
    path = key.split(" (")[0]
    return path, (key[len(path) + 2:-1] if key != path else None)


def ptr(t: torch.Tensor | None, offset_elems: int = 0) -> np.uint64:
    """A device pointer as a kernel argument (null for None): no conversion object per launch."""
    if t is None:
        return np.uint64(0)
    return np.uint64(t.data_ptr() + offset_elems * t.element_size())


class ModelKernels:
    """kernels/model_ops.cu built for one value dtype on one device; ``bound`` prepares one launch
    (queued on the current CuPy stream each time it is called)."""

    def __init__(self, dtype: str, device: int) -> None:
        from ..kernels import load_module

        tname = STORAGE[dtype][1]
        names = {k: f"bp::{k}<{tname}>" for k in _MODEL_KERNELS}
        mod = load_module("model_ops.cu", tuple(names.values()), device=device)
        self.fn = {k: mod.get_function(n) for k, n in names.items()}

    def bound(self, name: str, n: int, args: tuple) -> Callable[[], None]:
        """A zero-argument launch of kernel ``name`` over ``n`` threads' worth of outputs."""
        from .._launch import prepared

        return prepared(self.fn[name], (max(1, -(-int(n) // _THREADS)),), (_THREADS,), args)


class CupyViews:
    """CuPy views of torch tensors, made once per (pointer, shape, dtype): the sparse kernels take
    CuPy arrays, and a DLPack round trip per launch would cost more host time than the launch."""

    def __init__(self, limit: int = 64) -> None:
        self._views: dict[tuple, object] = {}
        self._limit = limit

    def forget(self, t: torch.Tensor) -> None:
        """Drop the views of ``t``'s memory: a view holds its tensor, so a buffer a stage lets go of is
        freed only once its views are gone."""
        ptr0 = t.data_ptr()
        for key in [k for k in self._views if k[0] == ptr0]:
            del self._views[key]

    def __call__(self, t: torch.Tensor):
        from .._gpu import as_cupy

        key = (t.data_ptr(), tuple(t.shape), t.dtype)
        v = self._views.get(key)
        if v is None:
            if len(self._views) >= self._limit:
                self._views.pop(next(iter(self._views)))
            v = as_cupy(t)
            self._views[key] = v
        return v


@dataclass
class Choice:
    """What the dispatcher measured for one matrix product and which path it bound."""

    layer: str
    shape: tuple[int, int]
    batch: int
    pattern: str
    path: str
    reason: str
    times_us: dict[str, float] = field(default_factory=dict)
    bytes: dict[str, int] = field(default_factory=dict)
    errors: dict[str, float] = field(default_factory=dict)
    unavailable: dict[str, str] = field(default_factory=dict)
    variants: dict[str, str] = field(default_factory=dict)  # path -> the launch variant measured fastest

    def to_dict(self) -> dict:
        return {"layer": self.layer, "shape": list(self.shape), "batch": self.batch, "pattern": self.pattern,
                "path": self.path, "reason": self.reason, "times_us": dict(self.times_us),
                "bytes": dict(self.bytes), "errors": dict(self.errors), "unavailable": dict(self.unavailable),
                "variants": dict(self.variants)}


def sparse_operator(packed, dtype: str, device: int, name: str):
    """balprune's operator for a packed matrix in ``dtype`` (values cast; mask and indices as stored),
    as (path, operator), or (None, reason) when its pattern has no kernel. A balanced tensor runs the
    offsets kernel (a bitmask-stored one on its exact in-memory offsets form); sparse_alternatives
    gives the other encodings' kernels, which the dispatcher times beside it."""
    from ...formats.balanced import BalancedTensor
    from ...formats.bsr import BsrTensor
    from ..balanced import BalancedLinear
    from ..bsr import BsrLinear

    tdt = TORCH_OF[dtype]
    if isinstance(packed, BalancedTensor):
        g = packed.geometry
        # packed comes from PackedFile.load, checked on the bytes it returned (and load_model checked the
        # cast cannot overflow): the operator checks only its kernel's limits.
        return "balanced", BalancedLinear(packed.values.to(tdt), packed.indices, cols=g.cols,
                                          block_length=g.block_length, device=device, name=name, validate=False)
    if isinstance(packed, BsrTensor):
        return "bsr", BsrLinear(packed.crow_indices, packed.col_indices, packed.values.to(tdt), rows=packed.rows,
                                cols=packed.cols, device=device, name=name, validate=False)
    if isinstance(packed, torch.Tensor):
        return None, "stored dense (not pruned)"
    return None, f"no kernel for the {getattr(packed, 'pattern', type(packed).__name__)} pattern"


def sparse_alternatives(packed, dtype: str, device: int, name: str) -> tuple[list[tuple[str, object]], dict[str, str]]:
    """Further sparse operators of ``packed`` for the dispatcher to time beside sparse_operator's:
    ([(path, operator)], {path: why it has none}). A balanced tensor stored with bitmask indices
    (fewer bytes than offsets at 50-80%: FORMAT.md) also runs the bitmask kernel on its stored form
    (MODEL_BITMASK_PATH); a 2:4 one in a 16-bit model dtype also runs on the sparse tensor cores
    ("balanced_nm24", bench's name for the same path)."""
    from ...errors import FormatError
    from ...formats.balanced import BalancedTensor

    if not isinstance(packed, BalancedTensor):
        return [], {}
    from ..bitmask import WALKS, BitmaskLinear
    from ..nm24 import Nm24Linear, supports

    g = packed.geometry
    bitmask, nm24 = packed.encoding == "bitmask", supports(dtype, g.block_length, g.keep)
    if not (bitmask or nm24):
        return [], {}
    values = packed.values.to(TORCH_OF[dtype])
    out, unavailable = [], {}
    if bitmask:
        # every walk of the bitmask kernel, each on its own device layout: the delta walk (the default) was the
        # fastest on every Llama shape measured (kernels/NOTES.md v37), the mask walks traded places with each
        # other by shape (v26), so the dispatcher times them all (launch_variants labels the ones that are not
        # the default) and release_unbound keeps the bound one's layout only
        failed = []
        for walk in WALKS:  # the default first; a walk past its own limits leaves the others to run
            try:
                out.append((MODEL_BITMASK_PATH, BitmaskLinear(values, packed.indices, cols=g.cols,
                                                              block_length=g.block_length, device=device, name=name,
                                                              validate=False, walk=walk)))
            except FormatError as exc:  # the kernel's own limits (32-bit staging index, 32-bit delta steps)
                failed.append(f"walk {walk}: {exc}")
        if len(failed) == len(WALKS):
            unavailable[MODEL_BITMASK_PATH] = "; ".join(failed)
    if nm24:
        out.append(("balanced_nm24", Nm24Linear(values, packed.indices, cols=g.cols, block_length=g.block_length,
                                                device=device, name=name, validate=False)))
    return out, unavailable


def launch_variants(op, batch: int) -> dict[str, object]:
    """Launch settings of one sparse operator worth measuring for ``batch`` columns: {label: operator}.

    The kernels' defaults were tuned on large cold matrices (16384 x 8192); a model's layers are
    smaller and often L2-resident, where a smaller CTA or the non-pipelined batch-1 kernel can
    start and drain faster. Variants share the operator's device arrays (shallow copies with
    their own launch-config cache); the dispatcher keeps the fastest. "" is the default.
    """
    import copy

    from ..balanced import BalancedLinear
    from ..bitmask import WALK, BitmaskLinear

    if isinstance(op, BitmaskLinear) and op.walk != WALK:
        return {f"walk {op.walk}": op}  # another walk's own operator (sparse_alternatives)
    out = {"": op}
    if not isinstance(op, BalancedLinear):
        return out
    stagings = (("auto", "raw") if batch == 1 else ("auto",))
    # batch 1: with and without the bulk-copy pipeline ("auto" takes it for 16-bit values only)
    pipes = (("auto", False) if op.dtype != "float32" else ("auto", True)) if batch == 1 else ("auto",)
    for staging in stagings:
        for threads in (1024, 512, 256):
            for pipeline in pipes:
                if (threads, pipeline, staging) == (op.threads, op.pipeline, op.staging):
                    continue
                v = copy.copy(op)
                v.threads, v.pipeline, v.staging, v._configs = threads, pipeline, staging, {}
                if pipeline is True and v.pipeline_plan() is None:
                    continue  # the pipeline does not fit this layer
                out[", ".join([f"threads={threads}"] + (["no pipeline"] if pipeline is False else [])
                              + (["pipeline"] if pipeline is True else []) + (["x raw"] if staging == "raw" else []))] = v
    return out


class Projection:
    """y = act(W x + b) on fixed buffers: x [cols] or [cols, N], y [rows] or [rows, N] (torch, C-contiguous).

    ``dense``: W as a [rows, cols] torch matrix in the model dtype on the device (the masked
    weights: the dense path, and the reference of the gate). ``sparse``: (path, operator) from
    sparse_operator, or None. ``bias``: [rows] float32 or None, added per row (every column);
    ``relu``: clamp at 0 after it. ``alternatives``: further (path, operator) pairs of the same
    matrix (sparse_alternatives), candidates beside ``sparse``. After ``dispatch``, ``launch()`` runs
    the bound path on the current stream. ``overlap``: the sparse paths are programmatic dependent
    launches (runtime._launch: placed while the previous grid in the stream runs, waiting in the
    kernel's prologue); the dense path is torch's launch either way.
    """

    def __init__(self, name: str, dense: torch.Tensor, x: torch.Tensor, y: torch.Tensor, *, dtype: str,
                 kernels: ModelKernels, views: CupyViews, pattern: str, sparse=None, sparse_reason: str = "",
                 bias: torch.Tensor | None = None, relu: bool = False, alternatives=(),
                 unavailable: dict[str, str] | None = None, overlap: bool = False) -> None:
        self.name, self.dense, self.x, self.y = name, dense, x, y
        self.overlap = overlap
        self.dtype, self.kernels, self.views, self.pattern = dtype, kernels, views, pattern
        self.rows, self.cols = int(dense.shape[0]), int(dense.shape[1])
        self.batch = 1 if x.dim() == 1 else int(x.shape[1])
        if int(x.shape[0]) != self.cols or int(y.shape[0]) != self.rows:
            raise UsageError(f"{name}: buffers {list(x.shape)} -> {list(y.shape)} do not fit W [{self.rows}, {self.cols}]")
        self.sparse = sparse  # (path, operator) or None
        self.alternatives = list(alternatives)  # more (path, operator) of the same matrix
        self.unavailable = dict(unavailable or {})  # {path: why this layer has none}, reported by dispatch
        self.sparse_reason = sparse_reason
        self.bias32 = None if bias is None else bias.to(device=dense.device, dtype=torch.float32).contiguous()
        self.bias_t = None if bias is None else bias.to(device=dense.device, dtype=dense.dtype).contiguous()
        self.relu = relu
        self.choice: Choice | None = None
        self._bound: Callable[[], None] | None = None
        self.bound_key: str | None = None
        self._operator_of: dict[str, object] = {}  # candidate key -> the (path, operator)'s operator it launches

    # -- the candidate launches -------------------------------------------------------------------

    def _dense_launch(self, x: torch.Tensor, y: torch.Tensor) -> Callable[[], torch.Tensor]:
        W, b, relu = self.dense, self.bias_t, self.relu

        def run() -> torch.Tensor:
            if x.dim() == 1:
                torch.mv(W, x, out=y) if b is None else torch.addmv(b, W, x, out=y)
            else:
                torch.mm(W, x, out=y) if b is None else torch.addmm(b[:, None], W, x, out=y)
            if relu:
                y.relu_()
            return y
        return run

    def _sparse_launch(self, x: torch.Tensor, y: torch.Tensor, o=None) -> Callable[[], torch.Tensor]:
        # One launch: the bias and ReLU run in the sparse kernel's epilogue (bp::epilogue).
        o = self.sparse[1] if o is None else o
        bias = None if self.bias32 is None else self.views(self.bias32)
        spmv = o.prepared_launch(self.views(x), self.views(y), self.batch, bias=bias, relu=self.relu,
                                 overlap=self.overlap)

        def run() -> torch.Tensor:
            spmv()
            return y
        return run

    def candidates(self, x: torch.Tensor | None = None, y: torch.Tensor | None = None) -> dict[str, Callable[[], torch.Tensor]]:
        """{path: a zero-argument launch returning the output buffer} for every path this layer has."""
        x = self.x if x is None else x
        y = self.y if y is None else y
        out = {"dense": self._dense_launch(x, y)}
        for path, op in self.sparse_paths():
            for label, o in launch_variants(op, self.batch).items():
                key = path + (f" ({label})" if label else "")
                out[key] = self._sparse_launch(x, y, o)
                self._operator_of[key] = op
        return out

    def sparse_paths(self) -> list[tuple[str, object]]:
        """Every (path, operator) of this layer besides dense: ``sparse`` first, then the alternatives."""
        return ([self.sparse] if self.sparse is not None else []) + self.alternatives

    def bytes_of(self, key: str) -> int:
        """Weight bytes candidate ``key`` (a path, or "path (variant)") reads per launch."""
        path = key.split(" (")[0]
        if path == "dense":
            return int(self.dense.numel() * self.dense.element_size())
        op = self._operator_of.get(key) or dict(self.sparse_paths())[path]
        return int(op.weight_bytes)

    def reference(self) -> torch.Tensor:
        """float64 W x + b (+ReLU) of the rounded operands now in the buffers."""
        r = self.dense.double() @ self.x.double()
        if self.bias32 is not None:
            b = self.bias32.double()
            r = r + (b if r.dim() == 1 else b[:, None])
        return r.relu() if self.relu else r

    # -- binding ----------------------------------------------------------------------------------

    def bind(self, key: str) -> None:
        """Bind the launch of candidate ``key`` (a path, or "path (variant)"). Every path stays available:
        a stage built on this one (an LSTM recurrence) asks for the candidates of each correct path later."""
        self._bound = self.candidates()[key]
        self.bound_key = key

    def set_overlap(self, on: bool) -> None:
        """Rebind the bound candidate with its sparse launch overlapped or not (class doc); the path stays.
        After dispatch only (the bound operator is kept by release_unbound)."""
        if self.bound_key is None:
            raise UsageError(f"{self.name}: no path bound yet (dispatch first)")
        self.overlap = bool(on)
        self.bind(self.bound_key)

    def launch(self) -> None:
        self._bound()

    def release_unbound(self, keep_dense: bool = False) -> None:
        """After dispatch: let go of the device copies the bound launch does not read -- the other sparse
        paths' operators and, when a sparse path runs and ``keep_dense`` is False, the dense matrix (an LLM's
        prefill multiplies by it: keep_dense). ``candidates()`` and ``reference()`` are not available
        afterwards; a stage built on this one that asks for candidates later (an LSTM recurrence) must not
        call this."""
        path = self.choice.path
        bound = self._operator_of.get(self.bound_key)  # the operator (of the path's several) bound
        self.alternatives = [(p, o) for p, o in self.alternatives if p == path and (bound is None or o is bound)]
        self._operator_of = {k: o for k, o in self._operator_of.items() if o is bound}
        if self.sparse is not None and self.sparse[0] != path:
            self.sparse = None
        if path != "dense" and not keep_dense:
            self.dense = None


def dispatch(proj: Projection, paths: str = "auto", measure: bool = True) -> Choice:
    """Gate, time and bind ``proj``'s paths with the data now in its x buffer (see module doc).

    ``proj`` is a Projection or any stage with the same surface: name, rows, cols, batch, pattern,
    dtype, sparse ((path, operator) or None), sparse_reason, candidates(), reference(),
    bytes_of(candidate key), bind(candidate key), and a ``choice`` attribute that receives the result;
    optionally ``timing_candidates()`` (the same keys: what to time when a gate run differs from one
    unit of work, e.g. an LM step gated over two steps from the zero state) and ``unavailable``
    ({candidate: why it cannot run}, reported).

    ``paths``: "auto" (fastest correct; pick_path breaks near-ties by bytes), "sparse" (balprune's kernel where the layer has one,
    else dense) or "dense". Without ``measure`` the forced path is bound untimed.
    """
    if paths not in ("auto", "sparse", "dense"):
        raise UsageError(f"paths must be 'auto', 'sparse' or 'dense', got {paths!r}")
    ref = proj.reference()
    cands = proj.candidates()  # keys: a path, or "path (variant)"
    choice = Choice(proj.name, (proj.rows, proj.cols), proj.batch, proj.pattern, "", "")
    if proj.sparse is None:
        choice.unavailable["sparse"] = proj.sparse_reason
    errors: dict[str, float] = {}
    primary = {"dense", proj.sparse[0] if proj.sparse is not None else None}
    for key, fn in list(cands.items()):
        try:
            with cupy_on_torch_stream():
                out = fn()
        except Exception as exc:  # an alternative kernel that cannot run here is reported, never fatal
            path = key.split(" (")[0]
            # fatal: the dense path itself or a launch variant of the layer's own sparse kernel; a layout
            # variant of the dense path ("dense (channels-last)") is an alternative like any other
            if path in primary and (path != "dense" or key == "dense"):
                raise
            choice.unavailable[key] = f"could not run ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"[:300]
            del cands[key]
            continue
        errors[key] = relative_error(out, ref)
    gate = STAGE_TOLERANCE[proj.dtype]
    correct = [k for k in cands if errors[k] <= gate]
    for k in cands:
        path = k.split(" (")[0]
        choice.errors[path] = max(choice.errors.get(path, 0.0), errors[k])
        if k not in correct:
            choice.unavailable[k] = f"failed the correctness gate (relative error {errors[k]:.2e} > {gate:.0e})"
    if not correct:
        raise GpuRuntimeError(f"{proj.name}: no path passed the correctness gate (relative errors "
                              f"{', '.join(f'{p} {e:.2e}' for p, e in errors.items())}; bound {gate:.0e})")
    choice.unavailable.update(getattr(proj, "unavailable", {}))
    times: dict[str, float] = {}
    if measure:
        timed = proj.timing_candidates() if hasattr(proj, "timing_candidates") else cands
        for k in correct:
            with cupy_on_torch_stream():
                times[k] = measure_us(timed[k])
    best_key: dict[str, str] = {}  # path -> its fastest correct variant
    for k in correct:
        path = k.split(" (")[0]
        if path not in best_key or (measure and times[k] < times[best_key[path]]):
            best_key[path] = k
    choice.times_us = {p: times[k] for p, k in best_key.items()} if measure else {}
    choice.variants = {p: k for p, k in best_key.items()}
    choice.bytes = {p: proj.bytes_of(k) for p, k in best_key.items()}
    # the forced-sparse path: the fastest correct sparse path (the first when untimed)
    sparse_keys = [p for p, _ in getattr(proj, "sparse_paths", lambda: [proj.sparse] if proj.sparse else [])()
                   if p in best_key]
    sparse_path = (min(sparse_keys, key=choice.times_us.get) if measure else sparse_keys[0]) if sparse_keys else None
    if paths == "dense" or (paths == "sparse" and sparse_path is None):
        choice.path = "dense"
        choice.reason = "forced dense" if paths == "dense" else (choice.unavailable.get("sparse") or
                                                                  "the sparse kernel failed its gate")
    elif paths == "sparse":
        choice.path, choice.reason = sparse_path, "forced sparse"
    elif not measure:
        choice.path = sparse_path or "dense"
        choice.reason = "untimed: sparse where available"
    else:
        choice.path, choice.reason = pick_path(choice.times_us, choice.bytes)
        if len(choice.times_us) == 1:
            choice.reason = choice.unavailable.get("sparse") or "the only correct path"
    variant = best_key[choice.path]
    if variant != choice.path:
        choice.reason += f"; launch {variant[len(choice.path) + 2:-1]}"
    proj.choice = choice
    proj.bind(variant)
    return choice
