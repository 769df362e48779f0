"""LSTM runtimes: the language model's token step and the Bi-LSTM acoustic model's utterance.

Gates: torch's order (i, f, g, o); the cell (kernels/model_ops.cu lstm_cell) adds the biases,
applies the nonlinearities, keeps c in float32 and writes h where the next launch reads it, so a
layer is one matrix product plus one element-wise launch.

Language model (one token step, batch 1): each layer multiplies one buffer xh = [x | 0 | h] by
W_ih and W_hh fused into one balanced matrix [4H, B_ih*L + H] when both have the same block
length and keep count (block j of the fused row is block j of W_ih for j < B_ih, else block
j - B_ih of W_hh; x's padding columns hold zeros): one launch instead of two, and a wider row
(more blocks per lane group) for the kernel. The cell writes h into this layer's xh (for the
next step) and into the next layer's (or the decoder's) input.

Bi-LSTM (one utterance of T frames, batch 1): per layer and direction, W_ih multiplies all T
frames at once (one SpMM over [in, T]); then the layer's recurrence (recurrence.py): T steps of
W_hh h and the cell, which writes h into column t of the layer's [2H, T] output, either as
per-step launches (the reverse direction on a second stream) or as one persistent kernel for
every step of both directions, whichever the dispatcher measured faster.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ...errors import UsageError
from .base import PackedModel, check_float_request, load_dense, load_packed


def _fused_gates(ih, hh):
    """(values, indices, cols, block_length, h offset) of [W_ih | 0 | W_hh] as one balanced matrix,
    or None when the two are not both balanced with one block length and keep count."""
    from ...formats.balanced import BalancedTensor

    if not (isinstance(ih, BalancedTensor) and isinstance(hh, BalancedTensor)):
        return None
    gi, gh = ih.geometry, hh.geometry
    if (gi.block_length, gi.keep, gi.rows) != (gh.block_length, gh.keep, gh.rows) or ih.indices.dtype != hh.indices.dtype:
        return None
    off_h = gi.blocks * gi.block_length
    return (torch.cat([ih.values, hh.values], dim=2).contiguous(), torch.cat([ih.indices, hh.indices], dim=2).contiguous(),
            off_h + gh.cols, gi.block_length, off_h)


def check_tokens(tokens, vocab: int) -> list[int]:
    """The token ids of an LM request as ints; UsageError (one line) unless they are a non-empty
    1-D integer sequence of ids in [0, vocab). Checked on the host: the embedding kernel would
    turn an out-of-range id into a zero row without a word."""
    t = torch.as_tensor(tokens)
    if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
        raise UsageError(f"tokens must be integer ids, got dtype {t.dtype}")
    if t.dim() != 1 or t.numel() == 0:
        raise UsageError(f"tokens must be a non-empty 1-D sequence of ids, got shape {list(t.shape)}")
    ids = [int(v) for v in t.tolist()]
    bad = [v for v in ids if not 0 <= v < vocab]
    if bad:
        raise UsageError(f"token id {bad[0]} is outside the vocabulary [0, {vocab}) ({len(bad)} such id(s))")
    return ids


def check_frames(frames, count: int, features: int) -> torch.Tensor:
    """An utterance as a float tensor [count, features]; UsageError (one line) for another shape, a
    non-float dtype or non-finite values."""
    return check_float_request(frames, (count, features), "frames", f"{count} frames")


def _bias(pf, a: str | None, b: str | None):
    parts = [load_dense(pf, n).float() for n in (a, b) if n is not None]
    return sum(parts) if parts else None


def _matrix(packed) -> torch.Tensor:
    from ...formats.base import as_matrix

    return as_matrix(packed if isinstance(packed, torch.Tensor) else packed.to_dense())


@dataclass
class _LayerRef:
    """What the float64 reference of one LM layer needs: the fused gate matrix (or W_ih and W_hh)."""

    hidden: int
    off_h: int
    fused: torch.Tensor | None
    w_ih: torch.Tensor | None
    w_hh: torch.Tensor | None
    bias32: torch.Tensor | None


class PackedLstmLm(PackedModel):
    """The LSTM language model, one token step per ``run()`` (state carried between steps).

    The step is one dispatched stage (lm_step.LmStep): per-piece launches (each matrix on its
    fastest path, dense or balanced) or the whole step in one persistent launch, whichever
    measured faster; ``choices`` holds that stage's record."""

    unit = "token step"

    def __init__(self, pf, arch, *, dtype: str = "float16", device: int = 0, paths: str = "auto",
                 measure: bool = True, progress=None) -> None:
        from ..balanced import BalancedLinear
        from .lm_step import LmStep, PersistentLm, Phase
        from .stages import dispatch

        super().__init__(arch, dtype=dtype, device=device, paths=paths, measure=measure, progress=progress)
        dev, tdt, K = self.dev, self.tdt, self.kernels
        self.token = torch.zeros(1, dtype=torch.int64, device=dev)
        self.table = load_dense(pf, arch.embedding).to(dev, tdt).contiguous()
        vocab, dim = (int(d) for d in self.table.shape)
        self.xh: list[torch.Tensor] = []
        self.cells: list[torch.Tensor] = []
        self.layer_projs: list[list] = []
        self.layer_refs: list[_LayerRef] = []
        cell_args = []
        phases: list[Phase] | None = []
        why = ""
        for li, cell in enumerate(arch.cells):
            H = cell.hidden
            ih, hh = load_packed(pf, cell.weight_ih), load_packed(pf, cell.weight_hh)
            fused = _fused_gates(ih, hh)
            off_h = fused[4] if fused is not None else cell.input_size
            xh = torch.zeros(off_h + H, dtype=tdt, device=dev)
            gates = torch.empty(4 * H, dtype=tdt, device=dev)
            c = torch.zeros(H, dtype=torch.float32, device=dev)
            bias = _bias(pf, cell.bias_ih, cell.bias_hh)
            bias32 = None if bias is None else bias.to(dev, torch.float32).contiguous()
            x_part, h_part = xh[:cell.input_size], xh[off_h:]
            self._random_(x_part)
            self._random_(h_part)
            w_ih, w_hh = _matrix(ih), _matrix(hh)
            if fused is not None:
                values, indices, cols, L, _ = fused
                dense = torch.zeros(4 * H, cols, dtype=torch.float32)
                dense[:, :cell.input_size] = w_ih
                dense[:, off_h:] = w_hh
                name = f"{cell.weight_ih}+{cell.weight_hh}"
                op = BalancedLinear(values.to(tdt), indices, cols=cols, block_length=L, device=self.device, name=name,
                                    validate=False)  # from PackedFile.load: checked on the bytes it returned
                projs = [self._projection(name, dense, xh, gates, None, pattern="balanced", sparse=("balanced", op))]
                gh = None
                self.layer_refs.append(_LayerRef(H, off_h, projs[0].dense, None, None, bias32))
                if phases is not None:
                    phases.append(Phase(values.to(tdt), indices, L, H, off_h, bias32))
            else:
                gh = torch.empty(4 * H, dtype=tdt, device=dev)
                projs = [self._projection(cell.weight_ih, w_ih, x_part, gates, ih),
                         self._projection(cell.weight_hh, w_hh, h_part, gh, hh)]
                self.layer_refs.append(_LayerRef(H, off_h, None, projs[0].dense, projs[1].dense, bias32))
                phases, why = None, f"layer {li}: W_ih and W_hh are not one balanced geometry (no fused gate matrix)"
            for p in projs:
                if self._progress:
                    self._progress(f"dispatching {p.name}")
                dispatch(p, self.paths, self.measure)
            cell_args.append((gates, gh, bias32, c, xh, off_h, H))
            self.layer_projs.append(projs)
            self.xh.append(xh)
            self.cells.append(c)
        # Each cell writes h into its own xh (next step) and into the next layer's input.
        self.cell_launches = [self._cell_launch(*a, self.xh[li + 1] if li + 1 < len(cell_args) else None)
                              for li, a in enumerate(cell_args)]
        dec = arch.fcs[0]
        off_l, xh_l = self.layer_refs[-1].off_h, self.xh[-1]
        self.logits = torch.empty(dec.out_features, dtype=tdt, device=dev)
        dec_packed = load_packed(pf, dec.weight)
        self.decoder = self._projection(dec.weight, _matrix(dec_packed), xh_l[off_l:], self.logits, dec_packed,
                                        bias=None if dec.bias is None else load_dense(pf, dec.bias))
        if self._progress:
            self._progress(f"dispatching {dec.weight}")
        dispatch(self.decoder, self.paths, self.measure)
        self.embedding_launch = K.bound("embedding_row", dim, (self._ptr(self.token), self._ptr(self.table),
                                                               np.int64(vocab), np.int32(dim), self._ptr(self.xh[0])))
        from ...formats.balanced import BalancedTensor

        persistent = None
        if phases is not None and not isinstance(dec_packed, BalancedTensor):
            phases, why = None, "the decoder is not balanced"
        if phases is not None:
            g = dec_packed.geometry
            phases.append(Phase(dec_packed.values.to(tdt), dec_packed.indices, g.block_length, 0, 0,
                                self.decoder.bias32))
            try:
                persistent = PersistentLm(phases, table=self.table, token=self.token, logits=self.logits,
                                          dtype=self.dtype, device=self.device)
            except ValueError as e:
                why = str(e)
        self.persistent = persistent
        self.step = LmStep(self, persistent, why)
        self._dispatch(self.step)
        self.reset()

    def _cell_launch(self, gates, gh, bias32, c, xh, off_h, H, nxt):
        """The cell of one layer: h into this layer's xh (next step) and into ``nxt`` (next layer's input)."""
        return self.kernels.bound("lstm_cell", H, (
            self._ptr(gates), np.int64(1), self._ptr(gh), self._ptr(bias32), self._ptr(c), self._ptr(xh, off_h),
            self._ptr(nxt), np.int64(1), np.int32(H)))

    def reset(self) -> None:
        """Zero state: h (in every xh, and the persistent kernel's h words) and c."""
        for t in self.xh + self.cells:
            t.zero_()
        if self.persistent is not None:
            self.persistent.reset()

    def load_inputs(self, inputs: dict) -> None:
        """Reset the state and load the first token of ``inputs["tokens"]`` (run() = its step)."""
        ids = check_tokens(inputs["tokens"], self.table.shape[0])
        self.reset()
        self.token.fill_(ids[0])

    def run(self) -> None:
        self.step.launch()

    def forward(self, inputs: dict) -> torch.Tensor:
        """Logits of each token of ``inputs["tokens"]`` [steps], one step at a time from a zero state: [steps, vocab]."""
        ids = check_tokens(inputs["tokens"], self.table.shape[0])
        self.reset()
        out = []
        for t in ids:
            self.token.fill_(t)
            self.run()
            out.append(self.logits.float().cpu())
        return torch.stack(out)


class PackedBiLstm(PackedModel):
    """The Bi-LSTM acoustic model, one utterance of ``frames`` frames per ``run()``.

    Per layer: the input projection of each direction (a Projection over all frames; the two run
    on two streams), then the layer's Recurrence stage (recurrence.py: every step of both
    directions, per-step launches or one persistent kernel, whichever measured faster), which
    writes the layer's [2H, frames] output; then the classifier over all frames."""

    unit = "utterance"

    def __init__(self, pf, arch, *, dtype: str = "float16", device: int = 0, paths: str = "auto",
                 measure: bool = True, frames: int = 50, progress=None) -> None:
        from .recurrence import Direction, Recurrence
        from .stages import dispatch

        super().__init__(arch, dtype=dtype, device=device, paths=paths, measure=measure, progress=progress)
        if isinstance(frames, bool) or not isinstance(frames, int) or frames < 1:
            raise UsageError(f"frames must be a positive int, got {frames!r}")
        dev, tdt, T = self.dev, self.tdt, frames
        self.frames = T
        self.x0 = self._random_(torch.empty(arch.features, T, dtype=tdt, device=dev))
        self._side = torch.cuda.Stream(device=dev)
        self._layers = []  # per layer: ([input projection per direction], Recurrence)
        x = self.x0
        for layer in range(arch.layers):
            cells = sorted((c for c in arch.cells if c.layer == layer), key=lambda c: c.reverse)
            H = cells[0].hidden
            y = torch.zeros(len(cells) * H, T, dtype=tdt, device=dev)
            dirs, inputs = [], []
            for cell in cells:
                ih, hh = load_packed(pf, cell.weight_ih), load_packed(pf, cell.weight_hh)
                gx = torch.empty(4 * H, T, dtype=tdt, device=dev)
                gh = torch.empty(4 * H, dtype=tdt, device=dev)
                h = self._random_(torch.empty(H, dtype=tdt, device=dev))
                bias = _bias(pf, cell.bias_ih, cell.bias_hh)
                bias32 = None if bias is None else bias.to(dev, torch.float32).contiguous()
                if layer > 0:
                    self._random_(x)  # sample data for the gate (run() overwrites it)
                p_ih = self._projection(cell.weight_ih, _matrix(ih), x, gx, ih)
                self._dispatch(p_ih)
                p_ih.launch()  # gx from sample data: the recurrence's dispatch input
                # W_hh h for one step: measured here to pick the per-step chain's launch; the
                # layer's record is the Recurrence stage's (all steps).
                p_hh = self._projection(cell.weight_hh, _matrix(hh), h, gh, hh)
                dispatch(p_hh, self.paths, self.measure)
                dirs.append(Direction(cell.reverse, p_hh, gx, bias32, torch.zeros(H, dtype=torch.float32, device=dev), hh))
                inputs.append(p_ih)
            names = " + ".join(c.weight_hh for c in cells)
            rec = Recurrence(f"{names} ({T} steps)", dirs, y, hidden=H, steps=T, dtype=self.dtype, device=self.device,
                             kernels=self.kernels, hold=self._held.append, side=self._side)
            self._dispatch(rec)
            self._layers.append((inputs, rec))
            x = y
        cls = arch.fcs[0]
        self.out = torch.empty(cls.out_features, T, dtype=tdt, device=dev)
        cls_packed = load_packed(pf, cls.weight)
        self.classifier = self._projection(cls.weight, _matrix(cls_packed), x, self.out, cls_packed,
                                           bias=None if cls.bias is None else load_dense(pf, cls.bias))
        self._dispatch(self.classifier)

    def load_inputs(self, inputs: dict) -> None:
        f = check_frames(inputs["frames"], self.frames, self.arch.features)
        self.x0.copy_(f.to(self.dev, self.tdt).t())

    def run(self) -> None:
        cur = torch.cuda.current_stream()
        for inputs, rec in self._layers:
            for p in inputs[1:]:
                self._side.wait_stream(cur)
                with torch.cuda.stream(self._side):
                    self._launch_all([p.launch])
            self._launch_all([inputs[0].launch])
            if len(inputs) > 1:
                cur.wait_stream(self._side)
            rec.launch()
        self._launch_all([self.classifier.launch])

    def forward(self, inputs: dict) -> torch.Tensor:
        """[frames, labels] float32 on the CPU."""
        self.load_inputs(inputs)
        self.run()
        return self.out.float().t().cpu()
