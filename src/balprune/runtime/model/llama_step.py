"""The decode step's decoder layers as ONE persistent launch (kernels/llama_step.cu), bound to a LlamaDecoder.

Why and how: the kernel's header. Here: which decoders it takes (``StepKernel.supported``), the plan of its
weight stream (``plan_phase``: rows per chunk and tasks per row, the same for every CTA), the lane records of
every product (formats.layouts.lane_records, uploaded once), and the launch. The step then is: the embedding
row (torch), this launch (every layer and the final norm), the head's product, the argmax and the bookkeeping
(LlamaDecoder._step_persistent). PackedLlama gates it against the torch-ops step and times it against the
fused eight-launch layers, and keeps the faster (``decode_ops``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ...formats import layouts

#: kernels/llama_step.cu: threads per CTA (kStepThreads), task sums per chunk (kMaxTasks), the PhaseField and
#: LayerField counts. tests/test_llama_step_host.py checks them against the source.
THREADS = 512
MAX_TASKS = 1024
PHASE_FIELDS = 10
LAYER_FIELDS = 6
#: Bytes of one ring slot (a chunk of rows), at most MAX_SLOTS of them in the shared memory left over.
SLOT_BYTES = 32 * 1024
MAX_SLOTS = 8
#: Bytes of static shared memory the kernel may use at most (its reductions' scratch; attention_item's).
STATIC_SHARED = 1024
MIN_SLOTS = 2
#: Values per lane a task walks at least (fewer: the task's fixed cost, finding its first word, dominates).
MIN_TASK_VALUES = 8
#: Cache positions per attention work item at most (llama_ops.cu's launch takes up to 64: one item per CTA of
#: a grid of its own; here the items share the step's CTAs, and at context 128 chunks of 64 keep 16 of them busy).
ATTENTION_CHUNK = 32
#: The FUSED groups in the kernel's phase order.
PHASE_KEYS = ("qkv", "o", "gate_up", "down")


@dataclass(frozen=True)
class PhasePlan:
    """One product phase of the stream: ``rows`` (gate/up: pairs), ``record_bytes`` of one row's record,
    ``unit_bytes`` (a row, or a gate/up pair) and the CTA-independent chunking: ``chunk_rows`` units per chunk
    (chunk bytes <= the slot), ``groups`` tasks per record."""

    rows: int
    record_bytes: int
    unit_bytes: int
    chunk_rows: int
    groups: int


def plan_phase(rows: int, record_bytes: int, kept: int, pairs: bool, grid: int, slot_bytes: int,
               warps: int = THREADS // 32) -> PhasePlan:
    """Chunk rows and tasks per record for a phase of ``rows`` units over ``grid`` CTAs: the most rows a CTA
    has, cut into the fewest chunks that fit a slot, the chunks as even as possible; then enough tasks per
    record that a chunk keeps every warp busy (each task at least MIN_TASK_VALUES values per lane, at most 16
    per record, at most MAX_TASKS per chunk)."""
    recs = 2 if pairs else 1
    unit = record_bytes * recs
    if unit > slot_bytes:
        raise ValueError(f"a record of {unit} bytes does not fit a slot of {slot_bytes}")
    most = -(-rows // grid)
    chunks = max(1, -(-most * unit // slot_bytes))
    per = max(1, -(-most // chunks))
    per = min(per, slot_bytes // unit, MAX_TASKS // recs)

    def busy(g: int) -> float:  # the warps' share of a chunk's rounds that do work (a barrier ends each chunk)
        tasks = per * recs * g
        return tasks / (-(-tasks // warps) * warps)

    # the split into tasks that keeps the most warps busy, the fewest tasks among equals (each has a fixed cost)
    most_groups = max(1, min(16, kept // MIN_TASK_VALUES, MAX_TASKS // (per * recs)))
    groups = max(range(1, most_groups + 1), key=lambda g: (round(busy(g), 3), -g))
    return PhasePlan(rows, record_bytes, unit, per, groups)


def stacked_records(packed, pairs: bool, dtype: torch.dtype) -> tuple[np.ndarray, layouts.LaneGeometry]:
    """The lane records of a stacked BalancedTensor (FUSED group) with its values in ``dtype`` (the model's,
    as every other path casts them), gate/up rows paired (gate i, up i)."""
    values = packed.values.to(dtype).contiguous()
    if values.dtype == torch.bfloat16:
        values = values.view(torch.uint16)
    recs, lg = layouts.lane_records(values.cpu().numpy(), packed.indices.cpu().numpy().astype(np.int64),
                                    packed.geometry.block_length)
    if pairs:
        rows = recs.shape[0] // 2
        recs = np.ascontiguousarray(recs.reshape(2, rows, -1).transpose(1, 0, 2).reshape(2 * rows, -1))
    return recs, lg


def unsupported(dec, stacked: list[dict[str, tuple]] | None) -> str | None:
    """Why the step kernel cannot take ``dec`` with these stacked products (None when it can): every layer's
    four groups one balanced matrix each (stack_rows) with a multiple of 32 blocks, and
    the attention's limits (FusedOps)."""
    from ...formats.balanced import BalancedTensor
    from .llama import FusedOps

    why = FusedOps.supported(dec)
    if why is not None:
        return why
    if stacked is None or len(stacked) != len(dec.layers):
        return "the decoder kept no stacked products"
    for n, groups in enumerate(stacked):
        for key in PHASE_KEYS:
            packed = groups.get(key, (None, None))[0]
            if not isinstance(packed, BalancedTensor):
                return f"layer {n} {key}: not one balanced matrix (the step kernel streams balanced rows)"
            if packed.geometry.blocks % layouts.LANES:
                return (f"layer {n} {key}: {packed.geometry.blocks} blocks per row; the step kernel takes a "
                        f"multiple of {layouts.LANES}")
            if key == "gate_up" and groups[key][1] is not None:
                return f"layer {n} gate/up: a bias (the step kernel's SiLU-multiply epilogue takes none)"
    return None


class StepKernel:
    """kernels/llama_step.cu bound to one LlamaDecoder's buffers (GPU only). ``stacked``: per layer, FUSED
    key -> (stacked BalancedTensor, fp32 bias or None), as LlamaDecoder kept them. ``launch()`` runs every
    decoder layer and the final norm (into dec.xn) on the current CuPy stream. ValueError (with the reason)
    when it cannot take the decoder or does not fit this GPU's shared memory. ``defines``: -D options of the
    build (benchmarks/step_probe.py's BP_STEP_PROBE; none in the runtime)."""

    def __init__(self, dec, stacked: list[dict[str, tuple]], device: int, *, slot_bytes: int = SLOT_BYTES,
                 defines: tuple[str, ...] = ()) -> None:
        from ...formats.layouts import LANES
        from .. import _gpu
        from .._launch import function_ptr, prepared
        from ..kernels import load_module
        from .llama import _KERNEL_TYPE, FusedOps
        from .stages import ptr

        why = unsupported(dec, stacked)
        if why is not None:
            raise ValueError(why)
        cfg = dec.cfg
        info = _gpu.device_info(device)
        if torch.cuda.get_device_capability(dec.h.device) < (9, 0):
            raise ValueError("the step kernel's bulk copies need sm_90 or newer")
        grid = info.multiprocessors
        name = f"bp::llama_step<{_KERNEL_TYPE[dec.dtype]}>"
        self.module = load_module("llama_step.cu", (name,), device=device, defines=defines)
        self.fn = self.module.get_function(name)
        dev = dec.h.device
        heads, kvh, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        # cache positions per attention item: at most ATTENTION_CHUNK, so that short contexts spread over more CTAs
        # (the shared-memory bound of FusedOps' launch is looser here: xs is reused)
        chunk = min(FusedOps.attention_chunk(cfg), ATTENTION_CHUNK)
        nchunks = -(-dec.max_len // chunk)
        att_floats = FusedOps.attention_shared(cfg, chunk) // 4
        self.buffers: list[torch.Tensor] = []  # held: the kernel has their addresses
        phases = np.zeros((4 * len(stacked), PHASE_FIELDS), dtype=np.uint64)
        layer_rec = np.zeros((len(stacked), LAYER_FIELDS), dtype=np.uint64)
        lanes_cols, units = [], []
        geoms = []
        for groups in stacked:
            for key in PHASE_KEYS:
                recs, lg = stacked_records(groups[key][0], key == "gate_up", dec.dtype)
                geoms.append((recs, lg, groups[key]))
                lanes_cols.append(lg.lane_cols)
                units.append(lg.record_bytes * (2 if key == "gate_up" else 1))
        # xs holds a phase's x, attention's scratch, and h beside the norm's weights (stage_norm)
        xfloats = _round32(max(max(LANES * c for c in lanes_cols), att_floats, 2 * cfg.hidden_size))
        xtmp = _round32(max(LANES * (c | 1) for c in lanes_cols))
        slot = max(slot_bytes, _round_up(max(units), 128))
        # the dynamic shared memory before the ring (the kernel's header)
        before_ring = 128 + 4 * (xfloats + xtmp + 2 * MAX_TASKS + residual_floats(cfg.hidden_size, grid))
        fixed = before_ring + STATIC_SHARED
        slots = min(MAX_SLOTS, (info.smem_per_block_optin - fixed) // slot)
        if slots < MIN_SLOTS:
            raise ValueError(f"the step kernel needs {fixed + MIN_SLOTS * slot} bytes of shared memory per CTA; "
                             f"this GPU allows {info.smem_per_block_optin}")
        self.plans: list[PhasePlan] = []
        for i, (recs, lg, (packed, bias)) in enumerate(geoms):
            key = PHASE_KEYS[i % 4]
            pairs = key == "gate_up"
            rows = recs.shape[0] // (2 if pairs else 1)
            if key in ("o", "down") and rows != cfg.hidden_size:  # (the kernel keeps their residual rows: hres)
                raise ValueError(f"layer {i // 4} {key}: {rows} rows, the model's hidden size is {cfg.hidden_size}")
            plan = plan_phase(rows, lg.record_bytes, lg.kept, pairs, grid, slot)
            self.plans.append(plan)
            dev_recs = torch.from_numpy(recs.view(np.int32)).to(dev)
            self.buffers.append(dev_recs)
            bias_ptr = 0
            if bias is not None and not pairs:
                b = bias.to(device=dev, dtype=torch.float32).contiguous()
                self.buffers.append(b)
                bias_ptr = b.data_ptr()
            phases[i] = (dev_recs.data_ptr(), rows, lg.record_bytes, lg.words, lg.kept, plan.chunk_rows, plan.groups,
                         bias_ptr, packed.geometry.cols, lg.lane_cols)
        layer_elems = dec.keys[0].numel()
        esize = dec.keys.element_size()
        for n, layer in enumerate(dec.layers):
            layer_rec[n] = (layer.input_norm.data_ptr(), layer.post_norm.data_ptr(), ptr(layer.q_norm),
                            ptr(layer.k_norm), dec.keys.data_ptr() + n * layer_elems * esize,
                            dec.values.data_ptr() + n * layer_elems * esize)
        self.phases = torch.from_numpy(phases.view(np.int64)).to(dev)
        self.layers = torch.from_numpy(layer_rec.view(np.int64)).to(dev)
        self.part = torch.zeros(heads * nchunks * (d + 2), dtype=torch.float32, device=dev)
        self.count = torch.zeros(kvh, dtype=torch.int32, device=dev)
        self.bar = torch.zeros(2, dtype=torch.int32, device=dev)
        self.slots, self.slot_bytes = slots, slot
        self.shared_bytes = before_ring + slots * slot
        if self.shared_bytes > 48 * 1024 and self.fn.max_dynamic_shared_size_bytes < self.shared_bytes:
            self.fn.max_dynamic_shared_size_bytes = self.shared_bytes
        import cupy as cp

        if cp.cuda.driver.occupancyMaxActiveBlocksPerMultiprocessor(function_ptr(self.fn), THREADS,
                                                                    self.shared_bytes) < 1:
            raise ValueError(f"a CTA of {THREADS} threads and {self.shared_bytes} bytes of shared memory does not fit an SM")
        i32, f32 = np.int32, np.float32
        args = (np.uint64(self.phases.data_ptr()), np.uint64(self.layers.data_ptr()), i32(len(stacked)),
                ptr(dec.h), ptr(dec.xn), ptr(dec.qkv), ptr(dec.attn), ptr(dec.act), ptr(dec.final_norm),
                ptr(dec.cos), ptr(dec.sin), ptr(dec.pos), ptr(self.part), ptr(self.count), ptr(self.bar),
                i32(cfg.hidden_size), i32(heads), i32(kvh), i32(d), i32(dec.max_len), i32(cfg.sliding_window or 0),
                f32(d ** -0.5), i32(chunk), i32(nchunks), f32(cfg.rms_norm_eps), i32(xfloats), i32(xtmp), i32(slots),
                np.uint32(slot))
        self.launch = prepared(self.fn, (grid,), (THREADS,), args, self.shared_bytes, cooperative=True)
        self.grid = grid
        self.record_bytes = sum(int(r.shape[0]) * lg.record_bytes for r, lg, _ in geoms)

    def describe(self) -> str:
        return (f"kernels/llama_step.cu: every layer in one launch ({self.grid} CTAs x {THREADS} threads, "
                f"{self.slots} x {self.slot_bytes // 1024} KiB weight slots, {self.record_bytes / 2**20:.1f} MiB of records)")


def residual_floats(hidden: int, grid: int) -> int:
    """kernels/llama_step.cu's residual_floats: a CTA's most rows of ``hidden``, rounded up to 32 (hres)."""
    return _round32(-(-hidden // grid))


def _round32(n: int) -> int:
    return -(-n // 32) * 32


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def step_kernel_variants() -> list[str]:
    """Every instantiation of kernels/llama_step.cu (the compile test builds them)."""
    return [f"bp::llama_step<{t}>" for t in ("float", "bp::f16", "bp::bf16")]


__all__ = ["PHASE_KEYS", "PhasePlan", "StepKernel", "plan_phase", "stacked_records", "step_kernel_variants",
           "unsupported"]
