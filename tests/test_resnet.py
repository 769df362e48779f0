"""torchvision ResNets: batch norm folded by prune (models.bnfold), recognised in packed files
(models.detect), and their dense reference (models.reference_module) -- all on the CPU.

Files are made by the real pipeline (save a torchvision ResNet's state dict, ``balprune prune`` it), so
the names and shapes are exactly what users get.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from balprune.cli import main
from balprune.config import prune_options_from_config
from balprune.errors import InvalidInputError
from balprune.examples import example_state_dict
from balprune.formats.packed_file import read_packed, unpack
from balprune.models import detect, reference_module, reference_outputs, relative_error, sample_inputs
from balprune.models.bnfold import BN_EPS, fold, is_torchvision_resnet
from balprune.prune.masks import one_shot_mask
from balprune.save import save_state_dict
from balprune.vision import torchvision

_resnet = torchvision().models.resnet
PREFIX = "not a built-in model (lstm-lm, ctc-bilstm, vgg, resnet): "


def small_resnet(block: str = "basic", layers=(1, 2, 1, 1), classes: int = 10, seed: int = 0) -> nn.Module:
    """A torchvision ResNet (its class, names and strides) with drawn batch-norm parameters, in eval mode."""
    cls = _resnet.BasicBlock if block == "basic" else _resnet.Bottleneck
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        m = _resnet.ResNet(cls, list(layers), num_classes=classes)
        with torch.no_grad():
            for mod in m.modules():
                if isinstance(mod, nn.BatchNorm2d):
                    mod.weight.uniform_(-1.5, 1.5)  # negative scales too: a row's ranking is by magnitude
                    mod.bias.normal_(0, 0.1)
                    mod.running_mean.normal_(0, 0.1)
                    mod.running_var.uniform_(0.5, 1.5)
    return m.eval()


def state_of(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}


def prune(folder: Path, name: str, state: dict[str, torch.Tensor], *args: str) -> Path:
    src, out = folder / f"{name}.safetensors", folder / f"{name}.packed.safetensors"
    save_state_dict(state, src)
    assert main(["prune", str(src), *args, "-o", str(out), "--json"]) == 0
    return out


def test_fold_is_the_eval_mode_conv_then_batch_norm():
    torch.manual_seed(0)
    conv, bn = nn.Conv2d(5, 7, 3, padding=1, bias=True).double(), nn.BatchNorm2d(7).double().eval()
    with torch.no_grad():
        bn.weight.uniform_(-2, 2), bn.bias.normal_(), bn.running_mean.normal_(), bn.running_var.uniform_(0.1, 2)
    x = torch.randn(2, 5, 9, 9, dtype=torch.float64)
    w, b = fold(conv.weight, conv.bias, bn.weight, bn.bias, bn.running_mean, bn.running_var, eps=bn.eps)
    torch.testing.assert_close(nn.functional.conv2d(x, w, b, padding=1), bn(conv(x)), rtol=1e-12, atol=1e-12)
    assert BN_EPS == bn.eps  # torchvision's BatchNorm2d default, which a state dict does not store


@pytest.mark.parametrize("block,layers,name", [("basic", (1, 2, 1, 1), "resnet12"),
                                               ("bottleneck", (1, 1, 2, 1), "resnet17")])
def test_prune_folds_and_the_reference_equals_torchvision_in_eval_mode(tmp_path, block, layers, name):
    """At sparsity 0 the packed file is the folded model: its reference equals the unfolded torchvision
    model with batch norm in eval mode; no batch-norm tensor is left and the note says why."""
    model = small_resnet(block, layers)
    out = prune(tmp_path, name, state_of(model), "--sparsity", "0")
    pf = read_packed(out)
    names = list(pf.manifest["tensors"])
    assert not any(".bn" in f".{n}" or "downsample.1." in n for n in names)
    assert "layer2.0.downsample.0.bias" in names and "conv1.bias" in names
    arch = detect(pf)
    assert (arch.kind, arch.name) == ("resnet", name)
    stride2 = [c.weight for b in arch.blocks for c in b.convs if c.stride == 2]
    assert stride2 == ([f"layer{i}.0.conv1.weight" for i in (2, 3, 4)] if block == "basic"
                       else [f"layer{i}.0.conv2.weight" for i in (2, 3, 4)])
    ref = reference_module(pf, arch)
    inputs = sample_inputs(arch)
    with torch.no_grad():
        expected = model(inputs["image"][None])[0]
    assert relative_error(reference_outputs(ref, arch, inputs), expected) < 1e-5


def test_the_fold_keeps_each_rows_balanced_mask(tmp_path):
    """A folded row is the unfolded row times one factor: the packed file keeps exactly the weights the
    balanced pattern picks from the unfolded conv."""
    model = small_resnet()
    state = state_of(model)
    pf = read_packed(prune(tmp_path, "r", state, "--sparsity", "0.75", "--blocks", "4"))
    pattern = prune_options_from_config({}, overrides={"sparsity": 0.75, "blocks": 4}).pattern
    for name in ("conv1.weight", "layer2.0.conv1.weight", "layer3.0.downsample.0.weight", "layer4.0.conv2.weight"):
        w = state[name].reshape(state[name].shape[0], -1)
        assert pf.manifest["tensors"][name]["pattern"] == "balanced", name
        kept = pf.dense(name).reshape(w.shape) != 0
        assert torch.equal(kept, one_shot_mask(w, pattern)), name


def test_the_example_resnets_are_recognised_after_prune(tmp_path):
    out = prune(tmp_path, "r18", example_state_dict("resnet18"), "--sparsity", "0.9")
    arch = detect(read_packed(out))
    assert arch.name == "resnet18" and len(arch.blocks) == 8 and arch.fcs[0].out_features == 1000
    state = example_state_dict("resnet50")
    assert is_torchvision_resnet(list(state))
    arch = detect(read_packed(prune(tmp_path, "r50", state, "--sparsity", "0")))
    assert arch.name == "resnet50" and len(arch.blocks) == 16 and arch.blocks[0].out_channels == 256


def test_other_models_with_batch_norm_are_not_folded(tmp_path):
    """Only a whole torchvision ResNet layout is folded: a model that merely has conv1/bn1 is left as is."""
    state = state_of(small_resnet())
    state["head.weight"] = torch.randn(3, 3)
    assert not is_torchvision_resnet(list(state))
    pf = read_packed(prune(tmp_path, "x", state, "--sparsity", "0.5"))
    assert "bn1.running_var" in pf.manifest["tensors"] and "conv1.bias" not in pf.manifest["tensors"]


@pytest.fixture(scope="module")
def folded(tmp_path_factory) -> dict[str, torch.Tensor]:
    """The folded dense state dict of a small ResNet (unpack of its packed file)."""
    folder = tmp_path_factory.mktemp("folded")
    out = prune(folder, "r", state_of(small_resnet()), "--sparsity", "0.5")
    unpack(out, folder / "dense.safetensors")

    return load_file(folder / "dense.safetensors")


def _without(state, *prefixes):
    return {k: v for k, v in state.items() if not k.startswith(prefixes)}


def _with(state, **kw):
    return {**state, **{k.replace("__", "."): v for k, v in kw.items()}}


BAD = {
    "no-downsample": (lambda s: _without(s, "layer2.0.downsample."),
                      "layer2.0.downsample.0.weight is missing: expected one exactly where a block changes its size "
                      "(64 -> 128 channels, stride 2)"),
    "block-gap": (lambda s: _without(s, "layer2.0."), "layer2 blocks [1]: expected consecutive blocks from layer2.0"),
    "layer-gap": (lambda s: _without(s, "layer3."), "layers [1, 2, 4]: expected consecutive layers from layer1"),
    "5x5-stem": (lambda s: _with(s, conv1__weight=torch.randn(64, 3, 5, 5)),
                 "conv1.weight is [64, 3, 5, 5], expected [?, 3, 7, 7]"),
    "fc-does-not-chain": (lambda s: _with(s, fc__weight=torch.randn(10, 100)),
                          "fc.weight is [10, 100], expected [?, 512]"),
    "extra": (lambda s: _with(s, extra__weight=torch.randn(4, 4)), "1 tensor(s) a resnet does not use: 'extra.weight'"),
    "unfolded": (lambda s: _with(s, bn1__running_var=torch.ones(64)),
                 "batch-norm tensors 'bn1.running_var': a resnet runs with its batch norms folded into the convs "
                 "(prune a torchvision ResNet checkpoint with balprune, which folds them)"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_near_misses_are_one_line_naming_what_was_expected(case, folded, tmp_path, monkeypatch):
    mutate, detail = BAD[case]
    if case == "unfolded":  # prune itself refuses to leave a batch norm unfolded: a file made without the fold
        monkeypatch.setattr("balprune.prune.engine.fold_batch_norms", lambda ckpt: (ckpt, None))
    out = prune(tmp_path, case, mutate(dict(folded)), "--sparsity", "0.5")
    with pytest.raises(InvalidInputError) as e:
        detect(read_packed(out))
    assert e.value.exit_code == 4 and e.value.one_line() == f"{out}: {PREFIX}{detail}"


def test_the_model_runtime_preflight_takes_a_resnet_without_a_gpu(tmp_path):
    """``bench --model``'s preflight verifies a packed ResNet and recognises it on any machine (the
    GPU runtime itself is tests/gpu/test_model_gpu.py's)."""
    from balprune.runtime.model import RUNTIMES, PackedResNet, preflight

    out = prune(tmp_path, "r", state_of(small_resnet()), "--sparsity", "0.5")
    _, arch = preflight(out, ("float16",))
    assert arch.kind == "resnet" and arch.name == "resnet12" and RUNTIMES["resnet"] is PackedResNet


# -- hostile batch norms: one line, exit 4, no output ---------------------------------------------------


def _refused(capsys, tmp_path: Path, src: Path, *words: str) -> None:
    """prune exits 4 with one line holding ``words``, and writes nothing."""
    out = tmp_path / "out.safetensors"
    capsys.readouterr()
    code = main(["prune", str(src), "--sparsity", "0.5", "--blocks", "4", "-o", str(out)])
    err = capsys.readouterr().err.strip()
    assert code == 4 and not out.exists()
    assert len(err.splitlines()) == 1 and err.startswith("balprune: error:"), err
    assert all(w in err for w in words), err


def _saved(tmp_path: Path, state: dict, suffix: str = ".safetensors") -> Path:
    p = tmp_path / f"src{suffix}"
    torch.save(state, p) if suffix == ".pt" else save_state_dict(state, p)
    return p


def test_a_nan_batch_norm_is_refused_naming_it(capsys, tmp_path):
    s = state_of(small_resnet())
    s["bn1.running_var"][0] = float("nan")
    _refused(capsys, tmp_path, _saved(tmp_path, s), "batch norm 'bn1'", "'conv1.weight'", "running_var holds NaN or Inf")


def test_a_fold_that_overflows_fp16_is_refused(capsys, tmp_path):
    s = {k: v.half() if v.is_floating_point() else v for k, v in state_of(small_resnet()).items()}
    s["bn1.running_var"].zero_()
    s["bn1.running_mean"][0] = 5000.0
    _refused(capsys, tmp_path, _saved(tmp_path, s), "batch norm 'bn1'", "not finite in float16")


def test_a_batch_norm_that_cannot_be_paired_is_refused(capsys, tmp_path):
    s = state_of(small_resnet())
    s["layer1.0.bn2.running_var"] = torch.ones(65)
    _refused(capsys, tmp_path, _saved(tmp_path, s), "batch norm 'layer1.0.bn2' cannot be folded")


def test_tied_convs_are_refused(capsys, tmp_path):
    s = state_of(small_resnet())
    s["layer1.0.conv2.weight"] = s["layer1.0.conv1.weight"]  # one storage: a torch file keeps them tied
    _refused(capsys, tmp_path, _saved(tmp_path, s, ".pt"), "tied (shared) tensors in a batch-norm fold")


def test_a_layer_index_of_thousands_of_digits_is_a_near_miss_not_a_crash(tmp_path):
    s = state_of(small_resnet())
    out = prune(tmp_path, "ok", s, "--sparsity", "0")
    unpack(out, tmp_path / "d.safetensors")
    folded = load_file(tmp_path / "d.safetensors")
    folded["layer" + "1" * 5000 + ".0.conv1.weight"] = torch.zeros(2, 2)
    bad = prune(tmp_path, "bad", folded, "--sparsity", "0")
    with pytest.raises(InvalidInputError) as e:
        detect(read_packed(bad))
    assert e.value.exit_code == 4 and "does not use" in e.value.one_line() and len(e.value.one_line()) < 400


def test_a_batch_norm_without_running_statistics_is_refused_not_left_unfolded(capsys, tmp_path):
    """BatchNorm2d(track_running_stats=False) stores only weight and bias: nothing to fold. Left in place it
    made a file that is neither folded nor a ResNet the runtime takes; now it is named and refused."""
    s = state_of(small_resnet())
    for k in ("running_mean", "running_var", "num_batches_tracked"):
        del s["layer1.0.bn2." + k]
    _refused(capsys, tmp_path, _saved(tmp_path, s), "batch norm 'layer1.0.bn2' cannot be folded")


def test_a_variance_of_minus_eps_is_refused_in_the_stored_dtype(capsys, tmp_path):
    """running_var = -eps: var + eps is 0 in float32 (torch's batch norm divides by zero) but a tiny positive
    number in float64; the fold must not turn it into a finite, huge weight."""
    s = state_of(small_resnet())
    s["layer1.0.bn2.running_var"].fill_(-BN_EPS)
    assert bool((s["layer1.0.bn2.running_var"] + BN_EPS == 0).all())
    _refused(capsys, tmp_path, _saved(tmp_path, s), "batch norm 'layer1.0.bn2'", "running_var + eps is not positive")


def test_a_meta_device_tensor_is_refused_naming_it(capsys, tmp_path):
    s = state_of(small_resnet())
    s["layer1.0.bn2.running_var"] = torch.empty(64, device="meta")
    _refused(capsys, tmp_path, _saved(tmp_path, s, ".pt"), "'layer1.0.bn2.running_var'", "meta-device tensor")


def test_the_runtime_preflight_refuses_a_nan_bias_and_a_zero_size_layer_without_a_gpu(capsys, tmp_path):
    """prune passes 1-D tensors through as they are; bench --model's preflight must still refuse non-finite
    values (else every stage's gate fails on the GPU and it reads as a runtime failure, exit 7) and layers of
    zero size (torch's reference cannot run them), both with exit 4 before any GPU is looked for."""
    s = state_of(small_resnet())
    s["fc.bias"][0] = float("nan")
    nan = prune(tmp_path, "nan", s, "--sparsity", "0.5")
    z = {"conv1.weight": torch.zeros(0, 3, 7, 7), "layer1.0.conv1.weight": torch.zeros(0, 0, 3, 3),
         "layer1.0.conv2.weight": torch.zeros(0, 0, 3, 3), "fc.weight": torch.zeros(10, 0)}
    zero = prune(tmp_path, "zero", z, "--sparsity", "0.5", "--block-size", "4")
    for packed, words in ((nan, ("'fc.bias'", "NaN/Inf")), (zero, ("zero-size dimension",))):
        capsys.readouterr()
        code = main(["bench", str(packed), "--model", "--dtype", "float32"])
        err = capsys.readouterr().err.strip()
        assert code == 4 and len(err.splitlines()) == 1 and all(w in err for w in words), err


def test_a_stem_batch_norm_without_running_statistics_is_refused_too(capsys, tmp_path):
    """The stem's batch norm lacking running_var made the checkpoint unrecognised, so nothing was folded and
    prune said nothing (while the same gap in a block is exit 4): now it is named and refused alike."""
    s = state_of(small_resnet())
    del s["bn1.running_var"]
    _refused(capsys, tmp_path, _saved(tmp_path, s), "batch norm 'bn1' cannot be folded")


def test_a_conv_with_a_bias_is_folded_with_it(tmp_path):
    """A ResNet variant built with conv biases: b' = beta + s * (b - mean) takes the bias in (it left the
    whole checkpoint unfolded before). The folded model equals the unfolded one in eval mode."""
    model = small_resnet()
    model.conv1 = nn.Conv2d(3, model.conv1.out_channels, 7, 2, 3, bias=True)
    torch.nn.init.uniform_(model.conv1.bias, -0.5, 0.5)
    s = state_of(model)
    assert "conv1.bias" in s and is_torchvision_resnet(list(s))
    out = prune(tmp_path, "bias", s, "--sparsity", "0")
    unpack(out, tmp_path / "d.safetensors")
    folded = load_file(tmp_path / "d.safetensors")
    assert not any(k.startswith("bn1.") for k in folded) and "conv1.bias" in folded
    x = torch.randn(1, 3, 32, 32)
    model.eval()
    stem = torch.nn.functional.conv2d(x, folded["conv1.weight"], folded["conv1.bias"], stride=2, padding=3)
    torch.testing.assert_close(stem, model.bn1(model.conv1(x)), rtol=1e-4, atol=1e-4)


def test_a_conv_whose_batch_norm_is_missing_is_refused(capsys, tmp_path):
    """torchvision's ResNet has a batch norm after every conv: one deleted whole is a near miss (it folded
    the others and left that conv unnormalised, which the runtime then ran as a different model)."""
    s = {k: v for k, v in state_of(small_resnet()).items() if not k.startswith("layer2.1.bn2.")}
    _refused(capsys, tmp_path, _saved(tmp_path, s), "conv 'layer2.1.conv2.weight' has no batch norm after it")


def test_a_nan_in_a_conv_weight_is_named_where_it_is(capsys, tmp_path):
    s = state_of(small_resnet())
    s["layer1.0.conv1.weight"][3, 2, 1, 0] = float("nan")
    _refused(capsys, tmp_path, _saved(tmp_path, s), "tensor 'layer1.0.conv1.weight'", "first at index [3, 2, 1, 0]")


def test_many_batch_norm_names_are_checked_in_linear_time():
    """_unpaired_batch_norms kept its result in a list and tested membership in it: 300k batch-norm names
    (a 24 MB file of zero-size tensors) took minutes. 200k now take well under a second."""
    import time

    from balprune.checkpoint import SourceTensor
    from balprune.models.bnfold import _unpaired_batch_norms

    tensors = [SourceTensor(f"layer1.{j}.bn1.weight", "F32", (0,), 0) for j in range(200_000)]
    t0 = time.perf_counter()
    unpaired = _unpaired_batch_norms(tensors, [])
    assert len(unpaired) == 200_000 and unpaired[0] == "layer1.0.bn1"
    assert time.perf_counter() - t0 < 5.0


def test_the_runtime_preflight_refuses_a_float8_tensor_by_name(capsys, tmp_path):
    """prune passes float8 tensors through; torch cannot check them for NaN on the CPU, which made bench
    --model's preflight an internal error (exit 70). Exit 4 naming the tensor and its dtype."""
    s = state_of(small_resnet())
    s["fc.bias"] = s["fc.bias"].to(torch.float8_e4m3fn)
    packed = prune(tmp_path, "f8", s, "--sparsity", "0.5")
    capsys.readouterr()
    code = main(["bench", str(packed), "--model", "--dtype", "float32"])
    err = capsys.readouterr().err.strip()
    assert code == 4 and len(err.splitlines()) == 1 and "'fc.bias'" in err and "float8_e4m3fn" in err, err
