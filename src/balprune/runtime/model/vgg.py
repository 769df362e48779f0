"""VGG runtime: one image per ``run()``, every conv and fc layer on the path measured fastest.

Each conv layer (3x3, padding 1, + bias + ReLU, + 2x2 max-pool where VGG has one) is a
conv_stage.ConvStage: cuDNN, im2col + balprune's SpMM, or the direct balanced convolution, measured. fc6/fc7/fc8
are Projections (SpMV with bias/ReLU in its epilogue, or cuBLAS addmv). The adaptive average pool is the identity
for the 224x224 input the runtime is built for (features end at 7x7), so it is not launched.
"""

from __future__ import annotations

import torch

from ...errors import UsageError
from ..measure import cupy_on_torch_stream
from .base import PackedImageModel, check_image, load_dense, load_packed
from .conv_stage import ConvStage
from .lstm import _matrix

__all__ = ["PackedVgg", "check_image"]


class PackedVgg(PackedImageModel):
    """VGG (11/13/16/19, no batch norm) on one image_size x image_size image per ``run()``."""

    def __init__(self, pf, arch, *, dtype: str = "float16", device: int = 0, paths: str = "auto",
                 measure: bool = True, progress=None, activations: str = "auto") -> None:
        super().__init__(arch, dtype=dtype, device=device, paths=paths, measure=measure, progress=progress,
                         activations=activations)
        dev, tdt = self.dev, self.tdt
        S = arch.image_size
        fc6, fc7, fc8 = arch.fcs
        self.fc_in = torch.empty(fc6.in_features, dtype=tdt, device=dev)
        self.convs: list[ConvStage] = []
        x = self.image
        for i, ref in enumerate(arch.convs):
            out = None
            if i == len(arch.convs) - 1:  # the last conv writes fc6's input buffer directly, NCHW: fc6 reads
                # the features in torch's flatten order, whatever layout the activations before it have
                H, W = int(x.shape[1]), int(x.shape[2])
                shape = (ref.out_channels, H // 2, W // 2) if ref.pool_after else (ref.out_channels, H, W)
                if shape[0] * shape[1] * shape[2] != fc6.in_features:
                    raise UsageError(f"{ref.weight}: features end at {list(shape)}, fc6 takes {fc6.in_features} "
                                     f"(the runtime is built for {S}x{S} images)")
                out = self.fc_in.view(*shape)
            stage = ConvStage(self, ref, load_packed(pf, ref.weight), pf, x, out=out, layout=self.activations)
            self._dispatch(stage, settle=True)
            self.convs.append(stage)
            with cupy_on_torch_stream():
                x = stage()  # the next layer's input buffer, holding its sample data
        self.fc_out = [torch.empty(f.out_features, dtype=tdt, device=dev) for f in (fc6, fc7, fc8)]
        self.fcs = []
        xin = self.fc_in
        for f, y, relu in zip((fc6, fc7, fc8), self.fc_out, (True, True, False)):
            packed = load_packed(pf, f.weight)
            p = self._projection(f.weight, _matrix(packed), xin, y, packed,
                                 bias=None if f.bias is None else load_dense(pf, f.bias), relu=relu)
            self._dispatch(p, settle=True)
            self.fcs.append(p)
            xin = y

    def run(self) -> None:
        with cupy_on_torch_stream():
            for st in self.convs:
                st()
            for p in self.fcs:
                p.launch()
