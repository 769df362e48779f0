"""One LSTM layer's whole recurrence (every step, one or two directions) as one dispatched stage.

A Bi-LSTM layer is, per direction, an input projection over all frames (a Projection of its
own, dispatched like any matrix product) followed by ``steps`` dependent steps
``h_t = cell(gx_t + W_hh h_{t-1} + b)``. The steps are where batch-1 time goes: two launches
per step per direction. This stage gives the dispatcher every way to run them and keeps the
fastest correct one:

- ``dense (steps)`` / ``balanced (steps, ...)``: the per-step chain, W_hh h through cuBLAS or
  the balanced SpMV variant that W_hh's own dispatch measured fastest, then the cell kernel;
  the reverse direction on a second stream (forked and joined, also inside CUDA graphs);
- ``balanced (persistent, ctas=C, threads=N)``: kernels/lstm_recurrence.cu, all steps of every
  direction in ONE cooperative launch, W_hh in shared memory for the whole utterance, a grid
  barrier per step instead of two launches (C CTAs per direction).

The gate compares each candidate's layer output [D*H, steps] with a float64 recurrence over the
same rounded operands (W_hh, the gx buffers, the bias) that rounds h to the model dtype at every
step as both paths store it, so accumulation order is all that differs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from .._linear import STORAGE
from ..measure import cupy_on_torch_stream
from .stages import Choice, Projection

#: CTAs per direction tried by the persistent kernel (each CTA owns ceil(H / C) hidden units).
PERSISTENT_CTAS = (16, 32, 64, 128)
PERSISTENT_THREADS = (256, 512)


def recurrence_kernel_variants() -> list[str]:
    """Every instantiation of kernels/lstm_recurrence.cu the runtime launches (the compile test builds them)."""
    return [f"bp::lstm_recurrence<{STORAGE[d][1]}>" for d in STORAGE]


@dataclass
class Direction:
    """One direction of a layer: its buffers (owned by the model) and W_hh's dispatched Projection.

    ``proj``: W_hh h -> gh on the buffers h [H] and gh [4H] (dispatched, so its variants are
    known); ``gx``: [4H, steps] the input projection of every frame; ``bias32``: b_ih + b_hh
    [4H] fp32 or None; ``c``: [H] fp32 cell state of the per-step chain; ``packed``: W_hh as
    stored (a BalancedTensor for the persistent kernel)."""

    reverse: bool
    proj: Projection
    gx: torch.Tensor
    bias32: torch.Tensor | None
    c: torch.Tensor
    packed: object


def _next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


class PersistentLstm:
    """kernels/lstm_recurrence.cu set up for one layer: the rows of W_hh in the kernel's layout
    (one word per kept weight: value and full column, [4H, k*B] per direction), the descriptor table,
    the tagged h buffers and the launch's control words (finished-CTA count, epoch). ``launch(ctas, threads)`` returns a bound
    cooperative launch, or None when that grid cannot be resident all at once on this GPU."""

    def __init__(self, dirs: list[Direction], y: torch.Tensor, *, hidden: int, steps: int, dtype: str,
                 device: int, hold: Callable) -> None:
        from ..kernels import load_module

        H, D = hidden, len(dirs)
        dev = y.device
        self.hidden, self.steps, self.dirs = H, steps, D
        g = dirs[0].packed.geometry
        self.nnz, self.kpad = g.keep * g.blocks, g.blocks * g.block_length
        tdt = y.dtype
        self.esize = torch.empty(0, dtype=tdt).element_size()
        # h as tagged words (value + step tag: 4 bytes for 16-bit types, 8 for float32).
        self.hbuf = torch.zeros(D, 2, H * (2 if self.esize == 4 else 1), dtype=torch.int32, device=dev)
        self.ctl = torch.zeros(32, dtype=torch.int32, device=dev)  # finished CTAs, epoch (own 128-byte line)
        self.arrays = []
        desc = []
        for d, dr in enumerate(dirs):
            p = dr.packed
            # One word per kept weight: value bits | full column << 16 (16-bit) or << 32 (float).
            bits = p.values.to(tdt).reshape(4 * H, self.nnz).view(torch.int16 if self.esize == 2 else torch.int32)
            cols = p.indices.to(torch.int64) + (torch.arange(g.blocks, dtype=torch.int64) * g.block_length)
            cols = cols.reshape(4 * H, self.nnz)
            if self.esize == 2:
                word = (bits.to(torch.int32) & 0xFFFF) | (cols.to(torch.int32) << 16)
            else:
                word = (bits.to(torch.int64) & 0xFFFFFFFF) | (cols << 32)
            slots = word.contiguous().to(dev)
            self.arrays.append(slots)
            desc.append([slots.data_ptr(), 0, dr.gx.data_ptr(),
                         0 if dr.bias32 is None else dr.bias32.data_ptr(),
                         y.data_ptr() + d * H * steps * self.esize, self.hbuf[d].data_ptr(),
                         self.ctl.data_ptr(), 1 if dr.reverse else 0])
            hold(dr.gx)
            if dr.bias32 is not None:
                hold(dr.bias32)
        hold(y)
        self.desc = torch.tensor(desc, dtype=torch.int64).to(dev)
        self.weight_bytes = sum(a.numel() * a.element_size() for a in self.arrays)
        name = f"bp::lstm_recurrence<{STORAGE[dtype][1]}>"
        self.fn = load_module("lstm_recurrence.cu", (name,), device=device).get_function(name)
        from .. import _gpu

        info = _gpu.device_info(device)
        self._sms, self._smem_limit = info.multiprocessors, info.smem_per_block_optin

    @staticmethod
    def fits(packed, steps: int) -> str:
        """Why the persistent kernel cannot run this W_hh over ``steps`` frames ("" when it can)."""
        from ...formats.balanced import BalancedTensor

        if not isinstance(packed, BalancedTensor):
            return "W_hh is not balanced"
        g = packed.geometry
        if g.blocks * g.block_length > 65536:
            return "row too wide for 16-bit column numbers"
        if steps >= 32768:  # 16-bit step tags must not repeat within two launches
            return f"{steps} frames: the persistent kernel takes fewer than 32768"
        return ""

    def shared_bytes(self, units: int) -> int:
        """Dynamic shared memory of a CTA owning ``units`` hidden units (the kernel's layout)."""
        head = -(-(self.kpad + 5 * units) * 4 // 8) * 8
        return head + 4 * units * self.nnz * (4 if self.esize == 2 else 8)

    def launch(self, ctas: int, threads: int) -> tuple[Callable[[], None] | None, str]:
        """(bound launch, label) for ``ctas`` CTAs per direction of ``threads`` threads; (None, why) when it cannot run."""
        import cupy as cp

        from .._launch import function_ptr, prepared

        H = self.hidden
        units = -(-H // ctas)
        ctas = -(-H // units)
        smem = self.shared_bytes(units)
        label = f"persistent, ctas={ctas}, threads={threads}"
        if smem > self._smem_limit:
            return None, f"{label}: needs {smem} bytes of shared memory per CTA (limit {self._smem_limit})"
        if smem > 48 * 1024 and self.fn.max_dynamic_shared_size_bytes < smem:
            self.fn.max_dynamic_shared_size_bytes = smem
        per_sm = cp.cuda.driver.occupancyMaxActiveBlocksPerMultiprocessor(function_ptr(self.fn), threads, smem)
        if per_sm * self._sms < ctas * self.dirs:
            return None, f"{label}: {ctas * self.dirs} CTAs cannot be resident at once ({per_sm} per SM)"
        lpr = min(32, max(1, _next_pow2(-(-self.nnz // 8))))
        args = (np.uint64(self.desc.data_ptr()), np.int32(H), np.int32(self.steps), np.int32(self.nnz),
                np.int32(self.kpad), np.int32(units), np.int32(ctas), np.int32(lpr))
        return prepared(self.fn, (ctas * self.dirs,), (threads,), args, smem, cooperative=True), label


class Recurrence:
    """Every step of one LSTM layer: the buffers gx (per direction) -> y [D*H, steps]; a stage with
    the dispatcher's surface (stages.dispatch)."""

    def __init__(self, name: str, dirs: list[Direction], y: torch.Tensor, *, hidden: int, steps: int, dtype: str,
                 device: int, kernels, hold: Callable, side: torch.cuda.Stream) -> None:
        self.name, self.dirs, self.y = name, dirs, y
        self.hidden, self.steps, self.dtype = hidden, steps, dtype
        self.rows, self.cols, self.batch = 4 * hidden, hidden, 1
        self.pattern = getattr(dirs[0].packed, "pattern", "dense")
        self.kernels, self._side = kernels, side
        for dr in dirs:  # the per-step chains' launches hold raw pointers to these
            for t in (dr.proj.x, dr.proj.y, dr.gx, dr.c, dr.bias32):
                if t is not None:
                    hold(t)
        hold(y)
        self.choice: Choice | None = None
        self._bound: Callable[[], None] | None = None
        self.unavailable: dict[str, str] = {}  # persistent launch shapes that cannot run here, and why
        why = next((w for w in (PersistentLstm.fits(d.packed, steps) for d in dirs) if w), "")
        self.persistent = None if why else PersistentLstm(dirs, y, hidden=hidden, steps=steps, dtype=dtype,
                                                          device=device, hold=hold)
        sp = dirs[0].proj.sparse
        self.sparse = (sp[0], self.persistent) if sp is not None else None
        self.sparse_reason = dirs[0].proj.sparse_reason or why

    # -- candidates -------------------------------------------------------------------------------

    def _chain(self, dr: Direction, d: int, step_launch: Callable[[], object]) -> list[Callable[[], object]]:
        from .stages import ptr

        H, T, K = self.hidden, self.steps, self.kernels
        p = dr.proj
        out = [dr.c.zero_]
        for s in range(T):
            t = T - 1 - s if dr.reverse else s
            if s > 0:  # h0 = 0: the first step has no recurrent term
                out.append(step_launch)
            out.append(K.bound("lstm_cell", H, (
                ptr(dr.gx, t), np.int64(T), ptr(p.y) if s > 0 else np.uint64(0), ptr(dr.bias32), ptr(dr.c), ptr(p.x),
                ptr(self.y, d * H * T + t), np.int64(T), np.int32(H))))
        return out

    def _steps_candidate(self, key_of_dir: Callable[[Direction], str]) -> Callable[[], torch.Tensor]:
        chains = [self._chain(dr, d, dr.proj.candidates()[key_of_dir(dr)]) for d, dr in enumerate(self.dirs)]
        side = self._side

        def run() -> torch.Tensor:
            cur = torch.cuda.current_stream()
            for chain in chains[1:]:
                side.wait_stream(cur)
                with torch.cuda.stream(side), cupy_on_torch_stream():
                    for f in chain:
                        f()
            with cupy_on_torch_stream():
                for f in chains[0]:
                    f()
            if len(chains) > 1:
                cur.wait_stream(side)
            return self.y
        return run

    def candidates(self) -> dict[str, Callable[[], torch.Tensor]]:
        out: dict[str, Callable[[], torch.Tensor]] = {}
        if self.persistent is not None:
            for threads in PERSISTENT_THREADS:
                for ctas in PERSISTENT_CTAS:
                    fn, label = self.persistent.launch(ctas, threads)
                    if fn is None:
                        self.unavailable[f"{self.sparse[0]} ({label.split(':')[0]})"] = label
                    elif f"{self.sparse[0]} ({label})" not in out:
                        out[f"{self.sparse[0]} ({label})"] = self._persistent_run(fn)
        variants = self.dirs[0].proj.choice.variants if self.dirs[0].proj.choice else {}
        for path in variants:
            def key_of(dr: Direction, path=path) -> str:
                return dr.proj.choice.variants.get(path, path)
            label = variants[path][len(path) + 2:-1] if variants[path] != path else ""
            out[f"{path} (steps{', ' + label if label else ''})"] = self._steps_candidate(key_of)
        return out

    def _persistent_run(self, fn: Callable[[], None]) -> Callable[[], torch.Tensor]:
        def run() -> torch.Tensor:
            with cupy_on_torch_stream():
                fn()
            return self.y
        return run

    def bytes_of(self, key: str) -> int:
        """Weight bytes one utterance reads on candidate ``key``: the persistent kernel reads W_hh
        once, the per-step chain once per step after the first."""
        if "(persistent" in key:
            return int(self.persistent.weight_bytes)
        per_step = sum(d.proj.bytes_of(key.split(" (")[0]) for d in self.dirs)
        return int(per_step * max(0, self.steps - 1))

    def reference(self) -> torch.Tensor:
        """float64 recurrence of the rounded operands now in the buffers, h rounded to the dtype per step."""
        H, T = self.hidden, self.steps
        out = torch.zeros(len(self.dirs) * H, T, dtype=torch.float64, device=self.y.device)
        for d, dr in enumerate(self.dirs):
            W = dr.proj.dense.double()
            gx = dr.gx.double()
            b = dr.bias32.double() if dr.bias32 is not None else torch.zeros(4 * H, dtype=torch.float64, device=W.device)
            h = torch.zeros(H, dtype=torch.float64, device=W.device)
            c = torch.zeros_like(h)
            for s in range(T):
                t = T - 1 - s if dr.reverse else s
                a = gx[:, t] + b + (W @ h if s > 0 else 0.0)
                i, f, g, o = a.split(H)
                c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
                h = (torch.sigmoid(o) * torch.tanh(c)).to(self.y.dtype).double()
                out[d * H:(d + 1) * H, t] = h
        return out

    # -- binding ----------------------------------------------------------------------------------

    def bind(self, key: str) -> None:
        self._bound = self.candidates()[key]

    def launch(self) -> None:
        self._bound()


__all__ = ["Direction", "PersistentLstm", "Recurrence", "recurrence_kernel_variants"]
