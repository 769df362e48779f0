"""One conv layer of a vision runtime (vgg.py, resnet.py) as a dispatchable stage on static buffers.

``out = act(conv2d(x, W, stride, padding) + bias [+ residual])``, then VGG's 2x2 max-pool where the
layer has one; ``act`` is ReLU when the layer's ConvRef says so, and always after a residual add (a
ResNet block's last conv: models.arch.ResBlockRef). ``x``, ``residual`` and ``out`` are buffers the
model owns for its lifetime (the previous stage's ``out``), so every path is bound once as a fixed
sequence of launches: no allocation by balprune, nothing but launch calls on the host. Three paths,
each gated and timed by stages.dispatch:

- "dense": torch's conv2d (cuDNN, tensor cores) on the masked weight, its result moved into ``out`` by
  the launch that applies the ReLU (clamp_min), the residual add or the pool anyway; NCHW and
  channels-last are launch variants, each timed, the faster kept; so is "fused" where a ReLU ends the
  stage and no pool follows: cuDNN's conv + bias + ReLU (+ the residual add) as one op writing ``out``
  (aten.cudnn_convolution_relu / cudnn_convolution_add_relu), reported as unavailable where this torch
  or cuDNN cannot run it;
- the im2col path (the layer's balanced SpMM, path "balanced"): the SpMM of the [C_out, C_in*kh*kw]
  view over OH*OW columns, straight on ``x`` for a 1x1 stride-1 conv, else on an im2col
  (kernels/model_ops.cu, any stride) of it; bias (and ReLU, without a residual) in its epilogue, or
  bias + ReLU + 2x2 pool in one pass after it (bias_relu_pool2);
- "balanced_conv" (patterns.registry.MODEL_CONV_PATH): the direct balanced convolution (runtime.conv,
  its prepared launch: no im2col), ReLU in its epilogue; its tiled, small-map and gather kernels are
  launch variants, each timed where it takes the map, the fastest kept (the table's "launch" note says
  which).

A residual is added, and ReLU applied after it, by one element-wise launch (model_ops.cu add_relu) on
the sparse paths, by torch.add + relu_ on the dense one. At batch 1 the early layers' OH*OW is large
(50176 columns at 224x224), where tensor cores win by far; the late 7x7 and 14x14 layers are where
the sparse paths can; the dispatcher measures them on this GPU and says which ran.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ...errors import UsageError
from ...patterns.registry import MODEL_CONV_PATH as DIRECT
from ..measure import exact_float32, float32_is_exact
from .base import PackedModel, load_dense
from .lstm import _matrix
from .stages import ptr, sparse_operator

#: The dense path's launch variants: "dense" is NCHW, "dense (channels-last)" the other memory layout,
#: "dense (fused)" cuDNN's one-op conv + bias + ReLU (+ residual) in NCHW (ReLU stages without a pool).
DENSE_LAYOUTS = ("NCHW", "channels-last", "fused")


def fused_conv_relu(x, w, bias, stride: int, pad: int, out, residual=None) -> None:
    """out = ReLU(conv2d(x, w, stride, pad) + bias [+ residual]) by one cuDNN op (x, out, residual [1, C, H, W]).
    Why: the separate ReLU / add launch that moves conv2d's result into ``out`` costs as much as a small conv
    at batch 1 (BENCHMARKS.md: the runtime's dense stages 11-20 us against cuDNN's 7-16)."""
    st, pd, dil = [stride, stride], [pad, pad], [1, 1]
    if residual is None:
        torch.ops.aten.cudnn_convolution_relu.out(x, w, bias, st, pd, dil, 1, out=out)
    else:
        torch.ops.aten.cudnn_convolution_add_relu.out(x, w, residual, 1.0, bias, st, pd, dil, 1, out=out)


class ConvStage:
    """One conv (see module doc) with the surface stages.dispatch expects.

    ``x`` [C_in, H, W] is the stage's input buffer (holding sample data when the stage is built: the
    dispatcher gates and times with it), ``residual`` [C_out, OH, OW] or None the buffer added before
    the final ReLU, ``out`` the output buffer (allocated here when None; VGG's last conv gets a view of
    fc6's input). After ``dispatch``, ``__call__()`` runs the bound path and returns ``out``.
    """

    def __init__(self, model: PackedModel, ref, packed, pf, x: torch.Tensor, *, residual: torch.Tensor | None = None,
                 out: torch.Tensor | None = None) -> None:
        self.name, self.dtype, self.kernels = ref.weight, model.dtype, model.kernels
        dev, tdt = model.dev, model.tdt
        cin, cout, k, pad, stride = ref.in_channels, ref.out_channels, ref.kernel, ref.padding, ref.stride
        if x.dim() != 3 or int(x.shape[0]) != cin or not x.is_contiguous():
            raise UsageError(f"{self.name}: input is {list(x.shape)}, the layer takes a contiguous [{cin}, H, W]")
        _, H, W = (int(d) for d in x.shape)
        OH, OW = (H + 2 * pad - k) // stride + 1, (W + 2 * pad - k) // stride + 1
        if OH < 1 or OW < 1:
            raise UsageError(f"{self.name}: a {H}x{W} input is smaller than the {k}x{k} kernel")
        if residual is not None and tuple(residual.shape) != (cout, OH, OW):
            raise UsageError(f"{self.name}: residual is {list(residual.shape)}, the conv gives {[cout, OH, OW]}")
        if ref.pool_after and (residual is not None or not ref.relu):
            raise UsageError(f"{self.name}: a pool follows conv + bias + ReLU only (VGG's layers)")
        self.x, self.residual = x, residual
        self.H, self.W, self.OH, self.OW = H, W, OH, OW
        self.k, self.pad, self.stride, self.pool = k, pad, stride, ref.pool_after
        self.relu = ref.relu or residual is not None  # a residual add is always followed by ReLU
        self.rows, self.cols, self.batch = cout, cin * k * k, OH * OW
        shape = (cout, OH // 2, OW // 2) if self.pool else (cout, OH, OW)
        if out is None:
            out = torch.empty(shape, dtype=tdt, device=dev)
        elif tuple(out.shape) != shape or not out.is_contiguous():
            raise UsageError(f"{self.name}: output buffer is {list(out.shape)}, the layer gives {list(shape)}")
        self.out = out
        self.pattern = getattr(packed, "pattern", "dense")
        self.dense = _matrix(packed).to(dev, tdt).contiguous()
        self.w4 = self.dense.view(cout, cin, k, k)
        b = load_dense(pf, ref.bias) if ref.bias is not None else None
        self.bias_t = None if b is None else b.to(dev, tdt)
        self.bias32 = None if b is None else b.to(dev, torch.float32)
        path, op = sparse_operator(packed, model.dtype, model.device, self.name)
        self.sparse, self.sparse_reason = ((path, op), "") if path is not None else (None, op)
        #: the direct convolution (runtime.conv, kernels/balanced_conv.cu) of a balanced conv weight
        self.direct = None
        self.unavailable: dict[str, str] = {}
        if path == "balanced" and model.paths != "dense":
            from ..conv import BalancedConv2d

            try:
                self.direct = BalancedConv2d(packed.values.to(tdt), packed.indices, in_channels=cin, kh=k, kw=k,
                                             block_length=packed.geometry.block_length, stride=stride, padding=pad,
                                             bias=self.bias32, device=model.device, validate=False, name=self.name)
            except UsageError as exc:  # a shape the direct kernel does not take
                self.unavailable[DIRECT] = str(exc)
        self.choice = None
        self._fn = None
        self._views = model.views
        # the full-size conv result where a pool follows it (the pooled result is ``out``)
        self.y_buf = torch.empty(cout, OH, OW, dtype=tdt, device=dev) if self.pool else None
        # the explicit im2col operand, except where x already is it (1x1, stride 1, no padding)
        self.x_is_operand = k == 1 and stride == 1 and pad == 0
        self.cols_buf = (torch.empty(self.cols, OH * OW, dtype=tdt, device=dev)
                         if self.sparse is not None and not self.x_is_operand else None)

    # -- the paths ------------------------------------------------------------------------------------

    def _residual_launch(self, y: torch.Tensor):
        """The launch of y = act(y + residual) in place (model_ops.cu add_relu), or None without a residual."""
        if self.residual is None:
            return None
        n = y.numel()
        return self.kernels.bound("add_relu", n, (ptr(y), ptr(self.residual), np.int64(n),
                                                   np.int32(1 if self.relu else 0)))

    def _pool_launch(self, bias: torch.Tensor | None):
        """VGG: out = ReLU(max-pool 2x2 of y_buf + bias) in one pass (bias_relu_pool2; None: y_buf is biased)."""
        cout, OH, OW = self.rows, self.OH, self.OW
        return self.kernels.bound("bias_relu_pool2", cout * (OH // 2) * (OW // 2), (
            ptr(self.y_buf), ptr(bias), np.int32(cout), np.int32(OH), np.int32(OW), ptr(self.out)))

    def _sequence(self, *launches):
        """run(): the given launches (None ones skipped) in order, returning ``out``."""
        todo, out = [f for f in launches if f is not None], self.out

        def run() -> torch.Tensor:
            for f in todo:
                f()
            return out
        return run

    def _dense_fn(self, layout: str = "NCHW"):
        if layout not in DENSE_LAYOUTS:
            raise ValueError(f"{self.name}: no dense layout {layout!r} (one of {', '.join(DENSE_LAYOUTS)})")
        b, pad, stride, x, out = self.bias_t, self.pad, self.stride, self.x, self.out
        res, relu, pool = self.residual, self.relu, self.pool
        if layout == "fused":
            return self._fused_fn()
        cl = layout == "channels-last"
        # channels-last: cuDNN's NHWC kernels, often faster at batch 1; the input is converted by one copy and
        # the result comes back to NCHW in the launch that moves it into out anyway
        w = self.w4.contiguous(memory_format=torch.channels_last) if cl else self.w4
        # float32 stages run cuDNN in float32, not torch's default TF32 (measure.exact_float32 says why);
        # entering the context costs ~7 us of host time, so only where the caller has not already (bench
        # runs everything inside it)
        fp32 = w.dtype == torch.float32

        def run() -> torch.Tensor:
            xin = x[None].contiguous(memory_format=torch.channels_last) if cl else x[None]
            if fp32 and not float32_is_exact():
                with exact_float32():
                    y = F.conv2d(xin, w, b, stride=stride, padding=pad)[0]
            else:
                y = F.conv2d(xin, w, b, stride=stride, padding=pad)[0]
            if pool:
                y = F.max_pool2d(y, 2)  # ReLU commutes with the max: applied by the move into out
            if res is not None:
                torch.add(y, res, out=out)
                if relu:
                    out.relu_()
            elif relu:
                torch.clamp_min(y, 0, out=out)
            else:
                out.copy_(y)
            return out
        return run

    def _fused_fn(self):
        """The "dense (fused)" variant: conv + bias + ReLU (+ residual) straight into ``out``, one op."""
        if not self.relu or self.pool:
            raise ValueError(f"{self.name}: the fused dense variant takes a ReLU stage without a pool")
        x4, w, b, out4 = self.x[None], self.w4, self.bias_t, self.out[None]
        r4 = None if self.residual is None else self.residual[None]
        stride, pad, out = self.stride, self.pad, self.out
        fp32 = w.dtype == torch.float32

        def run() -> torch.Tensor:
            if fp32 and not float32_is_exact():  # as the NCHW variant: no TF32 in a float32 stage
                with exact_float32():
                    fused_conv_relu(x4, w, b, stride, pad, out4, r4)
            else:
                fused_conv_relu(x4, w, b, stride, pad, out4, r4)
            return out
        return run

    def _im2col_fn(self):
        K, out = self.kernels, self.out
        cin, k, OH, OW = self.cols // (self.k * self.k), self.k, self.OH, self.OW
        if self.x_is_operand:
            im2col, operand = None, self.x.view(cin, OH * OW)
        else:
            operand = self.cols_buf
            im2col = K.bound("im2col", self.cols * OH * OW, (
                ptr(self.x), np.int32(cin), np.int32(self.H), np.int32(self.W), np.int32(k), np.int32(k),
                np.int32(self.pad), np.int32(self.stride), np.int32(OH), np.int32(OW), ptr(self.cols_buf)))
        xv = self._views(operand)
        if self.pool:  # VGG: the product, then bias + ReLU + the 2x2 pool in one pass into out
            spmm = self.sparse[1].prepared_launch(xv, self._views(self.y_buf.view(self.rows, OH * OW)), self.batch)
            post = self._pool_launch(self.bias32)
        else:  # bias (and ReLU without a residual) in the product's epilogue, straight into out
            bias = None if self.bias32 is None else self._views(self.bias32)
            spmm = self.sparse[1].prepared_launch(xv, self._views(out.view(self.rows, OH * OW)), self.batch,
                                                  bias=bias, relu=self.relu and self.residual is None)
            post = self._residual_launch(out)
        return self._sequence(im2col, spmm, post)

    def _direct_fn(self, kernel: str | None):
        """The direct convolution on ``kernel`` ("tiled", "map", "gather"; None: the operator's choice)."""
        if self.pool:
            conv = self.direct.prepared_launch(self.x, self.y_buf, relu=True, kernel=kernel)
            return self._sequence(conv, self._pool_launch(None))
        conv = self.direct.prepared_launch(self.x, self.out, relu=self.relu and self.residual is None, kernel=kernel)
        return self._sequence(conv, self._residual_launch(self.out))

    def _make(self, key: str):
        """The run function of candidate ``key``: a path, or a launch variant timed on its own: "dense
        (channels-last)", or "balanced_conv (map)" / "(tiled)" / "(gather)", the direct convolution's kernel
        (runtime.conv.BalancedConv2d.kernels_for)."""
        path = key.split(" (")[0]
        variant = key[len(path) + 2:-1] if key != path else None
        if path == DIRECT:
            return self._direct_fn(variant)
        if path == "dense":
            return self._dense_fn(variant or "NCHW")
        return self._im2col_fn()

    # -- the dispatch surface -----------------------------------------------------------------------

    def sparse_paths(self) -> list[tuple[str, object]]:
        """The layer's sparse paths: im2col + the balanced SpMM, and the direct convolution."""
        return (([self.sparse] if self.sparse is not None else [])
                + ([(DIRECT, self.direct)] if self.direct is not None else []))

    def candidates(self) -> dict:
        layouts = [k for k in DENSE_LAYOUTS[1:] if k != "fused" or (self.relu and not self.pool)]
        keys = ["dense"] + [f"dense ({k})" for k in layouts] + ([self.sparse[0]] if self.sparse is not None else [])
        if self.direct is not None:
            keys += [f"{DIRECT} ({k})" for k in self.direct.kernels_for(self.H, self.W)]
        return {k: self._make(k) for k in keys}

    def reference(self) -> torch.Tensor:
        b = None if self.bias32 is None else self.bias32.double()
        y = F.conv2d(self.x.double()[None], self.w4.double(), b, stride=self.stride, padding=self.pad)[0]
        if self.residual is not None:
            y = y + self.residual.double()
        if self.relu:
            y = torch.relu(y)
        return F.max_pool2d(y, 2) if self.pool else y

    def bytes_of(self, path: str) -> int:
        path = path.split(" (")[0]
        if path == "dense":
            return int(self.dense.numel() * self.dense.element_size())
        return int(dict(self.sparse_paths())[path].weight_bytes)

    def bind(self, path: str) -> None:
        self._fn = self._make(path)

    def release_unbound(self) -> None:
        """After dispatch (``choice`` set, a path bound): let go of what the bound launches do not read -- the
        dense matrix when a sparse path runs, the direct convolution's taps and the SpMM operator with its
        im2col buffer when another path runs. ``candidates()``, ``reference()`` and ``bytes_of()`` are not
        available afterwards (a model calls this once its stage is settled)."""
        path = self.choice.path
        # the NCHW weight is read by the NCHW and fused dense launches only (channels-last binds its own copy)
        if path != "dense" or self.choice.variants.get("dense", "dense") not in ("dense", "dense (fused)"):
            self.dense = self.w4 = None
        if path != DIRECT:
            self.direct = None
        if self.sparse is not None and path != self.sparse[0]:
            if self.cols_buf is not None:
                self._views.forget(self.cols_buf)  # the SpMM's view holds the buffer
            self.sparse, self.cols_buf = None, None

    def __call__(self) -> torch.Tensor:
        return self._fn()
