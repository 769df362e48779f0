"""The LSTM language model's whole token step as one dispatched stage.

Candidates the dispatcher gates and times (the fastest correct one is bound):

- ``dense (steps)``: embedding, per layer the dense (cuBLAS) gate product and the cell kernel,
  the dense decoder: one launch per piece;
- ``balanced (steps)``: the same launches with each matrix on balprune's balanced kernel (the
  launch variant its own dispatch measured fastest; dense where a matrix has no kernel);
- ``balanced (persistent, threads=N)``: kernels/lstm_lm_step.cu, the whole step in ONE
  cooperative launch: every CTA owns a slice of each matrix's rows, has the copy engine stream
  its slices into shared memory from the start of the launch, and takes h from the previous
  layer as tagged words (no grid barrier).

The gate runs each candidate for two token steps from the zero state (the second step reads
the state the first one left) and compares the logits with a float64 step of the same rounded
operands (embedding row, weights, biases; h rounded to the model dtype as both paths store it).
Timing takes single steps (the state evolves; the work per step does not).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from .._linear import STORAGE
from ..measure import cupy_on_torch_stream
from .stages import Choice

_FIELDS = 16  # u64 per phase record (kernels/lstm_lm_step.cu LmField)
_MAX_PHASES = 16  # kernels/lstm_lm_step.cu kMaxPhases
_MAX_BLOCKS = 64  # kernels/lstm_lm_step.cu: 4 * block must fit one byte of an x offset
(K_KIND, K_ROWS, K_UNITS, K_BLOCKS, K_LENGTH, K_KEEP, K_SRC_KIND, K_SRC, K_SRC_LEN, K_VOCAB, K_OFF_B, K_OUT, K_H_OFF,
 K_PRE_OFF) = range(14)
PERSISTENT_SHAPES = ((1024, 32), (1024, 16), (512, 32), (512, 16))  # (threads, lanes per row)


def lm_step_kernel_variants() -> list[str]:
    """Every instantiation of kernels/lstm_lm_step.cu the runtime launches (the compile test builds them)."""
    return [f"bp::lstm_lm_step<{STORAGE[d][1]}, {i}>" for d in STORAGE for i in ("unsigned char", "unsigned short")]


@dataclass
class Phase:
    """One matrix of the step for the persistent kernel: ``values`` / ``indices`` [rows, k, B] (the
    packed balanced arrays, values in the model dtype; re-laid block-major for the kernel), ``length`` L. LSTM phases (``hidden`` H >
    0): rows = 4H gate rows over x = [input | 0 | h] with h starting at column ``off_h``; linear
    phases (hidden 0): the decoder. ``bias32``: fp32 [rows] on the device or None."""

    values: torch.Tensor
    indices: torch.Tensor
    length: int
    hidden: int
    off_h: int
    bias32: torch.Tensor | None


def _pad16(n: int) -> int:
    return -(-n // 16) * 16


class PersistentLm:
    """kernels/lstm_lm_step.cu set up for one model on one device: each phase's weights cut into
    one chunk per CTA (the grid is the device's SM count) and the chunks' addresses, the phase
    records, every layer's tagged h words (``hstate`` [2, hcap]), each CTA's biases and cell state
    (``pre`` [grid, precap]), the launch control words."""

    def __init__(self, phases: list[Phase], *, table: torch.Tensor, token: torch.Tensor, logits: torch.Tensor,
                 dtype: str, device: int) -> None:
        from .. import _gpu
        from ..kernels import load_module

        info = _gpu.device_info(device)
        dev, tdt = logits.device, logits.dtype
        G = info.multiprocessors
        self.grid, self._smem_limit = G, info.smem_per_block_optin
        esize = torch.empty(0, dtype=tdt).element_size()
        self.buffers: list[torch.Tensor] = [table, token, logits]  # held: the kernel has their addresses
        itypes = {p.indices.dtype for p in phases}
        if len(itypes) != 1:
            raise ValueError("the layers and the decoder store indices of different widths")
        idx_dtype = itypes.pop()
        if len(phases) > _MAX_PHASES:
            raise ValueError(f"{len(phases)} matrices in one step: the persistent kernel takes at most {_MAX_PHASES}")
        desc = np.zeros((len(phases), _FIELDS), dtype=np.uint64)
        chunk_addrs = np.zeros((len(phases), G + 1), dtype=np.uint64)
        pre_blocks: list[np.ndarray] = []  # per phase [G, size]: CTA c's biases (and zero c)
        self.region_bytes, self.xcap, self.ucap, self.hcap, self.weight_bytes, self.max_blocks = 0, 0, 0, 0, 0, 0
        self.xrows = 0
        self.precap = 0
        min_blocks = 1 << 30
        prev_hoff, prev_len = None, int(table.shape[1])
        for pi, ph in enumerate(phases):
            R, k, B = (int(s) for s in ph.values.shape)
            H, L = ph.hidden, ph.length
            k2 = k + (k & 1)  # slots per block, padded to even: the kernel reads them in pairs
            # Block-major rows [B, k2] (slot t of block j at j*k2 + t); padding slots: value 0, index 0.
            vals = torch.zeros(R, B, k2, dtype=ph.values.dtype)
            vals[:, :, :k] = ph.values.permute(0, 2, 1)
            idx = torch.zeros(R, B, k2, dtype=ph.indices.dtype)
            idx[:, :, :k] = ph.indices.permute(0, 2, 1)
            vals = (vals.view(torch.int16) if vals.dtype == torch.bfloat16 else vals).numpy().view(np.uint8).reshape(R, -1)
            idx = (idx.view(torch.int16) if idx.dtype == torch.uint16 else idx).numpy().view(np.uint8).reshape(R, -1)
            bias = ph.bias32.cpu().numpy() if ph.bias32 is not None else np.zeros(R, dtype=np.float32)
            chunks, offsets = [], [0]
            # CTA c: LSTM units [c*U, c*U + U) (its 4U gate rows), linear rows [c*RD, c*RD + RD).
            per = -(-H // G) if H else -(-R // G)
            pre = np.zeros((G, 5 * per if H else per), dtype=np.float32)
            for c in range(G):
                n = max(0, min(per, (H or R) - c * per))
                if H:
                    rows = (np.arange(4)[:, None] * H + c * per + np.arange(n)[None, :]).reshape(-1)
                    for q in range(4):
                        pre[c, q * per:q * per + n] = bias[q * H + c * per:q * H + c * per + n]
                else:
                    rows = np.arange(c * per, c * per + n)
                    pre[c, :n] = bias[rows]
                v, i = vals[rows].reshape(-1), idx[rows].reshape(-1)
                blob = np.zeros(_pad16(v.size) + _pad16(i.size), dtype=np.uint8)
                blob[:v.size] = v
                blob[_pad16(v.size):_pad16(v.size) + i.size] = i
                chunks.append(blob)
                offsets.append(offsets[-1] + blob.size)
                self.region_bytes = max(self.region_bytes, -(-blob.size // 128) * 128)
            weights = torch.from_numpy(np.concatenate(chunks)).to(dev)
            self.buffers.append(weights)
            chunk_addrs[pi] = weights.data_ptr() + np.asarray(offsets, dtype=np.uint64)
            self.weight_bytes += int(weights.numel())
            self.xcap = max(self.xcap, B * L)
            self.xrows = max(self.xrows, L)
            min_blocks = min(min_blocks, B)
            self.max_blocks = max(self.max_blocks, B)
            d = desc[pi]
            d[K_KIND], d[K_ROWS], d[K_UNITS], d[K_BLOCKS], d[K_LENGTH], d[K_KEEP] = 0 if H else 1, R, H, B, L, k2
            d[K_PRE_OFF] = self.precap
            pre_blocks.append(pre)
            self.precap += pre.shape[1]
            if pi == 0:
                d[K_SRC_KIND], d[K_SRC], d[K_SRC_LEN], d[K_VOCAB] = 0, table.data_ptr(), int(table.shape[1]), table.shape[0]
            else:
                d[K_SRC_KIND], d[K_SRC], d[K_SRC_LEN] = 1, prev_hoff, prev_len
            if H:
                d[K_OFF_B], d[K_H_OFF] = ph.off_h, self.hcap
                prev_hoff, prev_len = self.hcap, H
                self.hcap += H
                self.ucap = max(self.ucap, per)
            else:
                d[K_OUT] = logits.data_ptr()
        self.phases = len(phases)
        self.token = token
        # Words of 32 bits (16-bit h and its tag) or 64 bits (fp32 h and its tag), as int32 pairs.
        self.hstate = torch.zeros(2, max(1, self.hcap) * (2 if esize == 4 else 1), dtype=torch.int32, device=dev)
        self.pre_init = torch.from_numpy(np.concatenate(pre_blocks, axis=1) if pre_blocks else
                                         np.zeros((G, 0), np.float32)).contiguous().to(dev)
        self.pre = self.pre_init.clone()
        self.recs = torch.from_numpy(desc.reshape(-1).view(np.int64)).to(dev)
        self.chunks = torch.from_numpy(chunk_addrs.reshape(-1).view(np.int64)).to(dev)
        self.ctl = torch.zeros(32, dtype=torch.int32, device=dev)
        self.lpr = min(32, 1 << (min_blocks.bit_length() - 1))
        # x staged in rows of 64 floats; x in column order in their unused upper halves when
        # every matrix has <= 32 blocks per row (kernels/lstm_lm_step.cu).
        self.xl_inline = self.max_blocks <= 32
        xfloats = 64 * self.xrows + (0 if self.xl_inline else self.xcap)
        head = -(-(16 + 16 * _MAX_PHASES + 8 * _MAX_PHASES * _FIELDS
                   + 4 * (xfloats + 4 * self.ucap + self.hcap + self.precap)) // 128) * 128
        self.regions = 2 if head + 2 * self.region_bytes <= self._smem_limit else 1
        self.shared_bytes = head + self.regions * self.region_bytes
        ity = "unsigned char" if idx_dtype == torch.uint8 else "unsigned short"
        self.kernel_name = f"bp::lstm_lm_step<{STORAGE[dtype][1]}, {ity}>"
        self.fn = load_module("lstm_lm_step.cu", (self.kernel_name,), device=device).get_function(self.kernel_name)

    def reset(self) -> None:
        """Zero state: every layer's h words (their tags too: a zero word never matches a tag) and c."""
        self.hstate.zero_()
        self.pre.copy_(self.pre_init)

    def launch(self, threads: int, lpr: int | None = None, copy_late: bool = False
               ) -> tuple[Callable[[], None] | None, str]:
        """(bound cooperative launch, label), or (None, why) when it cannot run on this device.
        ``lpr``: lanes per row (a power of two <= 32 and <= the narrowest matrix's block count;
        default that bound); ``copy_late``: ask for the first weight copy after the prologue's
        loads have landed instead of while they are in flight (kernels/lstm_lm_step.cu)."""
        import cupy as cp

        from .._launch import function_ptr, prepared

        lpr = self.lpr if lpr is None else min(lpr, self.lpr)
        label = f"persistent, threads={threads}, lanes/row={lpr}" + (", copy after prologue" if copy_late else "")
        if self.shared_bytes > self._smem_limit:
            return None, f"{label}: needs {self.shared_bytes} bytes of shared memory per CTA (limit {self._smem_limit})"
        if self.shared_bytes > 48 * 1024 and self.fn.max_dynamic_shared_size_bytes < self.shared_bytes:
            self.fn.max_dynamic_shared_size_bytes = self.shared_bytes
        per_sm = cp.cuda.driver.occupancyMaxActiveBlocksPerMultiprocessor(function_ptr(self.fn), threads,
                                                                           self.shared_bytes)
        if per_sm < 1:
            return None, f"{label}: a CTA of {threads} threads does not fit an SM"
        if self.max_blocks > _MAX_BLOCKS:
            return None, f"{label}: {self.max_blocks} blocks per row (the persistent kernel takes at most {_MAX_BLOCKS})"
        return prepared(self.fn, (self.grid,), (threads,), self.args(lpr, copy_late=copy_late), self.shared_bytes,
                        cooperative=True), label

    def args(self, lpr: int, phases: int | None = None, copy_late: bool = False) -> tuple:
        """The kernel's arguments (``phases``: run only the first ones; diagnostics)."""
        return (np.uint64(self.recs.data_ptr()), np.int32(self.phases if phases is None else phases),
                np.int32(self.regions), np.uint32(self.region_bytes), np.int32(self.xcap), np.int32(self.xrows),
                np.int32(self.xl_inline), np.int32(self.ucap),
                np.int32(self.hcap), np.int32(self.precap), np.uint64(self.ctl.data_ptr()), np.int32(lpr),
                np.uint64(self.token.data_ptr()), np.uint64(self.chunks.data_ptr()), np.uint64(self.pre.data_ptr()),
                np.uint64(self.hstate.data_ptr()), np.int32(copy_late))


class LmStep:
    """One token step of the LSTM LM (embedding -> layers -> decoder), a stage with the dispatcher's
    surface (stages.dispatch) plus ``timing_candidates``: single steps for the timer.

    ``model``: the PackedLstmLm being built (its token, table, logits, reset, and each layer's
    projections, cell launches and embedding launch); ``persistent``: a PersistentLm or None
    (``persistent_reason`` says why)."""

    def __init__(self, model, persistent: PersistentLm | None, persistent_reason: str = "") -> None:
        self.model = model
        self.persistent = persistent
        self.name = "token step (embedding, " + ", ".join(f"{'+'.join(p.name for p in ps)}" for ps in model.layer_projs) \
            + f", {model.decoder.name})"
        self.dtype = model.dtype
        projs = [p for ps in model.layer_projs for p in ps] + [model.decoder]
        self.rows = sum(p.rows for p in projs)
        self.cols = max(p.cols for p in projs)
        self.batch = 1
        self.pattern = "balanced" if any(p.sparse is not None for p in projs) else "dense"
        self.sparse = ("balanced", persistent) if any(p.sparse is not None for p in projs) else None
        self.sparse_reason = "" if self.sparse else "no matrix of the step has a sparse kernel"
        self._projs = projs
        self._unavailable = {} if persistent is not None or not persistent_reason else \
            {"balanced (persistent)": persistent_reason}
        self.choice: Choice | None = None
        self._bound: Callable[[], None] | None = None
        v = model.table.shape[0]
        self.gate_tokens = (v // 3, (2 * v) // 3)

    # -- candidates -------------------------------------------------------------------------------

    def _steps(self, path: str) -> Callable[[], None]:
        """The per-piece launches with every matrix on ``path`` (its best variant), dense where it has none."""
        m = self.model
        fns = {}
        for p in self._projs:
            key = p.choice.variants.get(path, "dense") if p.choice else "dense"
            fns[p.name] = p.candidates()[key]
        launches = [m.embedding_launch]
        for ps, cell in zip(m.layer_projs, m.cell_launches):
            launches += [fns[p.name] for p in ps] + [cell]
        launches.append(fns[m.decoder.name])

        def step() -> None:
            with cupy_on_torch_stream():
                for f in launches:
                    f()
        return step

    def timing_candidates(self) -> dict[str, Callable[[], None]]:
        out: dict[str, Callable[[], None]] = {}
        if self.persistent is not None:
            for (threads, lpr), late in itertools.product(PERSISTENT_SHAPES, (False, True)):
                fn, label = self.persistent.launch(threads, lpr, late)
                if fn is None:
                    self._unavailable[f"balanced ({label.split(':')[0]})"] = label
                    continue
                if f"balanced ({label})" in out:  # lanes/row capped by a narrow matrix: same launch
                    continue

                def step(fn=fn) -> None:
                    with cupy_on_torch_stream():
                        fn()
                out[f"balanced ({label})"] = step
        if self.sparse is not None:
            out["balanced (steps)"] = self._steps("balanced")
        out["dense (steps)"] = self._steps("dense")
        return out

    def candidates(self) -> dict[str, Callable[[], torch.Tensor]]:
        """Gate runs: two steps from the zero state (tokens ``gate_tokens``), returning the logits."""
        m = self.model

        def two_steps(step) -> Callable[[], torch.Tensor]:
            def run() -> torch.Tensor:
                m.reset()
                for t in self.gate_tokens:
                    m.token.fill_(t)
                    step()
                return m.logits
            return run
        return {k: two_steps(f) for k, f in self.timing_candidates().items()}

    @property
    def unavailable(self) -> dict[str, str]:
        return dict(self._unavailable)

    def bytes_of(self, key: str) -> int:
        if "(persistent" in key:
            return int(self.persistent.weight_bytes)
        path = key.split(" (")[0]
        total = 0
        for p in self._projs:
            k = p.choice.variants.get(path, "dense") if p.choice else "dense"
            total += p.bytes_of(k)
        return total

    def reference(self) -> torch.Tensor:
        """float64 logits of the second of two steps from the zero state (see the module doc)."""
        m = self.model
        f64 = torch.float64
        h = [torch.zeros(ly.hidden, dtype=f64, device=m.dev) for ly in m.layer_refs]
        c = [torch.zeros(ly.hidden, dtype=f64, device=m.dev) for ly in m.layer_refs]
        logits = None
        for t in self.gate_tokens:
            x = m.table[t].double()
            for li, ly in enumerate(m.layer_refs):
                H = ly.hidden
                if ly.fused is not None:
                    xh = torch.zeros(ly.fused.shape[1], dtype=f64, device=m.dev)
                    xh[:x.numel()] = x
                    xh[ly.off_h:] = h[li]
                    a = ly.fused.double() @ xh
                else:
                    a = ly.w_ih.double() @ x + ly.w_hh.double() @ h[li]
                if ly.bias32 is not None:
                    a = a + ly.bias32.double()
                i, f, g, o = a.split(H)
                c[li] = torch.sigmoid(f) * c[li] + torch.sigmoid(i) * torch.tanh(g)
                h[li] = (torch.sigmoid(o) * torch.tanh(c[li])).to(m.tdt).double()
                x = h[li]
            logits = m.decoder.dense.double() @ x
            if m.decoder.bias32 is not None:
                logits = logits + m.decoder.bias32.double()
        return logits

    # -- binding ----------------------------------------------------------------------------------

    def bind(self, key: str) -> None:
        self._bound = self.timing_candidates()[key]

    def launch(self) -> None:
        self._bound()


__all__ = ["LmStep", "Phase", "PersistentLm", "lm_step_kernel_variants"]
