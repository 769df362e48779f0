"""End-to-end packed-model runtimes on the GPU: outputs against the float32 dense masked torch
model (models.reference) within TOLERANCE, for every dtype and every forced path, small and
paper-sized; graph replay equals eager; the model benchmark's report."""

from __future__ import annotations

import pytest
import torch
from helpers import gpu_skip_reason

from balprune import examples
from balprune.cli import main
from balprune.formats.packed_file import read_packed
from balprune.models import detect, reference_module, reference_outputs, relative_error, sample_inputs
from balprune.models.reference import TOLERANCE
from balprune.runtime.measure import pick_path
from balprune.runtime.model.stages import split_candidate
from balprune.save import save_state_dict

_why = gpu_skip_reason()
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(_why is not None, reason=_why or "")]

DTYPES = ["float32", "float16", "bfloat16"]


def _vgg_small():
    from balprune.vision import torchvision

    vgg = torchvision().models.vgg
    cfg = [8, "M", 16, "M", 16, 16, "M", 24, "M", 24, "M"]
    m = vgg.VGG(vgg.make_layers(cfg), num_classes=10)
    m.classifier[0] = torch.nn.Linear(24 * 49, 64)
    m.classifier[3] = torch.nn.Linear(64, 64)
    m.classifier[6] = torch.nn.Linear(64, 10)
    return m


def _resnet_small():
    """A torchvision ResNet of Bottleneck blocks (downsample 1x1 convs at stride 1 and 2, 3x3 convs at
    stride 2) with drawn batch-norm statistics, so the fold prune does is not the identity."""
    from balprune.vision import torchvision

    resnet = torchvision().models.resnet
    m = resnet.ResNet(resnet.Bottleneck, [1, 1, 1, 1], num_classes=10)
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, torch.nn.BatchNorm2d):
                mod.weight.uniform_(0.5, 1.5)
                mod.bias.normal_(0, 0.1)
                mod.running_mean.normal_(0, 0.1)
                mod.running_var.uniform_(0.5, 1.5)
    return m.eval()


SMALL = {
    "lstm-lm": lambda: examples.LstmLanguageModel(vocab=300, hidden=96, layers=2),
    "ctc-bilstm": lambda: examples.BiLstmAcousticModel(features=39, hidden=64, layers=2, labels=20),
    "vgg": _vgg_small,
    "resnet": _resnet_small,
}
OUTPUT = {"lstm-lm": "logits", "ctc-bilstm": "out"}  # the buffer a run() ends in (vision: fc_out[-1])


def _packed(tmp_path, name: str, build, sparsity: float, blocks: int = 8):
    torch.manual_seed(0)
    sd = {k: v.detach().contiguous() for k, v in build().state_dict().items()}
    src = tmp_path / f"{name}.safetensors"
    save_state_dict(sd, src)
    out = tmp_path / f"{name}.balanced.safetensors"
    assert main(["prune", str(src), "-s", str(sparsity), "--blocks", str(blocks), "-o", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def small_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("models")
    return {k: _packed(d, k, b, 0.75) for k, b in SMALL.items()}


def _reference(path, frames=12):
    pf = read_packed(path)
    arch = detect(pf)
    inputs = sample_inputs(arch, frames=frames)
    ref = reference_outputs(reference_module(pf, arch, device="cuda"), arch, inputs)
    return arch, inputs, ref


@pytest.mark.parametrize("kind", list(SMALL))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("paths", ["sparse", "dense", "auto"])
def test_runtime_matches_the_dense_masked_model(small_files, kind, dtype, paths):
    from balprune.runtime.model import load_model

    arch, inputs, ref = _reference(small_files[kind])
    rt = load_model(small_files[kind], dtype=dtype, paths=paths, frames=12, measure=paths == "auto")
    err = relative_error(rt.forward(inputs), ref)
    assert err <= TOLERANCE[dtype], (kind, dtype, paths, err)
    chosen = {c.path for c in rt.choices}
    if paths == "dense":
        assert chosen == {"dense"}
    if paths == "sparse":
        assert "balanced" in chosen
    for c in rt.choices:
        assert c.reason
        if paths == "auto":
            assert c.path == pick_path(c.times_us, c.bytes)[0]
    if kind in ("vgg", "resnet"):  # settled stages hold only what their bound path reads
        stages = [*getattr(rt, "convs", []), *([rt.stem] if hasattr(rt, "stem") else []),
                  *(st for b in getattr(rt, "blocks", []) for st in [*b.convs, *([b.downsample] if b.downsample else [])])]
        assert len(stages) == sum(1 for c in rt.choices if not c.layer.startswith(("classifier.", "fc.")))
        for st in stages:
            # the NCHW weight stays for the dense launches with NCHW operands (channels-last binds its own copy)
            variant = split_candidate(st.choice.variants.get("dense", "dense"))[1]
            nchw = st.choice.path == "dense" and st._operand_layout(variant) == "NCHW"
            assert (st.dense is not None) == nchw, (st.name, st.choice.path, st.choice.variants)
            assert (st.direct is not None) == (st.choice.path == "balanced_conv"), st.name
            assert (st.sparse is not None) == (st.choice.path == "balanced"), st.name
            assert st.cols_buf is None or st.choice.path == "balanced", st.name
    if kind in ("vgg", "resnet") and paths == "auto":
        # the direct balanced conv passes its gate and is timed on every conv layer (7x7/2 stem included)
        convs = [c for c in rt.choices if not c.layer.startswith(("classifier.", "fc."))]
        assert convs and all("balanced_conv" in c.times_us for c in convs), \
            [(c.layer, c.times_us, c.unavailable) for c in convs]


@pytest.mark.parametrize("kind", ["vgg", "resnet"])
@pytest.mark.parametrize("activations", ["NCHW", "channels-last"])
@pytest.mark.parametrize("paths", ["sparse", "auto"])
def test_vision_runtime_in_each_activation_layout(small_files, kind, activations, paths):
    """Both activation layouts give the reference's outputs on every path set (a sparse stage on channels-last
    buffers converts in and out), graph replay equals eager, and every buffer between stages is in the layout
    asked for (VGG's fc6 input stays NCHW)."""
    from balprune.runtime.model import load_model
    from balprune.runtime.model.base import layout_of

    arch, inputs, ref = _reference(small_files[kind])
    rt = load_model(small_files[kind], dtype="float16", paths=paths, measure=paths == "auto", activations=activations)
    assert rt.activations == activations
    err = relative_error(rt.forward(inputs), ref)
    assert err <= TOLERANCE["float16"], (kind, activations, paths, err)
    stages = [*getattr(rt, "convs", [])[:-1], *([rt.stem] if hasattr(rt, "stem") else []),
              *(st for b in getattr(rt, "blocks", []) for st in [*b.convs, *([b.downsample] if b.downsample else [])])]
    assert stages and all(layout_of(st.out) == activations or st.out.shape[1:] == (1, 1) for st in stages)
    eager = rt.forward(inputs)
    g = rt.capture()
    rt.load_inputs(inputs)
    g.replay()
    torch.cuda.synchronize()
    assert torch.equal(rt.fc_out[-1].float().cpu(), eager)


@pytest.mark.parametrize("kind", list(SMALL))
def test_graph_replay_equals_eager(small_files, kind):
    from balprune.runtime.model import load_model

    arch, inputs, _ = _reference(small_files[kind])
    rt = load_model(small_files[kind], dtype="float16", paths="sparse", frames=12, measure=False)
    g = rt.capture()
    outs = {}
    for how in ("eager", "graph"):
        rt.load_inputs(inputs)
        for _ in range(3):  # three token steps for the LM (state advances per run)
            rt.run() if how == "eager" else g.replay()
        torch.cuda.synchronize()
        buf = getattr(rt, OUTPUT[kind]) if kind in OUTPUT else rt.fc_out[-1]
        outs[how] = buf.clone()
    assert torch.equal(outs["eager"], outs["graph"])


def test_lstm_fuses_ih_and_hh_into_one_launch(small_files):
    from balprune.runtime.model import load_model

    rt = load_model(small_files["lstm-lm"], dtype="float16", paths="sparse", measure=False)
    names = [[p.name for p in ps] for ps in rt.layer_projs]
    assert names == [["lstm.weight_ih_l0+lstm.weight_hh_l0"], ["lstm.weight_ih_l1+lstm.weight_hh_l1"]]


@pytest.mark.parametrize("name,sparsity", [("lstm-lm", 0.8), ("ctc-bilstm", 0.875)])
def test_paper_sized_lstm_models(tmp_path, name, sparsity):
    from balprune.runtime.model import load_model

    path = _packed(tmp_path, name, examples.EXAMPLES[name][1], sparsity, blocks=32)
    arch, inputs, ref = _reference(path, frames=20)
    for dtype in ("float32", "float16"):
        rt = load_model(path, dtype=dtype, frames=20)
        err = relative_error(rt.forward(inputs), ref)
        assert err <= TOLERANCE[dtype], (name, dtype, err)


def test_paper_sized_vgg16(tmp_path):
    from balprune.runtime.model import load_model

    path = _packed(tmp_path, "vgg16", examples.EXAMPLES["vgg16"][1], 0.92, blocks=32)
    arch, inputs, ref = _reference(path)
    assert arch.name == "vgg16"
    rt = load_model(path, dtype="float16")
    err = relative_error(rt.forward(inputs), ref)
    assert err <= TOLERANCE["float16"], err
    by = {c.layer: c for c in rt.choices}
    assert by["classifier.0.weight"].path == "balanced"  # fc6 at 92%: the sparse kernel must win


def test_paper_sized_resnet50(tmp_path):
    from balprune.runtime.model import load_model

    path = _packed(tmp_path, "resnet50", examples.EXAMPLES["resnet50"][1], 0.9, blocks=32)
    arch, inputs, ref = _reference(path)
    assert arch.name == "resnet50"
    rt = load_model(path, dtype="float16")
    err = relative_error(rt.forward(inputs), ref)
    assert err <= TOLERANCE["float16"], err
    assert len(rt.choices) == 54  # 53 convs (stem, 48 in blocks, 4 downsamples) and fc


def test_bench_model_command_writes_a_comparable_report(small_files, tmp_path, capsys):
    from balprune.bench.report import load_report

    out = tmp_path / "m.json"
    code = main(["bench", str(small_files["lstm-lm"]), "--model", "--iters", "20", "--json", str(out)])
    assert code == 0, capsys.readouterr().err
    rep = load_report(out)
    keys = {(m.layer, m.dtype, m.mode, m.graph, m.kernel) for m in rep.measurements if m.layer == "model"}
    for dtype in ("F32", "F16"):
        for mode in ("hot", "cold"):
            for graph in (False, True):
                assert ("model", dtype, mode, graph, "balprune") in keys
                assert ("model", dtype, mode, graph, "torch") in keys
    assert rep.meta["model"]["architecture"] == "lstm-lm"
    assert main(["compare", str(out), str(out)]) == 0
