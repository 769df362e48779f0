"""runtime.model.conv_stage.ConvStage's dense paths on the CPU: both memory layouts and the fused variant,
against the stage's own float64 reference, for every combination a VGG or ResNet layer has (ReLU, residual add
then ReLU, 2x2 pool, stride 2, 1x1 and 3x3 and 7x7). The sparse paths need the GPU (tests/gpu/test_model_gpu.py);
here the stage is built with no sparse operator, as on a layer whose pattern has no kernel. cuDNN's fused op
has no CPU kernel: here conv_stage.fused_conv_relu is replaced by the same arithmetic in torch ops, which
checks what the variant hands it (every operand in one memory layout, as cuDNN takes them) and where its result
goes; the op itself runs under the dispatcher's gate on a GPU. Every case runs with its buffers NCHW, channels-last,
and mixed (an NCHW input, a channels-last output: a ResNet stem on the user's image)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from balprune.models.arch import ConvRef
from balprune.runtime.model import conv_stage
from balprune.runtime.model.base import activation_buffer, activation_layout, layout_of
from balprune.runtime.model.conv_stage import ConvStage


@pytest.fixture
def no_sparse(monkeypatch):
    monkeypatch.setattr(conv_stage, "sparse_operator", lambda *a, **k: (None, "no kernel for this pattern"))

    def fused_on_cpu(x, w, bias, stride, pad, residual, out):  # cuDNN's contract, in torch ops
        ops = [x, w, out] + ([] if residual is None else [residual])
        assert all(t.dim() == 4 for t in ops) and x.shape[0] == out.shape[0] == 1
        cl = out.is_contiguous(memory_format=torch.channels_last) and not out.is_contiguous()
        mf = torch.channels_last if cl else torch.contiguous_format
        assert all(t.is_contiguous(memory_format=mf) for t in ops), "cuDNN's fused op takes one layout"
        y = torch.nn.functional.conv2d(x, w, bias, stride=stride, padding=pad)
        out.copy_(torch.relu(y if residual is None else y + residual))
    monkeypatch.setattr(conv_stage, "fused_conv_relu", fused_on_cpu)


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


def _in(layout, t):
    """``t`` [C, H, W] copied into a buffer stored in ``layout``."""
    return activation_buffer(t.shape, layout, t.dtype, t.device).copy_(t)


BUFFERS = {"NCHW": ("NCHW", "NCHW"), "channels-last": ("channels-last", "channels-last"),
           "mixed": ("NCHW", "channels-last")}  # (input, output and residual)


@pytest.mark.parametrize("buffers", list(BUFFERS))
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("layout", ["dense", "dense (channels-last)", "dense (fused)"])
def test_dense_paths_equal_the_stage_reference(no_sparse, case, layout, buffers):
    cin, cout, k, stride, pad, h, relu, pool, residual = CASES[case]
    xl, ol = BUFFERS[buffers]
    gen = torch.Generator().manual_seed(len(case))
    w = torch.randn(cout, cin, k, k, generator=gen)
    bias = torch.randn(cout, generator=gen)
    pf = SimpleNamespace(dense=lambda name: bias, manifest={"aliases": {}})
    ref = ConvRef("w", "b", cin, cout, k, pad, pool, stride=stride, relu=relu)
    x = _in(xl, torch.randn(cin, h, h, generator=gen))
    oh = (h + 2 * pad - k) // stride + 1
    res = _in(ol, torch.randn(cout, oh, oh, generator=gen)) if residual else None
    stage = ConvStage(_model(), ref, w, pf, x, residual=res, layout=ol)
    assert stage.sparse is None and stage.direct is None
    assert layout_of(stage.x) == xl and layout_of(stage.out) == ol
    # the fused op takes a stage that ends in a ReLU (conv + bias (+ add) + ReLU: conv_stage.fused_conv_relu); the
    # channels-last variant converts an NCHW input (on a channels-last one plain "dense" already runs NHWC)
    assert set(stage.candidates()) == ({"dense"} | ({"dense (channels-last)"} if xl == "NCHW" else set())
                                       | ({"dense (fused)"} if relu or residual else set()))
    if layout not in stage.candidates():
        if layout == "dense (fused)":
            with pytest.raises(ValueError, match="fused dense variant takes a stage that ends in a ReLU"):
                stage._make(layout)
        return
    got = stage.candidates()[layout]()
    want = stage.reference()
    assert got is stage.out and layout_of(got) == ol and got.shape == want.shape
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
    with pytest.raises(ValueError, match="no dense variant"):
        stage._make("dense (NHWC)")
    # channels-last buffers: plain "dense" hands the conv a channels-last batch torch takes as such (its output
    # comes back channels-last: no transposes around it), 1x1 convs included, whose weight cannot say so
    outs = []

    def spy_out(x, w, *a, **k):
        y = real(x, w, *a, **k)
        outs.append(y.is_contiguous(memory_format=torch.channels_last) and not y.is_contiguous())
        return y
    monkeypatch.setattr(conv_stage.F, "conv2d", spy_out)
    for case in ("3x3-relu", "1x1-residual", "1x1-s2-downsample", "3x3-relu-pool"):
        stage, _ = _stage(case, layout="channels-last")
        outs.clear()
        stage.candidates()["dense"]()
        assert outs == [True], case


def _stage(case, layout="NCHW"):
    """A stage of CASES[case] with every buffer in ``layout``, and its input."""
    cin, cout, k, stride, pad, h, relu, pool, residual = CASES[case]
    gen = torch.Generator().manual_seed(3)
    w, bias = torch.randn(cout, cin, k, k, generator=gen), torch.randn(cout, generator=gen)
    pf = SimpleNamespace(dense=lambda name: bias, manifest={"aliases": {}})
    oh = (h + 2 * pad - k) // stride + 1
    x = _in(layout, torch.randn(cin, h, h, generator=gen))
    res = _in(layout, torch.randn(cout, oh, oh, generator=gen)) if residual else None
    return ConvStage(_model(), ConvRef("w", "b", cin, cout, k, pad, pool, stride=stride, relu=relu), w, pf, x,
                     residual=res), x


class _Views:
    def __init__(self):
        self.forgotten = []

    def forget(self, t):
        self.forgotten.append(t)


@pytest.mark.parametrize("layout,path,variant,keeps", [
    ("NCHW", "dense", "dense", {"dense"}),
    ("NCHW", "dense", "dense (fused)", {"dense"}),  # reads the NCHW weight too
    ("NCHW", "dense", "dense (channels-last)", set()),  # its launch holds its own channels-last weight
    ("channels-last", "dense", "dense", set()),  # channels-last operands, the launch's own weight
    ("channels-last", "dense", "dense (fused)", set()),
    ("NCHW", "balanced", "balanced", {"sparse", "cols_buf"}),
    ("NCHW", "balanced_conv", "balanced_conv (map)", {"direct"}),
])
def test_release_keeps_exactly_what_the_bound_path_reads(no_sparse, layout, path, variant, keeps):
    stage, _ = _stage("3x3-s2-residual", layout)
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


class _DirectOnCpu:
    """runtime.conv.BalancedConv2d's prepared-launch contract in torch ops: it asserts that it is handed the
    NCHW contiguous buffers the real kernels read and write, and computes act(conv2d(x) + bias) into y."""

    def __init__(self, values, indices, *, in_channels, kh, kw, block_length, stride, padding, bias, **_):
        self.w, self.stride, self.padding, self.bias = values, stride, padding, bias
        self.seen = []

    def kernels_for(self, h, w):
        return ["gather"]

    def prepared_launch(self, x, y, *, relu=False, kernel=None):
        def run():
            assert x.is_contiguous() and y.is_contiguous(), "the sparse kernels read and write NCHW"
            self.seen.append((x.data_ptr(), y.data_ptr()))
            r = torch.nn.functional.conv2d(x[None], self.w, self.bias, stride=self.stride, padding=self.padding)[0]
            y.copy_(torch.relu(r) if relu else r)
        return run


@pytest.mark.parametrize("buffers", list(BUFFERS))
@pytest.mark.parametrize("case", ["3x3-relu", "1x1-residual", "1x1-s2-downsample"])
def test_a_sparse_path_on_channels_last_buffers_converts_in_and_out(monkeypatch, buffers, case):
    """A sparse path's kernels see NCHW buffers whatever the model's activations are: a channels-last input is
    converted into the stage's NCHW scratch first, the result moved (with the residual add and ReLU) into the
    channels-last output last; NCHW buffers are read and written in place, with no scratch."""
    import balprune.runtime.conv as conv_mod

    w_holder = {}
    monkeypatch.setattr(conv_mod, "BalancedConv2d", lambda values, *a, **k: w_holder.setdefault(
        "op", _DirectOnCpu(w_holder["w"], None, **k)))
    monkeypatch.setattr(conv_stage, "sparse_operator", lambda *a, **k: ("balanced", object()))
    cin, cout, k, stride, pad, h, relu, pool, residual = CASES[case]
    xl, ol = BUFFERS[buffers]
    gen = torch.Generator().manual_seed(5)
    w, bias = torch.randn(cout, cin, k, k, generator=gen), torch.randn(cout, generator=gen)
    w_holder["w"] = w
    packed = SimpleNamespace(values=torch.zeros(1), indices=None, geometry=SimpleNamespace(block_length=4),
                             pattern="balanced")
    monkeypatch.setattr(conv_stage, "_matrix", lambda p: w.reshape(cout, -1))
    pf = SimpleNamespace(dense=lambda name: bias, manifest={"aliases": {}})
    oh = (h + 2 * pad - k) // stride + 1
    x = _in(xl, torch.randn(cin, h, h, generator=gen))
    res = _in(ol, torch.randn(cout, oh, oh, generator=gen)) if residual else None
    model = SimpleNamespace(**{**vars(_model()), "paths": "auto"})
    stage = ConvStage(model, ConvRef("w", "b", cin, cout, k, pad, pool, stride=stride, relu=relu), packed, pf, x,
                      residual=res, layout=ol)
    op = w_holder["op"]
    assert (stage.x_nchw is stage.x) == (xl == "NCHW") and (stage.out_nchw is stage.out) == (ol == "NCHW")
    want = stage.reference()
    before = x.clone()
    if residual and ol == "NCHW":  # the in-place add_relu kernel needs the GPU: its launch is checked on it
        return
    # (candidates() would also bind the im2col path, whose launches need the GPU's kernels)
    got = stage._make("balanced_conv (gather)")()
    assert got is stage.out and layout_of(got) == ol
    assert torch.allclose(got.double(), want, rtol=1e-5, atol=1e-5), float((got.double() - want).abs().max())
    assert op.seen == [(stage.x_nchw.data_ptr(), stage.out_nchw.data_ptr())] and torch.equal(x, before)
    # settled on the dense path, the stage lets the scratch buffers go
    stage._views = _Views()
    scratch = [t for t, buf in ((stage.x_nchw, stage.x), (stage.out_nchw, stage.out)) if t is not buf]
    stage.choice = SimpleNamespace(path="dense", variants={"dense": "dense"})
    stage.bind("dense")
    stage.release_unbound()
    assert stage.x_nchw is stage.x and stage.out_nchw is stage.out
    # the candidates' CuPy views of the scratch buffers are let go too (a view holds its tensor)
    assert all(any(f is t for f in stage._views.forgotten) for t in scratch) and len(scratch) == (xl != "NCHW") + (ol != "NCHW")


def test_activation_layout_and_buffers():
    assert activation_layout("float16", "auto") == activation_layout("bfloat16", "auto") == "channels-last"
    assert activation_layout("float32", "auto") == "NCHW"
    assert activation_layout("float16", "NCHW") == "NCHW"
    from balprune.errors import UsageError

    with pytest.raises(UsageError, match="activations must be 'auto' or one of NCHW, channels-last, got 'NHWC'"):
        activation_layout("float16", "NHWC")
    cl = activation_buffer((3, 4, 5), "channels-last", torch.float32, "cpu")
    assert cl.shape == (3, 4, 5) and cl.stride() == (1, 15, 3) and layout_of(cl) == "channels-last"
    assert layout_of(activation_buffer((3, 4, 5), "NCHW", torch.float32, "cpu")) == "NCHW"
    assert layout_of(torch.zeros(3, 1, 1).permute(0, 2, 1)) == "NCHW"  # a 1x1 map is both: NCHW
    assert layout_of(torch.zeros(5, 4, 3).permute(2, 1, 0)) is None and layout_of(torch.zeros(3, 4)) is None
