"""models: recognising built-in architectures in packed files, the dense reference module, its outputs.

Every packed file is made by the real pipeline (save a state dict, ``balprune prune`` it balanced)
from small instances of the example models, so the names and shapes are exactly what users get.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from balprune.cli import main
from balprune.errors import InvalidInputError
from balprune.examples import BiLstmAcousticModel, LstmLanguageModel, example_state_dict
from balprune.formats.packed_file import read_packed, unpack
from balprune.models import (
    TOLERANCE,
    LinearRef,
    detect,
    reference_module,
    reference_outputs,
    relative_error,
    sample_inputs,
)
from balprune.save import save_state_dict
from balprune.vision import torchvision

_vgg = torchvision().models.vgg
VGG, make_layers = _vgg.VGG, _vgg.make_layers

#: Seven convs (two pairs without a pool between them), five pools: 224 -> 7. detect names it vgg10.
VGG_CFG: list[int | str] = [8, 8, "M", 16, "M", 16, 16, "M", 16, "M", 16, "M"]
PREFIX = "not a built-in model (lstm-lm, ctc-bilstm, vgg, resnet): "


def seeded(build, seed: int = 0) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build().eval()


def small_vgg(cfg=VGG_CFG, batch_norm: bool = False) -> nn.Module:
    """torchvision VGG (its layer names) with a small classifier 16*49 -> 32 -> 32 -> 10."""
    with torch.device("meta"):  # torchvision's 25088 -> 4096 classifier is replaced: never allocate it
        m = VGG(nn.Sequential(), init_weights=False)
    m.features = make_layers(cfg, batch_norm=batch_norm)
    m.classifier = nn.Sequential(nn.Linear(16 * 49, 32), nn.ReLU(True), nn.Dropout(), nn.Linear(32, 32),
                                 nn.ReLU(True), nn.Dropout(), nn.Linear(32, 10))
    return m


def lm_narrow_no_bias() -> nn.Module:
    """An lstm-lm whose embedding width (10) differs from H (24), without any bias."""
    m = LstmLanguageModel(vocab=50, hidden=24, layers=2)
    m.embedding = nn.Embedding(50, 10)
    m.lstm = nn.LSTM(10, 24, num_layers=2, bias=False)
    m.decoder = nn.Linear(24, 50, bias=False)
    return m


BUILDERS = {
    "lstm-lm": lambda: LstmLanguageModel(vocab=50, hidden=24, layers=2),
    "ctc-bilstm": lambda: BiLstmAcousticModel(features=5, hidden=16, layers=2, labels=7),
    "vgg": small_vgg,
    "lm-narrow": lm_narrow_no_bias,
}


def state_of(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}


def pack(folder: Path, name: str, state: dict[str, torch.Tensor], suffix: str = ".safetensors") -> Path:
    """Save ``state`` and prune it with the CLI (balanced, 50%, 4 blocks per row); the packed file's path."""
    src = folder / f"{name}{suffix}"
    if suffix == ".pt":
        torch.save(state, src)
    else:
        save_state_dict(state, src)
    out = folder / f"{name}.balanced.safetensors"
    assert main(["prune", str(src), "--sparsity", "0.5", "--blocks", "4", "-o", str(out), "--json"]) == 0
    return out


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """kind -> (the unpruned module, its packed file), built once for the module."""
    folder = tmp_path_factory.mktemp("models")
    out = {}
    for kind, build in BUILDERS.items():
        model = seeded(build)
        out[kind] = (model, pack(folder, kind, state_of(model)))
    return out


# --------------------------------------------------------------------------- detect


def test_detect_lstm_lm(made):
    pf = read_packed(made["lstm-lm"][1])
    a = detect(pf)
    assert (a.kind, a.name, a.embedding, a.vocab, a.hidden, a.layers) == ("lstm-lm", "lstm-lm", "embedding.weight",
                                                                          50, 24, 2)
    assert [(c.layer, c.reverse, c.input_size, c.hidden) for c in a.cells] == [(0, False, 24, 24), (1, False, 24, 24)]
    assert (a.cells[1].weight_ih, a.cells[1].bias_hh) == ("lstm.weight_ih_l1", "lstm.bias_hh_l1")
    assert a.fcs == (LinearRef("decoder.weight", "decoder.bias", 24, 50),) and a.convs == ()
    assert a.weight_names() == ["lstm.weight_ih_l0", "lstm.weight_hh_l0", "lstm.weight_ih_l1", "lstm.weight_hh_l1",
                                "decoder.weight"]
    assert all(pf.manifest["tensors"][n]["pattern"] == "balanced" for n in a.weight_names())


def test_detect_lstm_lm_any_embedding_width_and_no_biases(made):
    a = detect(read_packed(made["lm-narrow"][1]))
    assert [c.input_size for c in a.cells] == [10, 24] and a.hidden == 24 and a.vocab == 50
    assert all(c.bias_ih is None and c.bias_hh is None for c in a.cells) and a.fcs[0].bias is None


def test_detect_ctc_bilstm(made):
    a = detect(read_packed(made["ctc-bilstm"][1]))
    assert (a.kind, a.name, a.features, a.hidden, a.layers, a.vocab, a.embedding) == (
        "ctc-bilstm", "ctc-bilstm", 5, 16, 2, 0, None)
    # forward before reverse within a layer; layer 1 reads both directions of layer 0
    assert [(c.layer, c.reverse, c.input_size) for c in a.cells] == [(0, False, 5), (0, True, 5), (1, False, 32),
                                                                     (1, True, 32)]
    assert a.cells[1].weight_hh == "lstm.weight_hh_l0_reverse"
    assert a.fcs == (LinearRef("classifier.weight", "classifier.bias", 32, 7),)
    assert a.weight_names()[:2] == ["lstm.weight_ih_l0", "lstm.weight_hh_l0"]
    assert a.weight_names()[-1] == "classifier.weight" and len(a.weight_names()) == 9


def test_detect_vgg(made):
    a = detect(read_packed(made["vgg"][1]))
    assert (a.kind, a.name, a.image_size) == ("vgg", "vgg10", 224)
    assert [(c.in_channels, c.out_channels, c.pool_after) for c in a.convs] == [
        (3, 8, False), (8, 8, True), (8, 16, True), (16, 16, False), (16, 16, True), (16, 16, True), (16, 16, True)]
    assert [c.weight for c in a.convs] == [f"features.{i}.weight" for i in (0, 2, 5, 8, 10, 13, 16)]
    assert all((c.kernel, c.padding) == (3, 1) and c.bias == c.weight[:-6] + "bias" for c in a.convs)
    assert [(f.weight, f.in_features, f.out_features) for f in a.fcs] == [
        ("classifier.0.weight", 784, 32), ("classifier.3.weight", 32, 32), ("classifier.6.weight", 32, 10)]
    assert a.weight_names() == [c.weight for c in a.convs] + [f.weight for f in a.fcs]


def test_detect_full_size_vgg16_names():
    """The real example's names and shapes (header only: no weights are pruned or read)."""
    with torch.device("meta"):
        names = {k: tuple(v.shape) for k, v in torchvision().models.vgg16().state_dict().items()}

    class Manifest:  # what detect reads of a PackedFile: path and manifest
        path = Path("vgg16.balanced.safetensors")
        manifest = {"tensors": {k: {"shape": list(s), "dtype": "F32", "pattern": "dense"} for k, s in names.items()},
                    "aliases": {}}

    a = detect(Manifest())
    assert a.name == "vgg16" and [c.pool_after for c in a.convs].count(True) == 5 and a.fcs[0].in_features == 25088


# --------------------------------------------------------------------------- reference module


@pytest.mark.parametrize("kind", list(BUILDERS))
def test_reference_module_holds_the_masked_weights(made, kind):
    pf = read_packed(made[kind][1])
    module = reference_module(pf, detect(pf))
    state = module.state_dict()
    assert set(state) == set(pf.names())
    for name, t in state.items():
        assert t.dtype == torch.float32 and torch.equal(t, pf.dense(name)), name
    assert not module.training and not any(p.requires_grad for p in module.parameters())
    w = state[detect(pf).weight_names()[0]]
    assert (w == 0).float().mean() >= 0.25  # really pruned (50% target; ragged short rows keep a bit more)
    half = reference_module(pf, detect(pf), dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in half.parameters())


def _plain_outputs(model: nn.Module, kind: str, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """The example module's own forward on the whole input (one call; no runtime conventions)."""
    with torch.no_grad():
        if kind in ("lstm-lm", "lm-narrow"):
            return model(inputs["tokens"])[0]
        if kind == "ctc-bilstm":
            return model(inputs["frames"])
        return model(inputs["image"][None])[0]


@pytest.mark.parametrize("kind", list(BUILDERS))
def test_reference_outputs_equal_the_example_module_on_unpacked_weights(made, kind, tmp_path):
    model, path = made[kind]
    pf = read_packed(path)
    arch = detect(pf)
    inputs = sample_inputs(arch, seed=1, frames=9)
    y = reference_outputs(reference_module(pf, arch), arch, inputs)
    dense = tmp_path / "dense.safetensors"
    unpack(path, dense)
    twin = seeded(BUILDERS[kind], seed=5)  # other init: every value must come from the file
    twin.load_state_dict(load_file(dense), strict=True)
    expected = _plain_outputs(twin.eval(), kind, inputs)
    assert y.dtype == torch.float32 and y.shape == expected.shape
    assert relative_error(y, expected) <= 1e-6
    # and pruning changed the model: the unpruned weights give other outputs
    assert relative_error(_plain_outputs(model, kind, inputs), y) > 1e-3


def test_lstm_lm_steps_one_at_a_time_equal_one_sequence_call(made):
    pf = read_packed(made["lstm-lm"][1])
    arch = detect(pf)
    module = reference_module(pf, arch)
    inputs = sample_inputs(arch, seed=3)
    y = reference_outputs(module, arch, inputs)
    with torch.no_grad():
        whole, _ = module(inputs["tokens"])
    assert y.shape == (4, 50)
    torch.testing.assert_close(y, whole, rtol=1e-6, atol=1e-6)


def test_tied_decoder_is_resolved(tmp_path):
    """A .pt with the decoder tied to the embedding: the file stores one tensor and an alias."""
    model = seeded(lambda: LstmLanguageModel(vocab=40, hidden=16, layers=1))
    model.decoder.weight = model.embedding.weight
    path = pack(tmp_path, "tied", model.state_dict(), suffix=".pt")
    pf = read_packed(path)
    assert pf.manifest["aliases"] == {"decoder.weight": "embedding.weight"}
    arch = detect(pf)
    assert arch.fcs[0].weight == "decoder.weight"
    module = reference_module(pf, arch)
    assert module.decoder.weight.data_ptr() == module.embedding.weight.data_ptr()  # one tensor, as in the source
    assert torch.equal(module.decoder.weight, pf.dense("embedding.weight"))


def test_sample_inputs_are_seeded_and_shaped(made):
    lm, ctc, vgg = (detect(read_packed(made[k][1])) for k in ("lstm-lm", "ctc-bilstm", "vgg"))
    t = sample_inputs(lm)["tokens"]
    assert t.dtype == torch.int64 and t.shape == (4,) and 0 <= t.min() and t.max() < 50
    assert torch.equal(t, sample_inputs(lm)["tokens"])
    f = sample_inputs(ctc, frames=7)["frames"]
    assert f.dtype == torch.float32 and f.shape == (7, 5)
    assert not torch.equal(f, sample_inputs(ctc, frames=7, seed=1)["frames"])
    assert sample_inputs(vgg)["image"].shape == (3, 224, 224)


def test_relative_error():
    ref = torch.tensor([3.0, 4.0])
    assert relative_error(ref, ref) == 0.0
    assert relative_error(torch.tensor([3.0, 4.5]), ref) == pytest.approx(0.1)
    assert relative_error(ref.half(), ref) == 0.0  # compared in float64 whatever the dtypes
    assert relative_error(torch.zeros(2), torch.zeros(2)) == 0.0
    assert relative_error(torch.tensor([1e-3, 0.0]), torch.zeros(2)) > 1e100  # ||ref|| = 0: the tiny floor
    assert relative_error(torch.tensor([float("nan"), 4.0]), ref) == float("inf")
    assert relative_error(torch.tensor([float("inf"), 4.0]), ref) == float("inf")
    with pytest.raises(ValueError, match="shapes differ"):
        relative_error(torch.zeros(3), ref)
    assert TOLERANCE["float32"] < TOLERANCE["float16"] < TOLERANCE["bfloat16"]


# --------------------------------------------------------------------------- one-line errors


def _lm() -> dict[str, torch.Tensor]:
    return state_of(seeded(BUILDERS["lstm-lm"]))


def _vgg(**kw) -> dict[str, torch.Tensor]:
    return state_of(seeded(lambda: small_vgg(**kw)))


def _without(sd: dict, *names: str) -> dict:
    return {k: v for k, v in sd.items() if k not in names}


def _with(sd: dict, **tensors: torch.Tensor) -> dict:
    return {**sd, **{k.replace("__", "."): v for k, v in tensors.items()}}


BAD = {
    "missing": (lambda: _without(_lm(), "decoder.weight"), "no 'decoder.weight' for an lstm-lm"),
    "wrong-shape": (lambda: _with(_lm(), lstm__weight_hh_l1=torch.randn(96, 12)),
                    "lstm.weight_hh_l1 is [96, 12], expected [96, 24]"),
    "extra": (lambda: _with(_lm(), extra__weight=torch.randn(4, 4)),
              "1 tensor(s) an lstm-lm does not use: 'extra.weight'"),
    "layer-gap": (lambda: {k: v for k, v in state_of(seeded(lambda: LstmLanguageModel(50, 24, 3))).items()
                           if not k.endswith("_l1")},
                  "LSTM layers [0, 2]: expected consecutive layers from 0, no tensors of layer 1"),
    "one-bias-missing": (lambda: _without(_lm(), "lstm.bias_hh_l1"), "no 'lstm.bias_hh_l1' for an lstm-lm"),
    "no-reverse": (lambda: _without(state_of(seeded(BUILDERS["ctc-bilstm"])), "lstm.weight_ih_l1_reverse"),
                   "no 'lstm.weight_ih_l1_reverse' for a ctc-bilstm"),
    "batch-norm-vgg": (lambda: _vgg(batch_norm=True),
                       "'features.1.num_batches_tracked' belongs to a batch-norm VGG, which is not supported "
                       "(expected VGG without BN)"),
    "5x5-conv": (lambda: _with(_vgg(), features__0__weight=torch.randn(8, 3, 5, 5)),
                 "features.0.weight is [8, 3, 5, 5], expected [?, 3, 3, 3]"),
    "channels-do-not-chain": (lambda: _with(_vgg(), features__2__weight=torch.randn(8, 4, 3, 3)),
                              "features.2.weight is [8, 4, 3, 3], expected [?, 8, 3, 3]"),
    "four-pools": (lambda: _vgg(cfg=[8, "M", 16, "M", 16, "M", 16, 16, "M"]),
                   "4 max-pools in the features, expected 5 (224x224 -> 7x7)"),
    "fc6-does-not-chain": (lambda: _with(_vgg(), classifier__0__weight=torch.randn(32, 100)),
                           "classifier.0.weight is [32, 100], expected [?, 784]"),
    "tiny-cnn": (lambda: example_state_dict("tiny-cnn"),
                 "expected 'lstm.*', 'features.*' or 'layer1.*' tensors, found '0.bias', '0.weight', '2.bias', '2.weight', ..."),
}


@pytest.mark.parametrize("case", list(BAD))
def test_not_a_built_in_model_is_one_line(case, tmp_path):
    build, detail = BAD[case]
    path = pack(tmp_path, case, build())
    with pytest.raises(InvalidInputError) as e:
        detect(read_packed(path))
    assert e.value.exit_code == 4
    assert e.value.one_line() == f"{path}: {PREFIX}{detail}"
    assert "\n" not in e.value.one_line()


# -- request checks of the GPU runtimes (host-side, so they run here) ------------------------------

def test_runtime_request_checks_name_the_problem_in_one_line():
    from balprune.errors import UsageError
    from balprune.runtime.model.lstm import check_frames, check_tokens
    from balprune.runtime.model.vgg import check_image

    assert check_tokens(torch.tensor([0, 5, 9]), 10) == [0, 5, 9]
    assert check_tokens([3], 10) == [3]
    cases = [
        (lambda: check_tokens(torch.tensor([1, 10]), 10), "token id 10 is outside the vocabulary [0, 10)"),
        (lambda: check_tokens(torch.tensor([-1]), 10), "token id -1 is outside the vocabulary"),
        (lambda: check_tokens(torch.tensor([1.0]), 10), "tokens must be integer ids"),
        (lambda: check_tokens(torch.zeros(2, 2, dtype=torch.long), 10), "non-empty 1-D"),
        (lambda: check_tokens(torch.zeros(0, dtype=torch.long), 10), "non-empty 1-D"),
        (lambda: check_frames(torch.zeros(4, 39), 5, 39), "frames must be [5, 39]"),
        (lambda: check_frames(torch.zeros(5, 39, dtype=torch.long), 5, 39), "floating point"),
        (lambda: check_frames(torch.full((5, 39), float("nan")), 5, 39), "NaN or infinite"),
        (lambda: check_image(torch.zeros(3, 32, 32), 224), "image must be [3, 224, 224]"),
        (lambda: check_image(torch.zeros(3, 224, 224, dtype=torch.uint8), 224), "floating point"),
        (lambda: check_image(torch.full((3, 224, 224), float("inf")), 224), "NaN or infinite"),
    ]
    for call, text in cases:
        with pytest.raises(UsageError) as e:
            call()
        assert text in str(e.value) and "\n" not in str(e.value)
    assert check_frames(torch.zeros(5, 39), 5, 39).shape == (5, 39)
