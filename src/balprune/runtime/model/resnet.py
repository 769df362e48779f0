"""ResNet runtime: one image per ``run()``, every conv and the fc layer on the path measured fastest.

The file is a torchvision ResNet with its batch norms folded into the convs (what ``prune`` writes,
models.bnfold; models.arch recognises it). The forward is torchvision's: stem conv 7x7/2 + ReLU,
3x3/2 max-pool (padding 1), the blocks (BasicBlock or Bottleneck: each conv + ReLU but the last, whose
output gets the residual -- the block input, or the downsample 1x1 conv of it -- added before its
ReLU), global average pool, fc. Every conv is a conv_stage.ConvStage (cuDNN, im2col + balprune's
SpMM, or the direct balanced convolution; the residual add and its ReLU are part of the block's last
conv); the fc is a Projection. The max-pool and the average pool run in torch.

The runtime is built for ``arch.image_size`` square images (224 unless the architecture says otherwise). Its
activations between stages are in one layout (base.activation_layout: channels-last for float16 / bfloat16),
the image NCHW as the user gives it (the stem's channels-last and fused dense variants convert it, plain "dense"
runs the stem in NCHW, the sparse paths read it as it is).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ...errors import UsageError
from ..measure import cupy_on_torch_stream
from .base import PackedImageModel, activation_buffer, batch_view, load_dense, load_packed
from .conv_stage import ConvStage
from .lstm import _matrix


class _Block:
    """One residual block's stages: ``convs`` in order (the last adds the residual), ``downsample`` or None."""

    def __init__(self, convs: list[ConvStage], downsample: ConvStage | None) -> None:
        self.convs, self.downsample = convs, downsample

    def __call__(self) -> None:
        if self.downsample is not None:
            self.downsample()
        for st in self.convs:
            st()


class PackedResNet(PackedImageModel):
    """torchvision ResNet (18/34/50/101/152 layouts) with folded batch norms on one image per ``run()``."""

    def __init__(self, pf, arch, *, dtype: str = "float16", device: int = 0, paths: str = "auto",
                 measure: bool = True, progress=None, activations: str = "auto") -> None:
        super().__init__(arch, dtype=dtype, device=device, paths=paths, measure=measure, progress=progress,
                         activations=activations)
        dev, tdt = self.dev, self.tdt
        with cupy_on_torch_stream():
            self.stem = self._conv(pf, arch.convs[0], self.image)
            c, h, w = self.stem.out.shape
            self.pooled = activation_buffer((c, (h - 1) // 2 + 1, (w - 1) // 2 + 1), self.activations, tdt, dev)
            self._stem_and_pool()
            x = self.pooled  # each stage's input buffer is the stage before it's output (static)
            self.blocks: list[_Block] = []
            for ref in arch.blocks:
                ds = None if ref.downsample is None else self._conv(pf, ref.downsample, x)
                identity = x if ds is None else ds()
                convs, y = [], x
                for i, c in enumerate(ref.convs):
                    st = self._conv(pf, c, y, residual=identity if i == len(ref.convs) - 1 else None)
                    convs.append(st)
                    y = st()
                self.blocks.append(_Block(convs, ds))
                x = y
        fc = arch.fcs[0]
        if int(x.shape[0]) != fc.in_features:
            raise UsageError(f"the blocks end with {int(x.shape[0])} channels, fc takes {fc.in_features}")
        self.features = x
        self.fc_in = torch.empty(fc.in_features, dtype=tdt, device=dev)
        torch.mean(x, dim=(1, 2), out=self.fc_in)
        self.fc_out = [torch.empty(fc.out_features, dtype=tdt, device=dev)]
        packed = load_packed(pf, fc.weight)
        self.fc = self._projection(fc.weight, _matrix(packed), self.fc_in, self.fc_out[0], packed,
                                   bias=None if fc.bias is None else load_dense(pf, fc.bias))
        self._dispatch(self.fc, settle=True)

    def _conv(self, pf, ref, x: torch.Tensor, residual: torch.Tensor | None = None) -> ConvStage:
        """The dispatched stage of conv ``ref`` on input buffer ``x`` (holding sample data) and ``residual``."""
        stage = ConvStage(self, ref, load_packed(pf, ref.weight), pf, x, residual=residual, layout=self.activations)
        self._dispatch(stage, settle=True)
        return stage

    def _stem_and_pool(self) -> None:
        """The stem conv (+ ReLU), then torchvision's 3x3/2 max-pool (padding 1) into ``pooled``."""
        batch_view(self.pooled).copy_(F.max_pool2d(batch_view(self.stem()), 3, stride=2, padding=1))

    def run(self) -> None:
        with cupy_on_torch_stream():
            self._stem_and_pool()
            for b in self.blocks:
                b()
            torch.mean(self.features, dim=(1, 2), out=self.fc_in)
            self.fc.launch()
