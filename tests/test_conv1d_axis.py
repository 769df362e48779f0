"""GPT-2 Conv1D weights ([in, out]) are balanced along the input axis of each output unit.

transformers' Conv1D computes ``x @ W + b`` with W stored [in, out]: an output unit is a COLUMN. Balanced
sparsity must keep the same count per block of each output unit's inputs, so balprune prunes the
transpose [out, in], stores it that way (the manifest's ``transposed`` list says so) and gives the
[in, out] tensor back on unpack. The tiny GPT-2-like folders here are written by the test itself
(config.json + safetensors with the HF GPT-2 tensor names); the transformers cross-check is skipped
where transformers is not installed.
"""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from helpers import one_error_line, transformers_or_skip
from safetensors import safe_open

from balprune.checkpoint import SourceTensor
from balprune.errors import InvalidInputError
from balprune.formats.packed_file import read_packed
from balprune.llm.gpt2 import conv1d_weights
from balprune.save import save_state_dict

H, LAYERS, VOCAB, POSITIONS = 32, 2, 64, 16
CONV1D = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")


def gpt2_state_dict(prefix: str = "transformer.", seed: int = 0, linear_layout: bool = False) -> dict[str, torch.Tensor]:
    """A GPT-2 state dict with HF's names; Conv1D weights [in, out] (``linear_layout``: [out, in], as a
    Linear-based port like nanoGPT stores them)."""
    g = torch.Generator().manual_seed(seed)

    def w(i: int, o: int) -> torch.Tensor:
        t = 0.1 * torch.randn(i, o, generator=g)
        return t.t().contiguous() if linear_layout else t

    sd = {f"{prefix}wte.weight": 0.1 * torch.randn(VOCAB, H, generator=g),
          f"{prefix}wpe.weight": 0.1 * torch.randn(POSITIONS, H, generator=g)}
    for n in range(LAYERS):
        p = f"{prefix}h.{n}."
        sd[p + "ln_1.weight"] = 1 + 0.1 * torch.randn(H, generator=g)
        sd[p + "ln_1.bias"] = 0.1 * torch.randn(H, generator=g)
        sd[p + "attn.c_attn.weight"] = w(H, 3 * H)
        sd[p + "attn.c_attn.bias"] = 0.1 * torch.randn(3 * H, generator=g)
        sd[p + "attn.c_proj.weight"] = w(H, H)
        sd[p + "attn.c_proj.bias"] = 0.1 * torch.randn(H, generator=g)
        sd[p + "ln_2.weight"] = 1 + 0.1 * torch.randn(H, generator=g)
        sd[p + "ln_2.bias"] = 0.1 * torch.randn(H, generator=g)
        sd[p + "mlp.c_fc.weight"] = w(H, 4 * H)
        sd[p + "mlp.c_fc.bias"] = 0.1 * torch.randn(4 * H, generator=g)
        sd[p + "mlp.c_proj.weight"] = w(4 * H, H)
        sd[p + "mlp.c_proj.bias"] = 0.1 * torch.randn(H, generator=g)
    sd[f"{prefix}ln_f.weight"] = 1 + 0.1 * torch.randn(H, generator=g)
    sd[f"{prefix}ln_f.bias"] = 0.1 * torch.randn(H, generator=g)
    return sd


GPT2_CONFIG = {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": VOCAB, "n_positions": POSITIONS,
               "n_embd": H, "n_layer": LAYERS, "n_head": 4, "activation_function": "gelu_new",
               "layer_norm_epsilon": 1e-5, "tie_word_embeddings": True, "dtype": "float32"}


def gpt2_folder(folder: Path, config: dict | None = GPT2_CONFIG, **kw) -> Path:
    folder.mkdir()
    save_state_dict(gpt2_state_dict(**kw), folder / "model.safetensors")
    if config is not None:
        (folder / "config.json").write_text(json.dumps(config))
    return folder


def _conv1d_names(prefix: str = "transformer.") -> list[str]:
    return [f"{prefix}h.{n}.{m}.weight" for n in range(LAYERS) for m in CONV1D]


def _prune(cli, src: Path, out: Path, *extra: str) -> dict:
    r = cli("prune", src, "--blocks", "4", "--sparsity", "0.5", "-o", out, "--json", *extra)
    assert r.code == 0, r.err
    return {t["name"]: t for t in json.loads(r.out)["tensors"]}


def _load(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def test_every_output_unit_keeps_k_per_block_of_its_inputs(cli, tmp_path):
    """The brief's test: c_attn [in, 3*in] pruned balanced; every COLUMN (output unit) of every Conv1D weight
    keeps exactly k per block along the input axis, the largest magnitudes of that block; unpack gives the
    [in, out] tensor back, kept values bit-exact, dropped ones 0."""
    src = gpt2_folder(tmp_path / "gpt2")
    source = gpt2_state_dict()
    report = _prune(cli, src, tmp_path / "p.safetensors")
    pf = read_packed(tmp_path / "p.safetensors")
    assert sorted(pf.transposed) == sorted(_conv1d_names())
    assert cli("unpack", tmp_path / "p.safetensors", "-o", tmp_path / "dense.safetensors").code == 0
    dense = _load(tmp_path / "dense.safetensors")
    for name in _conv1d_names():
        w, d = source[name], dense[name]
        assert tuple(d.shape) == tuple(w.shape), "unpack restores [in, out]"
        assert "GPT-2 Conv1D [in, out]" in report[name]["reason"]
        assert pf.manifest["tensors"][name]["shape"] == [w.shape[1], w.shape[0]]  # stored as [out, in]
        k_in = w.shape[0]
        length = math.ceil(k_in / 4)
        keep = math.floor(0.5 * length + 0.5)
        assert pf.manifest["tensors"][name]["block_length"] == length and pf.manifest["tensors"][name]["keep"] == keep
        assert torch.equal(d[d != 0], w[d != 0]), "kept values are the source's, bit for bit"
        for col in range(w.shape[1]):  # every output unit
            for b0 in range(0, k_in, length):
                block_w, block_d = w[b0:b0 + length, col], d[b0:b0 + length, col]
                assert int((block_d != 0).sum()) == keep
                top = torch.topk(block_w.abs(), keep).indices
                assert set(top.tolist()) == set(torch.nonzero(block_d).flatten().tolist())
        # and not balanced along the stored rows (the wrong axis): the inputs' fan-outs keep varying counts
        lr = math.ceil(w.shape[1] / 4)
        counts = torch.stack([(d[:, c0:c0 + lr] != 0).sum(1) for c0 in range(0, w.shape[1], lr)], 1)
        assert int(counts.max()) != int(counts.min())
    for name, t in source.items():  # biases and norms come back byte for byte; wte/wpe are ordinary rows
        if t.dim() == 1:
            assert torch.equal(dense[name], t)
        elif name not in pf.transposed:
            assert pf.manifest["tensors"][name]["shape"] == list(t.shape)


def test_packed_matrix_is_the_layers_operator(cli, tmp_path):
    """What the runtime multiplies by (PackedFile.dense / load: the [out, in] matrix, y = W x) is what the
    Conv1D layer computes (x @ W_src + b) with the masked source weight: the runtime and bench run a
    transposed tensor as the layer's own [out, in] operator."""
    src = gpt2_folder(tmp_path / "gpt2")
    _prune(cli, src, tmp_path / "p.safetensors")
    pf = read_packed(tmp_path / "p.safetensors")
    for name in _conv1d_names():
        stored = pf.dense(name)  # [out, in]
        source = pf.source_dense(name)  # [in, out], as the checkpoint holds it
        assert tuple(stored.shape) == tuple(source.shape)[::-1]
        xin = torch.randn(4, source.shape[0], generator=torch.Generator().manual_seed(4))
        assert torch.allclose(xin @ source, (stored @ xin.t()).t(), atol=1e-6)
        assert pf.load(name).manifest()["shape"] == list(stored.shape)


def test_recognised_by_names_without_config_but_not_a_linear_port(cli, tmp_path):
    """Without config.json: c_attn [h, 3h] is Conv1D's signature (transposed); a nanoGPT-style Linear port
    stores [3h, h] and is pruned along its rows as any Linear."""
    conv = gpt2_folder(tmp_path / "conv", config=None, prefix="")
    report = _prune(cli, conv / "model.safetensors", tmp_path / "conv.safetensors")
    assert sorted(read_packed(tmp_path / "conv.safetensors").transposed) == sorted(_conv1d_names(""))
    assert all("Conv1D" in report[n]["reason"] for n in _conv1d_names(""))
    lin = gpt2_folder(tmp_path / "lin", config=None, prefix="", linear_layout=True)
    report = _prune(cli, lin / "model.safetensors", tmp_path / "lin.safetensors")
    pf = read_packed(tmp_path / "lin.safetensors")
    assert pf.transposed == frozenset() and "transposed" not in json.loads(pf.parsed.metadata["manifest"])
    assert not any("Conv1D" in t["reason"] for t in report.values())


def test_other_model_types_are_not_transposed():
    t = [SourceTensor("h.0.attn.c_attn.weight", "F32", (8, 24), 768), SourceTensor("h.0.mlp.c_fc.weight", "F32", (8, 32), 1024),
         SourceTensor("h.0.xattn.c_attn.weight", "F32", (8, 24), 768), SourceTensor("h.0.attn.c_attn.bias", "F32", (24,), 96)]
    assert conv1d_weights(t, "bert") == frozenset()
    assert conv1d_weights(t, "gpt2") == {"h.0.attn.c_attn.weight", "h.0.mlp.c_fc.weight"}
    assert conv1d_weights(t, None) == {"h.0.attn.c_attn.weight", "h.0.mlp.c_fc.weight"}
    t[0] = replace(t[0], shape=(24, 8))  # a Linear port's c_attn: the block has no Conv1D signature
    assert conv1d_weights(t, None) == frozenset()
    with pytest.raises(InvalidInputError, match="bias"):  # config says gpt2, the bias says [out, in]
        conv1d_weights(t, "gpt2")


def test_bias_contradicting_gpt2_config_refused(cli, tmp_path):
    src = gpt2_folder(tmp_path / "gpt2", linear_layout=True)  # config says gpt2, weights are [out, in]
    r = cli("prune", src, "--blocks", "4", "--sparsity", "0.5", "-o", tmp_path / "p.safetensors")
    assert r.code == 4 and "bias" in one_error_line(r.err)
    assert not (tmp_path / "p.safetensors").exists()


def test_excluded_conv1d_passes_through_as_stored(cli, tmp_path):
    src = gpt2_folder(tmp_path / "gpt2")
    report = _prune(cli, src, tmp_path / "p.safetensors", "--exclude", "*mlp.c_proj*")
    pf = read_packed(tmp_path / "p.safetensors")
    excluded = "transformer.h.0.mlp.c_proj.weight"
    assert report[excluded]["action"] == "passed" and excluded not in pf.transposed
    assert pf.manifest["tensors"][excluded]["shape"] == [4 * H, H]
    assert cli("unpack", tmp_path / "p.safetensors", "-o", tmp_path / "d.safetensors").code == 0
    assert torch.equal(_load(tmp_path / "d.safetensors")[excluded], gpt2_state_dict()[excluded])


@pytest.mark.parametrize("transposed, words", [
    ([], "non-empty list"),
    ("transformer.h.0.attn.c_attn.weight", "non-empty list"),
    (["transformer.h.0.attn.c_attn.weight", "transformer.h.0.attn.c_attn.weight"], "twice"),
    (["nope"], "not a stored tensor"),
    (["transformer.h.0.ln_1.bias"], "not 2-D"),
])
def test_hostile_transposed_list_refused(cli, tmp_path, transposed, words):
    from test_hf_export import rewrite_metadata

    src = gpt2_folder(tmp_path / "gpt2")
    _prune(cli, src, tmp_path / "p.safetensors")

    def edit(meta):
        manifest = json.loads(meta["manifest"])
        manifest["transposed"] = transposed
        meta["manifest"] = json.dumps(manifest, sort_keys=True, separators=(",", ":"))

    rewrite_metadata(tmp_path / "p.safetensors", edit)
    for command in (("verify",), ("unpack", "-o", tmp_path / "d.safetensors")):
        r = cli(command[0], tmp_path / "p.safetensors", *command[1:])
        assert r.code == 4 and words in one_error_line(r.err)
    assert not (tmp_path / "d.safetensors").exists()




def test_hf_folder_loads_in_transformers_with_conv1d_restored(cli, tmp_path):
    """unpack --hf-folder of the pruned GPT-2 folder: transformers' GPT2LMHeadModel holds every Conv1D weight
    [in, out] equal to the masked source, and its logits equal the source model with those weights masked."""
    tf = transformers_or_skip()
    src = gpt2_folder(tmp_path / "gpt2")
    _prune(cli, src, tmp_path / "p.safetensors")
    r = cli("unpack", tmp_path / "p.safetensors", "--hf-folder", tmp_path / "out")
    assert r.code == 0, r.err
    pf = read_packed(tmp_path / "p.safetensors")
    assert sorted(pf.transposed) == sorted(_conv1d_names())
    pruned = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "out", attn_implementation="eager").eval()
    reference = tf.AutoModelForCausalLM.from_pretrained(src, attn_implementation="eager").eval()
    params = dict(reference.named_parameters())
    with torch.no_grad():
        for name in pf.names():  # every pruned weight (wte and wpe are pruned too, along their rows)
            if pf.manifest["tensors"][name]["pattern"] != "dense":
                mask = pf.source_dense(name) != 0
                assert tuple(mask.shape) == tuple(params[name].shape)  # Conv1D: [in, out], as it holds it
                params[name].mul_(mask)
        got = dict(pruned.named_parameters())
        for name in _conv1d_names():
            assert tuple(got[name].shape) == tuple(gpt2_state_dict()[name].shape)
            assert torch.equal(got[name], params[name])
        ids = torch.randint(0, VOCAB, (2, POSITIONS), generator=torch.Generator().manual_seed(5))
        a, b = pruned(ids).logits, reference(ids).logits
    assert torch.allclose(a, b, atol=1e-6, rtol=0)


def test_sensitivity_measures_a_conv1d_weight_along_the_axis_prune_balances(tmp_path):
    """`sensitivity` (checkpoint mode) plans a GPT-2 folder as prune does: each Conv1D weight's error is
    that of the [out, in] transpose balanced per output unit -- not of the [in, out] rows."""
    from balprune.config import prune_options_from_config
    from balprune.finetune.sensitivity import relative_output_error, sensitivity_from_checkpoint
    from balprune.prune.masks import one_shot_mask

    src = gpt2_folder(tmp_path / "gpt2")
    options = prune_options_from_config({}, overrides={"sparsity": 0.5, "blocks": 2})
    result = sensitivity_from_checkpoint(src, options, [0.5], samples=8, seed=0)
    name = "transformer.h.0.attn.c_attn.weight"
    i, layer = next((i, la) for i, la in enumerate(result.layers) if la.name == name)
    w = gpt2_state_dict()[name]  # [in, out]
    g = torch.Generator().manual_seed(i)  # seed 0: the i-th tensor's draw
    x = torch.randn(w.shape[0], 8, generator=g, dtype=torch.float64)
    pattern = options.pattern  # balanced, 2 blocks, 50%
    expected = relative_output_error(w.t(), one_shot_mask(w.t(), pattern), x)
    along_rows = relative_output_error(w, one_shot_mask(w, pattern), torch.randn(w.shape[1], 8, dtype=torch.float64))
    assert layer.degradation["0.5"] == pytest.approx(expected, rel=1e-12)
    assert layer.degradation["0.5"] != pytest.approx(along_rows, rel=1e-6)


def _columns_balanced(w: torch.Tensor, blocks: int, keep: int) -> bool:
    """Every output unit (a column of the [in, out] weight) keeps exactly ``keep`` per block of its inputs."""
    out_in = w.t()
    return bool((out_in.reshape(out_in.shape[0], blocks, -1) != 0).sum(-1).eq(keep).all())


def test_iterative_prune_and_its_export_balance_conv1d_weights_per_output_unit(tmp_path):
    """Algorithm 1 on a GPT-2 state dict (Python API) masks the [out, in] transpose, and export_packed
    plans the same axis: the file holds exactly the weights the state dict holds."""
    from balprune.config import prune_options_from_config
    from balprune.prune.iterative import export_packed, iterative_prune

    sd = gpt2_state_dict()
    options = prune_options_from_config({"schedule": {"kind": "cubic", "steps": 3}},
                                        overrides={"sparsity": 0.5, "blocks": 2}, include=("transformer.h.*",))
    masks = iterative_prune(sd, options)
    for name in _conv1d_names():
        assert masks[name].shape == sd[name].shape
        assert _columns_balanced(sd[name], 2, sd[name].shape[0] // 4), name  # half of each block of in/2
    export_packed(sd, tmp_path / "p.safetensors", options)
    pf = read_packed(tmp_path / "p.safetensors")
    assert sorted(pf.transposed) == sorted(_conv1d_names())
    for name in _conv1d_names():
        assert torch.equal(pf.source_dense(name), sd[name]), name


class Conv1D(torch.nn.Module):
    """transformers.pytorch_utils.Conv1D's shape contract: weight [nx, nf], y = x @ W + b."""

    def __init__(self, nf: int, nx: int) -> None:
        super().__init__()
        self.nf = nf
        self.weight = torch.nn.Parameter(0.1 * torch.randn(nx, nf))
        self.bias = torch.nn.Parameter(torch.zeros(nf))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight + self.bias


@pytest.mark.parametrize("real", [False, True])
def test_the_fine_tuning_pruner_masks_conv1d_modules_per_output_unit(tmp_path, real):
    """Pruner on a model with Conv1D modules (transformers' own where installed): every schedule step keeps
    k per block of each output unit's inputs, the mask survives a state_dict round trip, and the export
    holds exactly the model's weights."""
    from balprune.config import prune_options_from_config
    from balprune.finetune.pruner import Pruner

    if real:
        conv1d = pytest.importorskip("transformers.pytorch_utils").Conv1D
    else:
        conv1d = Conv1D
    torch.manual_seed(0)
    model = torch.nn.Sequential(conv1d(48, 32), torch.nn.ReLU(), conv1d(16, 48))
    options = prune_options_from_config({"schedule": {"kind": "cubic", "steps": 2}},
                                        overrides={"sparsity": 0.75, "blocks": 4})
    pruner = Pruner(model, options)
    pruner.advance()
    pruner.advance()
    assert _columns_balanced(model[0].weight.detach(), 4, 2) and _columns_balanced(model[2].weight.detach(), 4, 3)
    again = Pruner(model, options)
    again.load_state_dict(pruner.state_dict())
    assert all(torch.equal(again.masks[n], m) for n, m in pruner.masks.items())
    pruner.export(tmp_path / "p.safetensors")
    pf = read_packed(tmp_path / "p.safetensors")
    assert sorted(pf.transposed) == ["0.weight", "2.weight"]
    assert torch.equal(pf.source_dense("0.weight"), model[0].weight.detach())


@pytest.mark.parametrize("config,transposed", [
    ({"model_type": "vision-encoder-decoder", "encoder": {"model_type": "vit"}, "decoder": GPT2_CONFIG}, True),
    ({"model_type": "encoder-decoder", "encoder": {"model_type": "bert"}, "decoder": {"model_type": "bert"}}, False),
])
def test_a_gpt2_decoder_inside_an_encoder_decoder_is_recognised(cli, tmp_path, config, transposed):
    """config.json names the composite model; its GPT-2 decoder's Conv1D weights are still balanced per
    output unit (names and shapes decide, as without a config.json), and a non-GPT-2 pair is left alone."""
    src = gpt2_folder(tmp_path / "ed", config, prefix="decoder.transformer.")
    _prune(cli, src, tmp_path / "p.safetensors")
    got = sorted(read_packed(tmp_path / "p.safetensors").transposed)
    assert got == (sorted(_conv1d_names("decoder.transformer.")) if transposed else [])
