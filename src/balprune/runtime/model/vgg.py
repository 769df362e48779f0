"""VGG runtime: one image per ``run()``, every conv and fc layer on the path measured fastest.

A conv layer (3x3, padding 1, + bias + ReLU, + 2x2 max-pool where VGG has one) has three paths:
dense, torch's conv2d (cuDNN, tensor cores); sparse: im2col into a static [C_in*9, H*W]
buffer (kernels/model_ops.cu), balprune's SpMM of the layer's [C_out, C_in*9] matrix over those
H*W columns with bias + ReLU in its epilogue (or, before a pool, bias + ReLU + pool in one launch);
and "balanced_conv", the direct balanced convolution (runtime.conv: no im2col; the small-map kernel
on the 14x14 and 28x28 layers), then the pool in torch. At batch 1 the early layers' H*W is
large (50176 columns at 224x224), where tensor cores win by far; the late 14x14 layers are where
the sparse path can; the dispatcher measures both on this GPU and says which ran. fc6/fc7/fc8
are Projections (SpMV with bias/ReLU in its epilogue, or cuBLAS addmv). The adaptive average pool is the identity
for the 224x224 input the runtime is built for (features end at 7x7), so it is not launched.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ...errors import UsageError
from ...patterns.registry import MODEL_CONV_PATH as DIRECT
from ..measure import cupy_on_torch_stream
from .base import PackedModel, check_float_request, load_dense, load_packed
from .lstm import _matrix
from .stages import ptr, sparse_operator


def check_image(image, size: int) -> torch.Tensor:
    """An image as a float tensor [3, size, size]; UsageError (one line) for another shape, a
    non-float dtype or non-finite values."""
    return check_float_request(image, (3, size, size), "image", f"{size}x{size}")


class ConvStage:
    """One conv + bias + ReLU (+ pool) as a dispatchable stage (the surface stages.dispatch expects).

    ``__call__(x)`` runs the bound path on x [C_in, H, W] and returns [C_out, H', W']; when
    ``out`` is given (the last conv, feeding fc6's static input) the result is written there.
    """

    def __init__(self, model: PackedModel, ref, packed, pf, x: torch.Tensor, out: torch.Tensor | None = None) -> None:
        self.name, self.dtype, self.kernels = ref.weight, model.dtype, model.kernels
        dev, tdt = model.dev, model.tdt
        cin, cout, k, pad = ref.in_channels, ref.out_channels, ref.kernel, ref.padding
        _, H, W = (int(d) for d in x.shape)
        if int(x.shape[0]) != cin:
            raise UsageError(f"{self.name}: input has {int(x.shape[0])} channels, the layer takes {cin}")
        self.x, self.H, self.W, self.k, self.pad, self.pool = x, H, W, k, pad, ref.pool_after
        self.rows, self.cols, self.batch = cout, cin * k * k, H * W
        self.pattern = getattr(packed, "pattern", "dense")
        m = _matrix(packed)
        self.dense = m.to(dev, tdt).contiguous()
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
                                             block_length=packed.geometry.block_length, padding=pad,
                                             bias=self.bias32, device=model.device, validate=False, name=self.name)
            except UsageError as exc:  # a shape the direct kernel does not take
                self.unavailable[DIRECT] = str(exc)
        self.out = out
        self.choice = None
        self._fn = None
        self._views = model.views
        if self.sparse is not None:
            self.cols_buf = torch.empty(self.cols, H * W, dtype=tdt, device=dev)
            self.y_buf = torch.empty(cout, H * W, dtype=tdt, device=dev)
            self.pool_buf = out if out is not None and self.pool else (
                torch.empty(cout, H // 2, W // 2, dtype=tdt, device=dev) if self.pool else None)

    def out_shape(self) -> tuple[int, int, int]:
        return (self.rows, self.H // 2, self.W // 2) if self.pool else (self.rows, self.H, self.W)

    def _pooled(self, conv_relu):
        """run(x): ``conv_relu(x)`` (bias and ReLU applied), then the layer's pool, into ``out`` when given."""
        pool, out = self.pool, self.out

        def run(x: torch.Tensor) -> torch.Tensor:
            y = conv_relu(x)
            if pool:
                y = F.max_pool2d(y, 2)
            if out is not None:
                out.copy_(y)
                return out
            return y
        return run

    def _dense_fn(self):
        w, b, pad = self.w4, self.bias_t, self.pad
        return self._pooled(lambda x: torch.relu_(F.conv2d(x[None], w, b, padding=pad)[0]))

    def _sparse_fn(self):
        K = self.kernels
        cin, H, W, k, pad, cout = self.cols // (self.k * self.k), self.H, self.W, self.k, self.pad, self.rows
        im2col_k, grid_n = K.fn["im2col"], self.cols * H * W
        grid = (max(1, -(-grid_n // 256)),)
        tail = (np.int32(cin), np.int32(H), np.int32(W), np.int32(k), np.int32(k), np.int32(pad), ptr(self.cols_buf))
        xv, yv = self._views(self.cols_buf), self._views(self.y_buf)
        if self.pool:
            # bias, ReLU and the 2x2 pool in one pass after the product
            spmm = self.sparse[1].prepared_launch(xv, yv, self.batch)
            post = K.bound("bias_relu_pool2", cout * (H // 2) * (W // 2), (
                ptr(self.y_buf), ptr(self.bias32), np.int32(cout), np.int32(H), np.int32(W), ptr(self.pool_buf)))
            result = self.pool_buf
        else:
            # bias and ReLU in the product's epilogue
            bias = None if self.bias32 is None else self._views(self.bias32)
            spmm = self.sparse[1].prepared_launch(xv, yv, self.batch, bias=bias, relu=True)
            post = None
            result = self.y_buf.view(cout, H, W)
        out = self.out if not self.pool else None  # pooled results already land in out

        def run(x: torch.Tensor) -> torch.Tensor:
            im2col_k(grid, (256,), (ptr(x),) + tail)
            spmm()
            if post is not None:
                post()
            if out is not None:
                out.copy_(result)
                return out
            return result
        return run

    def _direct_fn(self):
        op = self.direct
        return self._pooled(lambda x: op(x, relu=True))

    def _make(self, key: str):
        return {"dense": self._dense_fn, DIRECT: self._direct_fn}.get(key, self._sparse_fn)()

    # -- the dispatch surface -----------------------------------------------------------------------

    def sparse_paths(self) -> list[tuple[str, object]]:
        """The layer's sparse paths: im2col + the balanced SpMM, and the direct convolution."""
        return (([self.sparse] if self.sparse is not None else [])
                + ([(DIRECT, self.direct)] if self.direct is not None else []))

    def candidates(self) -> dict:
        paths = ["dense"] + [p for p, _ in self.sparse_paths()]
        fns = {p: self._make(p) for p in paths}
        return {p: (lambda f=f: f(self.x)) for p, f in fns.items()}

    def reference(self) -> torch.Tensor:
        b = None if self.bias32 is None else self.bias32.double()
        y = torch.relu(F.conv2d(self.x.double()[None], self.w4.double(), b, padding=self.pad)[0])
        return F.max_pool2d(y, 2) if self.pool else y

    def bytes_of(self, path: str) -> int:
        path = path.split(" (")[0]
        if path == "dense":
            return int(self.dense.numel() * self.dense.element_size())
        return int(dict(self.sparse_paths())[path].weight_bytes)

    def bind(self, path: str) -> None:
        self._fn = self._make(path)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self._fn(x)


class PackedVgg(PackedModel):
    """VGG (11/13/16/19, no batch norm) on one image_size x image_size image per ``run()``."""

    unit = "image"

    def __init__(self, pf, arch, *, dtype: str = "float16", device: int = 0, paths: str = "auto",
                 measure: bool = True, progress=None) -> None:
        super().__init__(arch, dtype=dtype, device=device, paths=paths, measure=measure, progress=progress)
        dev, tdt = self.dev, self.tdt
        S = arch.image_size
        self.image = self._random_(torch.empty(3, S, S, dtype=tdt, device=dev))
        fc6, fc7, fc8 = arch.fcs
        self.fc_in = torch.empty(fc6.in_features, dtype=tdt, device=dev)
        self.convs: list[ConvStage] = []
        x = self.image
        for i, ref in enumerate(arch.convs):
            out = None
            if i == len(arch.convs) - 1:  # the last conv writes fc6's input buffer directly
                H, W = int(x.shape[1]), int(x.shape[2])
                shape = (ref.out_channels, H // 2, W // 2) if ref.pool_after else (ref.out_channels, H, W)
                if shape[0] * shape[1] * shape[2] != fc6.in_features:
                    raise UsageError(f"{ref.weight}: features end at {list(shape)}, fc6 takes {fc6.in_features} "
                                     f"(the runtime is built for {S}x{S} images)")
                out = self.fc_in.view(*shape)
            stage = ConvStage(self, ref, load_packed(pf, ref.weight), pf, x, out=out)
            self._dispatch(stage)
            self.convs.append(stage)
            with cupy_on_torch_stream():
                x = stage(x)  # the next layer's sample input
        self.fc_out = [torch.empty(f.out_features, dtype=tdt, device=dev) for f in (fc6, fc7, fc8)]
        self.fcs = []
        xin = self.fc_in
        for f, y, relu in zip((fc6, fc7, fc8), self.fc_out, (True, True, False)):
            packed = load_packed(pf, f.weight)
            p = self._projection(f.weight, _matrix(packed), xin, y, packed,
                                 bias=None if f.bias is None else load_dense(pf, f.bias), relu=relu)
            self._dispatch(p)
            self.fcs.append(p)
            xin = y

    def load_inputs(self, inputs: dict) -> None:
        img = check_image(inputs["image"], self.arch.image_size)
        self.image.copy_(img.to(self.dev, self.tdt))

    def run(self) -> None:
        with cupy_on_torch_stream():
            x = self.image
            for st in self.convs:
                x = st(x)
            for p in self.fcs:
                p.launch()

    def forward(self, inputs: dict) -> torch.Tensor:
        """[classes] float32 on the CPU."""
        self.load_inputs(inputs)
        self.run()
        return self.fc_out[-1].float().cpu()
