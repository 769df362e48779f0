"""runtime.model.conv_stage.ConvStage's dense paths on the CPU: both memory layouts and the fused variant,
against the stage's own float64 reference, for every combination a VGG or ResNet layer has (ReLU, residual add
then ReLU, 2x2 pool, stride 2, 1x1 and 3x3 and 7x7). The sparse paths need the GPU (tests/gpu/test_model_gpu.py);
here the stage is built with no sparse operator, as on a layer whose pattern has no kernel. cuDNN's fused op
has no CPU kernel: here conv_stage.fused_conv_add_relu is replaced by the same arithmetic in torch ops, which
checks what the variant hands it and where its result goes; the op itself runs under the dispatcher's gate on a
GPU."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from balprune.models.arch import ConvRef
from balprune.runtime.model import conv_stage
from balprune.runtime.model.conv_stage import ConvStage


@pytest.fixture
def no_sparse(monkeypatch):
    monkeypatch.setattr(conv_stage, "sparse_operator", lambda *a, **k: (None, "no kernel for this pattern"))

    def fused_on_cpu(x, w, bias, stride, pad, residual, out):  # cuDNN's contract, in torch ops
        assert x.dim() == residual.dim() == out.dim() == 4 and x.shape[0] == residual.shape[0] == out.shape[0] == 1
        out.copy_(torch.relu(torch.nn.functional.conv2d(x, w, bias, stride=stride, padding=pad) + residual))
    monkeypatch.setattr(conv_stage, "fused_conv_add_relu", fused_on_cpu)


def _model():
    return SimpleNamespace(dtype="float32", tdt=torch.float32, dev=torch.device("cpu"), device=0, paths="dense",
                           kernels=None, views=None)


CASES = {  # name: (C_in, C_out, kernel, stride, padding, H, relu, pool, residual)
    "3x3-relu": (4, 6, 3, 1, 1, 9, True, False, False),
    "3x3-relu-pool": (4, 6, 3, 1, 1, 10, True, True, False),
    "1x1-residual": (8, 5, 1, 1, 0, 7, False, False, True),
    "3x3-s2-residual": (3, 4, 3, 2, 1, 9, False, False, True),
    "1x1-s2-downsample": (6, 8, 1, 2, 0, 8, False, False, False),
    "7x7-s2-stem": (3, 4, 7, 2, 3, 15, True, False, False),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("layout", ["dense", "dense (channels-last)", "dense (fused)"])
def test_dense_paths_equal_the_stage_reference(no_sparse, case, layout):
    cin, cout, k, stride, pad, h, relu, pool, residual = CASES[case]
    gen = torch.Generator().manual_seed(len(case))
    w = torch.randn(cout, cin, k, k, generator=gen)
    bias = torch.randn(cout, generator=gen)
    pf = SimpleNamespace(dense=lambda name: bias, manifest={"aliases": {}})
    ref = ConvRef("w", "b", cin, cout, k, pad, pool, stride=stride, relu=relu)
    x = torch.randn(cin, h, h, generator=gen)
    oh = (h + 2 * pad - k) // stride + 1
    res = torch.randn(cout, oh, oh, generator=gen) if residual else None
    stage = ConvStage(_model(), ref, w, pf, x, residual=res)
    assert stage.sparse is None and stage.direct is None
    # the fused op saves a launch on a residual stage only (conv + add + ReLU: conv_stage.fused_conv_add_relu)
    assert set(stage.candidates()) == {"dense", "dense (channels-last)"} | ({"dense (fused)"} if residual else set())
    if layout not in stage.candidates():
        with pytest.raises(ValueError, match="fused dense variant takes a residual stage"):
            stage._make(layout)
        return
    got = stage.candidates()[layout]()
    want = stage.reference()
    assert got is stage.out and got.is_contiguous() and got.shape == want.shape
    assert torch.allclose(got.double(), want, rtol=1e-5, atol=1e-5), float((got.double() - want).abs().max())
    if residual:  # the ReLU follows the residual add, whatever the ConvRef says (a ResNet block's last conv)
        assert bool((got >= 0).all()) and stage.relu
        plain = torch.nn.functional.conv2d(x[None].double(), w.double(), bias.double(), stride=stride, padding=pad)[0]
        assert torch.allclose(want, torch.relu(plain + res.double()))
    before = x.clone()
    stage.bind(layout)
    assert stage() is stage.out and torch.equal(x, before)  # the input buffer is never written


def test_a_pool_after_a_residual_or_without_relu_is_refused(no_sparse):
    from balprune.errors import UsageError

    x = torch.zeros(2, 4, 4)
    pf = SimpleNamespace(dense=lambda name: None, manifest={"aliases": {}})
    with pytest.raises(UsageError, match="a pool follows conv"):
        ConvStage(_model(), ConvRef("w", None, 2, 2, 1, 0, True, relu=False), torch.zeros(2, 2, 1, 1), pf, x)
    with pytest.raises(UsageError, match="residual is"):
        ConvStage(_model(), ConvRef("w", None, 2, 2, 1, 0, False), torch.zeros(2, 2, 1, 1), pf, x,
                  residual=torch.zeros(2, 3, 3))


def test_the_channels_last_variant_runs_cudnn_in_channels_last(no_sparse, monkeypatch):
    """The variant is what it says: conv2d sees a channels-last input and weight (NCHW: contiguous ones)."""
    seen = []
    real = torch.nn.functional.conv2d

    def spy(x, w, *a, **k):
        seen.append((x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous(),
                     w.is_contiguous(memory_format=torch.channels_last) and not w.is_contiguous()))
        return real(x, w, *a, **k)
    monkeypatch.setattr(conv_stage.F, "conv2d", spy)
    stage, _ = _stage("3x3-relu")
    for key, want in (("dense", (False, False)), ("dense (channels-last)", (True, True))):
        seen.clear()
        stage.candidates()[key]()
        assert seen == [want], key
    with pytest.raises(ValueError, match="no dense layout"):
        stage._make("dense (NHWC)")


def _stage(case, **kw):
    cin, cout, k, stride, pad, h, relu, pool, residual = CASES[case]
    gen = torch.Generator().manual_seed(3)
    w, bias = torch.randn(cout, cin, k, k, generator=gen), torch.randn(cout, generator=gen)
    pf = SimpleNamespace(dense=lambda name: bias, manifest={"aliases": {}})
    oh = (h + 2 * pad - k) // stride + 1
    x = torch.randn(cin, h, h, generator=gen)
    res = torch.randn(cout, oh, oh, generator=gen) if residual else None
    return ConvStage(_model(), ConvRef("w", "b", cin, cout, k, pad, pool, stride=stride, relu=relu), w, pf, x,
                     residual=res), x


class _Views:
    def __init__(self):
        self.forgotten = []

    def forget(self, t):
        self.forgotten.append(t)


@pytest.mark.parametrize("path,variant,keeps", [
    ("dense", "dense", {"dense"}),
    ("dense", "dense (fused)", {"dense"}),  # reads the NCHW weight too
    ("dense", "dense (channels-last)", set()),  # its launch holds its own channels-last weight
    ("balanced", "balanced", {"sparse", "cols_buf"}),
    ("balanced_conv", "balanced_conv (map)", {"direct"}),
])
def test_release_keeps_exactly_what_the_bound_path_reads(no_sparse, path, variant, keeps):
    stage, _ = _stage("3x3-s2-residual")
    cols = torch.empty(1)
    stage.sparse, stage.direct, stage.cols_buf = ("balanced", object()), object(), cols
    stage._views = _Views()
    stage.choice = SimpleNamespace(path=path, variants={path: variant})
    stage.release_unbound()
    held = {a for a in ("dense", "sparse", "direct", "cols_buf") if getattr(stage, a) is not None}
    assert held == keeps
    assert (stage.w4 is None) == ("dense" not in keeps)
    assert stage._views.forgotten == ([] if "cols_buf" in keeps else [cols])  # the SpMM's view let go too


def test_a_settled_stage_keeps_only_what_its_bound_path_reads(no_sparse):
    """release_unbound after dispatch: the dense path keeps its weight and still runs; nothing else is held."""
    cin, cout, k, stride, pad, h, relu, pool, residual = CASES["1x1-residual"]
    gen = torch.Generator().manual_seed(3)
    w, bias = torch.randn(cout, cin, k, k, generator=gen), torch.randn(cout, generator=gen)
    pf = SimpleNamespace(dense=lambda name: bias, manifest={"aliases": {}})
    x, res = torch.randn(cin, h, h, generator=gen), torch.randn(cout, h, h, generator=gen)
    stage = ConvStage(_model(), ConvRef("w", "b", cin, cout, k, pad, pool, stride=stride, relu=relu), w, pf, x,
                      residual=res)
    want = stage.reference()
    stage.choice = SimpleNamespace(path="dense", variants={"dense": "dense (channels-last)"})
    stage.bind("dense (channels-last)")
    stage.release_unbound()
    assert stage.dense is None and stage.direct is None and stage.sparse is None and stage.cols_buf is None
    assert torch.allclose(stage().double(), want, rtol=1e-5, atol=1e-5)  # the bound launch kept its weight
