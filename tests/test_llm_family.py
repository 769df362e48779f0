"""Llama-family recognition: config.json hostile-proof, the tensor layout checked, the example writer."""

from __future__ import annotations

import json
import math
import os
import threading
from dataclasses import replace

import pytest
import torch

from balprune.checkpoint import open_checkpoint
from balprune.container import parse_file
from balprune.errors import InvalidInputError, OutputError
from balprune.llm.examples import PRESETS, config_dict, folder_bytes, write_example, write_hf_folder
from balprune.llm.family import (
    Llama3RopeScaling,
    LlmConfig,
    check_layout,
    check_recorded,
    expected_tensors,
    open_llm,
    parse_config,
    read_config,
)
from balprune.save import save_state_dict

TINY = LlmConfig(model_type="llama", vocab_size=40, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, head_dim=4, rms_norm_eps=1e-5, rope_theta=10000.0,
                 rope_scaling=None, tie_word_embeddings=False, attention_bias=False, max_position_embeddings=64,
                 torch_dtype="float32")


def _config(**changes) -> dict:
    d = config_dict(TINY)
    for k, v in changes.items():
        if v is ...:
            d.pop(k, None)
        else:
            d[k] = v
    return d


def _refused(tmp_path, text: str | bytes, *words: str) -> str:
    """config.json holding ``text`` is refused by read_config: exit 4, one line naming the file and ``words``."""
    p = tmp_path / "config.json"
    p.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(InvalidInputError) as e:
        read_config(tmp_path)
    line = e.value.one_line()
    assert e.value.exit_code == 4 and "\n" not in line and len(line) < 400, line
    assert str(p) in line, line
    for w in words:
        assert w in line, line
    return line


# --------------------------------------------------------------------------- config.json


@pytest.mark.parametrize("cfg", [TINY, *(c for _, c in PRESETS.values()),
                                 replace(TINY, model_type="mistral", sliding_window=8),
                                 replace(TINY, model_type="qwen2", attention_bias=True, tie_word_embeddings=True),
                                 replace(TINY, model_type="qwen3", head_dim=8, attention_bias=True),
                                 replace(TINY, rope_scaling=Llama3RopeScaling(8.0, 1.0, 4.0, 32))],
                         ids=lambda c: c.model_type)
def test_config_round_trip(tmp_path, cfg):
    (tmp_path / "config.json").write_text(json.dumps(config_dict(cfg)))
    assert read_config(tmp_path) == cfg


def test_defaults_follow_transformers():
    d = _config(num_key_value_heads=..., head_dim=..., rope_theta=..., rms_norm_eps=..., tie_word_embeddings=...,
                attention_bias=..., torch_dtype=..., rope_scaling=..., max_position_embeddings=...)
    cfg = parse_config(d)
    assert (cfg.num_key_value_heads, cfg.head_dim, cfg.rope_theta, cfg.rms_norm_eps) == (4, 4, 10000.0, 1e-6)
    assert not cfg.tie_word_embeddings and not cfg.attention_bias and cfg.torch_dtype is None
    assert cfg.rope_scaling is None and cfg.max_position_embeddings == 2048


def test_transformers5_rope_parameters_and_dtype():
    d = _config(rope_theta=..., rope_scaling=..., torch_dtype=..., dtype="bfloat16",
                rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0,
                                 "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                 "original_max_position_embeddings": 8192},
                layer_types=["full_attention"] * 2)
    cfg = parse_config(d)
    assert cfg.rope_theta == 500000.0 and cfg.rope_scaling == Llama3RopeScaling(32.0, 1.0, 4.0, 8192)
    assert cfg.torch_dtype == "bfloat16"
    assert parse_config(_config(rope_scaling={"type": "default"}, rope_theta=1e6)).rope_theta == 1e6


def test_qwen2_always_biased_and_mistral_never():
    """As in transformers, whatever attention_bias says (its qwen2 / mistral classes never read it)."""
    assert parse_config(_config(model_type="qwen2", attention_bias=...)).attention_bias
    assert parse_config(_config(model_type="qwen2", attention_bias=False)).attention_bias
    assert not parse_config(_config(model_type="mistral", attention_bias=True)).attention_bias
    with pytest.raises(InvalidInputError, match="'attention_bias'.*mistral"):
        replace(TINY, model_type="mistral", attention_bias=True)


HOSTILE = {
    # name: (config changes, words the message must hold)
    "hidden-string": ({"hidden_size": "64"}, ["'hidden_size'", "integer", "'64'"]),
    "hidden-float": ({"hidden_size": 16.0}, ["'hidden_size'", "integer"]),
    "layers-bool": ({"num_hidden_layers": True}, ["'num_hidden_layers'", "integer"]),
    "tie-int": ({"tie_word_embeddings": 1}, ["'tie_word_embeddings'", "true or false"]),
    "eps-string": ({"rms_norm_eps": "1e-5"}, ["'rms_norm_eps'", "number"]),
    "eps-negative": ({"rms_norm_eps": -1e-5}, ["'rms_norm_eps'", "finite"]),
    "eps-overflow-inf": ('"rms_norm_eps": 1e400', ["'rms_norm_eps'", "finite"]),
    "theta-zero": ({"rope_theta": 0}, ["'rope_theta'"]),
    "hidden-huge": ({"hidden_size": 10**9}, ["'hidden_size'", "65536"]),
    "hidden-bignum": ({"hidden_size": 10**400}, ["'hidden_size'"]),
    "layers-huge": ({"num_hidden_layers": 10**6}, ["'num_hidden_layers'", "1024"]),
    "vocab-huge": ({"vocab_size": 2**40}, ["'vocab_size'", str(2**22)]),
    "vocab-zero": ({"vocab_size": 0}, ["'vocab_size'"]),
    "intermediate-huge": ({"intermediate_size": 2**30}, ["'intermediate_size'"]),
    "heads-not-dividing": ({"num_attention_heads": 3}, ["'num_attention_heads'", "divide"]),
    "heads-zero": ({"num_attention_heads": 0}, ["'num_attention_heads'"]),
    "kv-not-dividing": ({"num_key_value_heads": 3}, ["'num_key_value_heads'", "divide"]),
    "head-dim-odd": ({"head_dim": 5}, ["'head_dim'", "even"]),
    "head-dim-huge": ({"head_dim": 10**6}, ["'head_dim'"]),
    "positions-huge": ({"max_position_embeddings": 10**12}, ["'max_position_embeddings'"]),
    "missing-hidden": ({"hidden_size": ...}, ["'hidden_size'", "missing"]),
    "missing-vocab": ({"vocab_size": ...}, ["'vocab_size'", "missing"]),
    "null-layers": ({"num_hidden_layers": None}, ["'num_hidden_layers'", "missing"]),
    "missing-model-type": ({"model_type": ...}, ["'model_type'", "missing", "llama"]),
    "qwen2-missing-kv": ({"model_type": "qwen2", "num_key_value_heads": ...}, ["'num_key_value_heads'", "missing"]),
    "qwen3-missing-head-dim": ({"model_type": "qwen3", "head_dim": ...}, ["'head_dim'", "missing"]),
    "unknown-model-type": ({"model_type": "gpt2"}, ["'model_type'", "'gpt2'", "llama", "mistral", "qwen2", "qwen3"]),
    "model-type-list": ({"model_type": ["llama"]}, ["'model_type'", "expected"]),
    "rope-yarn": ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, ["rope_scaling.rope_type", "'yarn'",
                                                                           "llama3"]),
    "rope-linear-old-key": ({"rope_scaling": {"type": "linear", "factor": 2.0}}, ["rope_scaling.type",
                                                                                   "'linear'"]),
    "rope-not-object": ({"rope_scaling": "llama3"}, ["'rope_scaling'", "object"]),
    "rope-unknown-key": ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                           "high_freq_factor": 4.0, "beta_fast": 32}}, ["rope_scaling.beta_fast"]),
    "rope-missing-factor": ({"rope_scaling": {"rope_type": "llama3", "low_freq_factor": 1.0,
                                              "high_freq_factor": 4.0}}, ["rope_scaling.factor", "missing"]),
    "rope-factor-string": ({"rope_scaling": {"rope_type": "llama3", "factor": "8", "low_freq_factor": 1.0,
                                             "high_freq_factor": 4.0}}, ["rope_scaling.factor", "number"]),
    "rope-factor-tiny": ({"rope_scaling": {"rope_type": "llama3", "factor": 1e-300, "low_freq_factor": 1.0,
                                           "high_freq_factor": 4.0}}, ["rope_scaling.factor", "at least 1"]),
    "rope-high-not-above-low": ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 4.0,
                                                  "high_freq_factor": 4.0}}, ["rope_scaling.high_freq_factor"]),
    "rope-params-theta-huge": ({"rope_theta": ..., "rope_parameters": {"rope_type": "default", "rope_theta": 1e300}},
                               ["rope_parameters.rope_theta"]),
    "partial-rotary": ({"partial_rotary_factor": 0.5}, ["'partial_rotary_factor'"]),
    "activation": ({"hidden_act": "gelu"}, ["'hidden_act'", "silu"]),
    "mlp-bias": ({"mlp_bias": True}, ["'mlp_bias'"]),
    "dtype-unknown": ({"torch_dtype": "int8"}, ["'torch_dtype'", "bfloat16"]),
    "layer-types-sliding": ({"layer_types": ["full_attention", "sliding_attention"]}, ["'layer_types'",
                                                                                       "sliding_attention"]),
    "layer-types-count": ({"layer_types": ["full_attention"]}, ["'layer_types'", "one entry per layer"]),
    "qwen-sliding": ({"model_type": "qwen2", "use_sliding_window": True}, ["'use_sliding_window'"]),
    "mistral-window-zero": ({"model_type": "mistral", "sliding_window": 0}, ["'sliding_window'"]),
    "qwen2-head-dim": ({"model_type": "qwen2", "head_dim": 8}, ["'head_dim'", "qwen2"]),
}


@pytest.mark.parametrize("case", list(HOSTILE))
def test_hostile_config_refused(tmp_path, case):
    changes, words = HOSTILE[case]
    if isinstance(changes, str):  # raw JSON text (values json.dumps cannot write)
        text = json.dumps(_config())[:-1] + ", " + changes + "}"
        text = text.replace('"rms_norm_eps": 1e-05, ', "")
    else:
        text = json.dumps(_config(**changes))
    _refused(tmp_path, text, *words)


#: Well-formed configs of features the runtime does not run: refused by the LLM commands, a valid record
#: for verify / prune / unpack (parse_config(runtime=False)).
UNSUPPORTED = {
    "rope-yarn": {"rope_scaling": {"rope_type": "yarn", "factor": 4.0, "beta_fast": 32, "beta_slow": 1}},
    "rope-linear-old-key": {"rope_scaling": {"type": "linear", "factor": 2.0}},
    "rope-dynamic-v5": {"rope_parameters": {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 500000.0}},
    "gelu": {"hidden_act": "gelu"},
    "mlp-bias": {"mlp_bias": True},
    "layer-kinds": {"layer_types": ["sliding_attention", "full_attention"]},
    "partial-rotary": {"partial_rotary_factor": 0.5},
    "float64": {"torch_dtype": "float64"},
    "head-dim-own": {"model_type": "mistral", "hidden_size": 18, "head_dim": 4},  # 18 % 4 heads != 0
    "default-with-factor": {"rope_scaling": {"rope_type": "default", "factor": 1.0}},
}

#: Malformed whether or not the runtime would run the model: refused by both parses.
MALFORMED = {
    "act-number": ({"hidden_act": 5}, "'hidden_act'"),
    "act-huge": ({"hidden_act": "x" * 1000}, "'hidden_act'"),
    "layer-kind-number": ({"layer_types": [1, "full_attention"]}, "'layer_types'"),
    "layer-kind-null": ({"layer_types": [None, "full_attention"]}, "'layer_types'"),
    "partial-rotary-over-1": ({"partial_rotary_factor": 2}, "'partial_rotary_factor'"),
    "rope-kind-number": ({"rope_scaling": {"rope_type": 7, "factor": 2.0}}, "'rope_scaling.rope_type'"),
    "yarn-factor-text": ({"rope_scaling": {"rope_type": "yarn", "factor": "4"}}, "'rope_scaling.factor'"),
    "yarn-factor-huge": ({"rope_scaling": {"rope_type": "yarn", "factor": 10**400}}, "'rope_scaling.factor'"),
    "mlp-bias-text": ({"mlp_bias": "yes"}, "'mlp_bias'"),
    "hidden-text": ({"hidden_size": "64"}, "'hidden_size'"),
}


@pytest.mark.parametrize("case", sorted(UNSUPPORTED))
def test_unsupported_but_well_formed_is_a_record(case):
    """parse_config refuses what the runtime does not run, or passes it (float64 is a dtype it reads);
    runtime=False (verify, prune, unpack) reads the sizes of the same config."""
    cfg = _config(**UNSUPPORTED[case])
    if case != "float64":
        with pytest.raises(InvalidInputError):
            parse_config(cfg)
    assert parse_config(cfg, runtime=False).hidden_size == cfg["hidden_size"]
    assert check_recorded(cfg, "x").num_hidden_layers == TINY.num_hidden_layers


def test_a_null_layer_kind_is_refused_by_the_runtime_parse():
    """(a null entry once passed both the names check and the full-attention check)"""
    with pytest.raises(InvalidInputError, match="layer_types"):
        parse_config(_config(layer_types=["full_attention", None]))


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_refused_by_both_parses(case):
    changes, field = MALFORMED[case]
    with pytest.raises(InvalidInputError, match=field):
        parse_config(_config(**changes), runtime=False)
    with pytest.raises(InvalidInputError):  # (a yarn kind is refused as a kind before its factor is read)
        parse_config(_config(**changes))


def test_check_recorded_leaves_other_model_types_alone():
    assert check_recorded({"model_type": "gpt2", "n_embd": "anything"}, "x") is None


@pytest.mark.parametrize("text, words", [
    ("[1, 2]", ["JSON object", "list"]),
    ("{", ["not valid JSON"]),
    ('{"model_type": "llama", "model_type": "qwen2"}', ["duplicate key"]),
    ("[" * 100_000 + "]" * 100_000, ["nested"]),
    (b"\xff\xfe{}", ["UTF-8"]),
    ('{"model_type": NaN}', ["not valid JSON"]),
])
def test_config_not_json_object_refused(tmp_path, text, words):
    _refused(tmp_path, text, *words)


def test_config_too_large_refused(tmp_path):
    _refused(tmp_path, json.dumps(_config(padding="x" * (2 << 20))), "limit")


def test_config_missing(tmp_path):
    with pytest.raises(InvalidInputError, match="does not exist") as e:
        read_config(tmp_path)
    assert str(tmp_path / "config.json") in e.value.one_line()


def _in_thread(fn, timeout: float = 10.0):
    """fn() in a daemon thread: (finished, exception). A hang fails the test instead of blocking it."""
    box: dict = {}

    def run():
        try:
            fn()
        except BaseException as exc:  # noqa: BLE001 - reported to the test
            box["exc"] = exc

    th = threading.Thread(target=run, daemon=True)
    th.start()
    th.join(timeout)
    return not th.is_alive(), box.get("exc")


def test_config_fifo_refused_without_hanging(tmp_path):
    os.mkfifo(tmp_path / "config.json")
    finished, exc = _in_thread(lambda: read_config(tmp_path))
    assert finished, "reading a FIFO config.json hung"
    assert isinstance(exc, InvalidInputError) and exc.exit_code == 4
    assert "FIFO" in exc.one_line() and "config" in exc.one_line()


@pytest.mark.parametrize("device", ["/dev/zero", "/dev/urandom"])
def test_config_link_to_device_refused(tmp_path, device):
    (tmp_path / "config.json").symlink_to(device)
    finished, exc = _in_thread(lambda: read_config(tmp_path))
    assert finished and isinstance(exc, InvalidInputError) and "character device" in exc.one_line()


def test_config_is_a_folder(tmp_path):
    (tmp_path / "config.json").mkdir()
    with pytest.raises(InvalidInputError, match="folder"):
        read_config(tmp_path)


# --------------------------------------------------------------------------- tensor layout


def _folder(tmp_path, cfg: LlmConfig = TINY, *, drop=(), add=None, reshape=None, retype=None, config=None):
    """An HF folder (config.json + model.safetensors) for ``cfg``, with tensors dropped/added/changed."""
    sd = {n: torch.zeros(s) for n, s in expected_tensors(cfg).items() if n not in drop}
    sd.update(add or {})
    for n, s in (reshape or {}).items():
        sd[n] = torch.zeros(s)
    for n, dt in (retype or {}).items():
        sd[n] = sd[n].to(dt)
    tmp_path.mkdir(exist_ok=True)
    save_state_dict(sd, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text(json.dumps(config or config_dict(cfg)))
    return tmp_path


def _layout_refused(folder, *words) -> str:
    with pytest.raises(InvalidInputError) as e:
        open_llm(folder)
    line = e.value.one_line()
    assert e.value.exit_code == 4 and "\n" not in line and str(folder) in line
    for w in words:
        assert w in line, line
    return line


def test_layout_accepted_for_each_member(tmp_path):
    for k, cfg in enumerate([TINY, replace(TINY, model_type="qwen2", attention_bias=True),
                             replace(TINY, model_type="qwen3", attention_bias=True, tie_word_embeddings=True),
                             replace(TINY, model_type="mistral", sliding_window=4)]):
        got, ckpt = open_llm(_folder(tmp_path / str(k), cfg))
        assert got == cfg and {t.name for t in ckpt.tensors} == set(expected_tensors(cfg))


def test_layout_names():
    names = expected_tensors(replace(TINY, model_type="qwen3", attention_bias=True))
    assert "model.layers.1.self_attn.q_norm.weight" in names and "model.layers.1.self_attn.o_proj.bias" in names
    q2 = expected_tensors(replace(TINY, model_type="qwen2", attention_bias=True, tie_word_embeddings=True))
    assert "model.layers.0.self_attn.v_proj.bias" in q2 and "model.layers.0.self_attn.o_proj.bias" not in q2
    assert "lm_head.weight" not in q2
    assert names["model.layers.0.self_attn.k_proj.weight"] == (8, 16)


def test_layout_missing_tensor(tmp_path):
    _layout_refused(_folder(tmp_path, drop=["model.layers.1.mlp.up_proj.weight"]),
                    "'model.layers.1.mlp.up_proj.weight'", "missing")


def test_layout_extra_tensor(tmp_path):
    _layout_refused(_folder(tmp_path, add={"model.layers.2.mlp.up_proj.weight": torch.zeros(24, 16),
                                           "vision.w": torch.zeros(2)}),
                    "model.layers.2.mlp.up_proj.weight", "not part", "2 such")


def test_layout_misshaped_tensor(tmp_path):
    _layout_refused(_folder(tmp_path, reshape={"model.layers.0.self_attn.k_proj.weight": (16, 16)}),
                    "'model.layers.0.self_attn.k_proj.weight'", "[16, 16]", "[8, 16]")


def test_layout_integer_tensor(tmp_path):
    _layout_refused(_folder(tmp_path, retype={"model.norm.weight": torch.int32}), "'model.norm.weight'", "I32")


def test_layout_tied_but_head_stored(tmp_path):
    cfg = replace(TINY, tie_word_embeddings=True)
    _layout_refused(_folder(tmp_path, cfg, add={"lm_head.weight": torch.zeros(40, 16)}), "lm_head.weight",
                    "tie_word_embeddings")


def test_layout_untied_but_head_missing(tmp_path):
    _layout_refused(_folder(tmp_path, drop=["lm_head.weight"]), "'lm_head.weight'", "missing")


def test_layout_config_wrong_family_member(tmp_path):
    """A qwen2 folder whose config says llama: the biases are extra tensors."""
    q2 = replace(TINY, model_type="qwen2", attention_bias=True)
    _layout_refused(_folder(tmp_path, q2, config=config_dict(TINY)), "self_attn.k_proj.bias", "llama layout")


def test_layout_old_inv_freq_buffers_ignored(tmp_path):
    folder = _folder(tmp_path, add={"model.layers.0.self_attn.rotary_emb.inv_freq": torch.zeros(2)})
    open_llm(folder)
    bad = _folder(tmp_path / "b", add={"model.layers.0.self_attn.rotary_emb.inv_freq": torch.zeros(3)})
    _layout_refused(bad, "inv_freq")


@pytest.mark.parametrize("number", ["\u00b2", "\u0663", "0" * 5000, "00"])
def test_layout_inv_freq_layer_numbers_that_are_not_ascii_decimal(tmp_path, number):
    """Only a layer number as transformers writes it marks an ignorable buffer: a superscript two (which
    str.isdigit takes and int() refuses), an Arabic-Indic three (which int() reads as 3), 5000 zeros
    (over int()'s digit limit) or a leading zero are extra tensors (exit 4), never a crash."""
    folder = _folder(tmp_path, add={f"model.layers.{number}.self_attn.rotary_emb.inv_freq": torch.zeros(2)})
    _layout_refused(folder, "inv_freq", "not part of")


def test_layout_torch_tied_alias_accepted(tmp_path):
    """A .bin whose lm_head shares the embedding's storage (torch's tied save) is a tied model."""
    cfg = replace(TINY, tie_word_embeddings=True)
    sd = {n: torch.zeros(s) for n, s in expected_tensors(cfg).items()}
    sd["lm_head.weight"] = sd["model.embed_tokens.weight"]
    torch.save(sd, tmp_path / "pytorch_model.bin")
    (tmp_path / "config.json").write_text(json.dumps(config_dict(cfg)))
    ckpt = open_checkpoint(tmp_path / "pytorch_model.bin")
    check_layout(cfg, ckpt)
    with pytest.raises(InvalidInputError, match="shares its storage"):
        check_layout(replace(cfg, tie_word_embeddings=False, vocab_size=40), ckpt)


def test_open_llm_not_a_folder(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(InvalidInputError, match="not a folder"):
        open_llm(tmp_path / "f")


def test_config_refused_before_weights_read(tmp_path):
    folder = _folder(tmp_path, config=_config(hidden_size=10**9))
    (folder / "model.safetensors").write_bytes(b"garbage")  # never opened: the config is refused first
    _layout_refused(folder, "'hidden_size'", "config.json")


# --------------------------------------------------------------------------- example writer


def test_presets_have_the_published_shapes():
    one, eight = PRESETS["llama-1b"][1], PRESETS["llama-8b"][1]
    n1 = sum(math.prod(s) for s in expected_tensors(one).values())
    n8 = sum(math.prod(s) for s in expected_tensors(eight).values())
    assert n1 == 1_235_814_400  # Llama-3.2-1B
    assert n8 == 8_030_261_248  # Llama-3-8B
    assert folder_bytes(eight) == 2 * n8 and folder_bytes(PRESETS["llama-tiny"][1]) == 4 * sum(
        math.prod(s) for s in expected_tensors(PRESETS["llama-tiny"][1]).values())


def test_write_example_tiny(tmp_path):
    seen = []
    folder = write_example("llama-tiny", tmp_path / "tiny", progress=lambda n, d, t: seen.append((d, t)))
    cfg, ckpt = open_llm(folder)
    assert cfg == PRESETS["llama-tiny"][1]
    assert seen[-1][0] == seen[-1][1] == len(expected_tensors(cfg))
    idx = json.loads((folder / "model.safetensors.index.json").read_text())
    assert set(idx["weight_map"]) == set(expected_tensors(cfg))
    assert idx["metadata"]["total_size"] == folder_bytes(cfg)
    for f in folder.glob("*.safetensors"):
        assert parse_file(f).metadata == {"format": "pt"}
    emb = ckpt.load("model.embed_tokens.weight")
    assert abs(emb.std().item() - 0.02) < 0.002 and torch.equal(ckpt.load("model.norm.weight"), torch.ones(64))
    assert not [p for p in folder.iterdir() if "balprune-tmp" in p.name]


def test_writer_values_do_not_depend_on_sharding(tmp_path):
    a = write_hf_folder(TINY, tmp_path / "a")
    b = write_hf_folder(TINY, tmp_path / "b", max_shard_bytes=3000)
    ca, cb = open_checkpoint(a), open_checkpoint(b)
    assert len(list(b.glob("model-*.safetensors"))) > 2
    for n in expected_tensors(TINY):
        assert torch.equal(ca.load(n), cb.load(n)), n
    c = open_checkpoint(write_hf_folder(TINY, tmp_path / "c", seed=1))
    assert not torch.equal(ca.load("lm_head.weight"), c.load("lm_head.weight"))


def test_writer_refuses_non_empty_folder_without_force(tmp_path):
    folder = write_hf_folder(TINY, tmp_path / "m")
    before = (folder / "config.json").read_bytes()
    with pytest.raises(OutputError, match="not empty") as e:
        write_hf_folder(replace(TINY, num_hidden_layers=1), folder)
    assert e.value.exit_code == 5 and (folder / "config.json").read_bytes() == before
    write_hf_folder(replace(TINY, num_hidden_layers=1), folder, force=True)
    assert read_config(folder).num_hidden_layers == 1
    open_llm(folder)
    with pytest.raises(OutputError, match="does not exist"):
        write_hf_folder(TINY, tmp_path / "missing" / "m")
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputError, match="not a folder"):
        write_hf_folder(TINY, tmp_path / "file")


def test_unknown_example_name(tmp_path):
    from balprune.errors import UsageError

    with pytest.raises(UsageError, match="llama-tiny"):
        write_example("llama-70b", tmp_path / "x")


def test_writer_leaves_nothing_when_interrupted(tmp_path):
    """An error mid-write (here from the value source; a signal or a full disk alike) leaves no folder."""
    calls = []

    def fail_on_third(name, shape, dtype):
        calls.append(name)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return torch.zeros(shape, dtype=dtype)

    with pytest.raises(KeyboardInterrupt):
        write_hf_folder(TINY, tmp_path / "m", max_shard_bytes=3000, tensor_fn=fail_on_third)
    assert list(tmp_path.iterdir()) == []


def test_writer_checks_free_space_first(tmp_path, monkeypatch):
    import shutil

    from balprune.llm import examples

    monkeypatch.setattr(examples.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**6, 10**6 - 10, 10))
    with pytest.raises(OutputError, match="GB free") as e:
        write_example("llama-8b", tmp_path / "big")
    assert e.value.exit_code == 5 and list(tmp_path.iterdir()) == []


def test_writer_folder_mode_follows_umask(tmp_path):
    old = os.umask(0o022)
    try:
        folder = write_hf_folder(TINY, tmp_path / "m")
    finally:
        os.umask(old)
    assert folder.stat().st_mode & 0o777 == 0o755


def test_example_command_writes_an_hf_folder_that_prune_reads(cli, tmp_path):
    """`balprune example llama-tiny -o DIR`: config.json, shards and their index; prune takes the folder;
    an existing non-empty folder is refused without --force (exit 5) and left as it was."""
    folder = tmp_path / "tiny"
    r = cli("example", "llama-tiny", "-o", folder)
    assert r.code == 0 and "llama-tiny" in r.out, r
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model-00001-of-00001.safetensors",
                                                        "model.safetensors.index.json", "tokenizer.json"]
    cfg = read_config(folder)
    assert (cfg.model_type, cfg.num_hidden_layers, cfg.hidden_size) == ("llama", 4, 64)
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    r = cli("example", "llama-tiny", "-o", folder)
    assert r.code == 5 and r.err.count("\n") == 1 and "--force" in r.err, r
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    out = tmp_path / "tiny.balanced.safetensors"
    assert cli("prune", folder, "-s", "0.5", "--blocks", "4", "-o", out).code == 0
    assert cli("verify", out).code == 0


def test_an_hf_text_file_linking_out_of_its_folder_is_refused(tmp_path):
    """A tokenizer_config.json linked to a file elsewhere would be copied into the packed file (and out
    again by unpack --hf-folder): refused as a shard linking out is, naming both."""
    from balprune.cli import main
    from balprune.llm.examples import write_example

    folder = write_example("llama-tiny", tmp_path / "m")
    secret = tmp_path / "secret.json"
    secret.write_text('{"token": "s3cr3t"}')
    (folder / "tokenizer_config.json").unlink(missing_ok=True)
    (folder / "tokenizer_config.json").symlink_to(secret)
    out = tmp_path / "p.safetensors"
    assert main(["prune", str(folder), "--sparsity", "0.5", "-o", str(out)]) == 4
    assert not out.exists()


@pytest.mark.parametrize("name", ["tokenizer.json", "config.json"])
def test_an_hf_text_file_in_a_symlink_loop_is_refused(tmp_path, capsys, name):
    """config.json or tokenizer.json linking to itself: exit 4 naming it (Path.resolve's RuntimeError was
    exit 70), for prune (which records the folder's files) and unpack --like."""
    from balprune.cli import main
    from balprune.llm.examples import write_example

    folder = write_example("llama-tiny", tmp_path / "m")
    packed = tmp_path / "p.safetensors"
    assert main(["prune", str(folder), "--sparsity", "0.5", "-o", str(packed)]) == 0
    (folder / name).unlink()
    (folder / name).symlink_to(name)
    capsys.readouterr()
    out = tmp_path / "q.safetensors"
    assert main(["prune", str(folder), "--sparsity", "0.5", "-o", str(out)]) == 4
    assert not out.exists()
    err = capsys.readouterr().err
    assert "loop" in err and name in err and "internal error" not in err
    assert main(["unpack", str(packed), "--hf-folder", str(tmp_path / "u"), "--like", str(folder)]) == 4
    assert not (tmp_path / "u").exists()


def test_a_folder_with_model_safetensors_and_a_shard_index_is_ambiguous(tmp_path):
    """transformers loads model.safetensors where both exist; reading the index would prune other weights."""
    import shutil

    from balprune.checkpoint import open_checkpoint
    from balprune.llm.examples import write_example

    folder = write_example("llama-tiny", tmp_path / "m")
    shards = sorted(folder.glob("*.safetensors"))
    if not (folder / "model.safetensors.index.json").exists():  # make it sharded: one shard and its index
        (folder / "model.safetensors").rename(folder / "model-00001-of-00001.safetensors")
        from safetensors import safe_open
        with safe_open(folder / "model-00001-of-00001.safetensors", "pt") as f:
            names = list(f.keys())
        (folder / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {}, "weight_map": {n: "model-00001-of-00001.safetensors" for n in names}}))
        shards = [folder / "model-00001-of-00001.safetensors"]
    assert open_checkpoint(folder).tensors
    shutil.copy(shards[0], folder / "model.safetensors")
    with pytest.raises(InvalidInputError, match="holds both model.safetensors and model.safetensors.index.json"):
        open_checkpoint(folder)
