"""The Llama-family reference model against transformers, on tiny random HF folders (CPU, float32).

Each folder is written by balprune's own writer (llm.examples.write_hf_folder, several shards) with
norm weights and biases drawn away from their trivial values, so every parameter matters; transformers
loads the same folder with from_pretrained(attn_implementation="eager"). Skipped where transformers
is not installed (it is a dev dependency, never a runtime one).
"""

from __future__ import annotations

import zlib
from dataclasses import replace

import pytest
import torch
from helpers import transformers_or_skip

from balprune.errors import InvalidInputError
from balprune.llm.examples import PRESETS, write_hf_folder
from balprune.llm.family import Llama3RopeScaling, LlmConfig, read_config
from balprune.llm.reference import ReferenceLM

BASE = LlmConfig(model_type="llama", vocab_size=96, hidden_size=32, intermediate_size=56, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, head_dim=8, rms_norm_eps=1e-5, rope_theta=10000.0,
                 rope_scaling=None, tie_word_embeddings=False, attention_bias=False, max_position_embeddings=128,
                 torch_dtype="float32")

CASES = {
    "llama2-mha-untied": replace(BASE, num_key_value_heads=4),
    "llama3-gqa-rope-scaling": replace(BASE, rope_theta=500000.0, rope_scaling=Llama3RopeScaling(8.0, 1.0, 4.0, 16)),
    "llama-tiny-preset": PRESETS["llama-tiny"][1],
    "llama-attention-bias-tied": replace(BASE, attention_bias=True, tie_word_embeddings=True),
    "mistral-sliding-window": replace(BASE, model_type="mistral", num_key_value_heads=1, sliding_window=5,
                                      rope_theta=1e6),
    "mistral-no-window": replace(BASE, model_type="mistral"),
    "qwen2-biases-tied": replace(BASE, model_type="qwen2", attention_bias=True, tie_word_embeddings=True,
                                 rms_norm_eps=1e-6, rope_theta=1e6),
    "qwen3-qk-norm": replace(BASE, model_type="qwen3", head_dim=16, rms_norm_eps=1e-6, rope_theta=1e6),
    "qwen3-bias-tied": replace(BASE, model_type="qwen3", attention_bias=True, tie_word_embeddings=True),
}


def _values(name: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """Random values where every parameter shows: norms 1 +- 0.2, biases and weights N(0, 0.1)."""
    g = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    if name.endswith("norm.weight"):
        return (1 + 0.2 * torch.randn(shape, generator=g)).to(dtype)
    return (0.1 * torch.randn(shape, generator=g)).to(dtype)


def _ids(cfg: LlmConfig, b: int = 2, t: int = 24) -> torch.Tensor:
    return torch.randint(0, cfg.vocab_size, (b, t), generator=torch.Generator().manual_seed(1))


def _hf_logits(folder, ids: torch.Tensor) -> torch.Tensor:
    tf = transformers_or_skip()
    model = tf.AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager", dtype=torch.float32)
    with torch.no_grad():
        return model.eval()(ids).logits.float()


def _close(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.shape == b.shape and a.dtype == torch.float32
    scale = max(1.0, b.abs().max().item())
    err = (a - b).abs().max().item()
    assert err <= 1e-5 * scale, f"max abs diff {err:.3g} (logit scale {scale:.3g})"


@pytest.mark.parametrize("case", list(CASES))
def test_reference_logits_equal_transformers(tmp_path, case):
    transformers_or_skip()
    cfg = CASES[case]
    folder = write_hf_folder(cfg, tmp_path / case, max_shard_bytes=20_000, tensor_fn=_values)
    assert len(list(folder.glob("model-*.safetensors"))) > 1  # sharded, through the index
    assert read_config(folder) == cfg
    ids = _ids(cfg)
    ref = ReferenceLM.from_folder(folder)
    logits = ref(ids)
    assert logits.shape == (2, 24, cfg.vocab_size)
    _close(logits, _hf_logits(folder, ids))


def test_bfloat16_folder_loaded_as_float32(tmp_path):
    """Weights stored in bfloat16 and read as float32 by both sides give the same logits."""
    cfg = CASES["llama3-gqa-rope-scaling"]
    folder = write_hf_folder(cfg, tmp_path / "m", dtype=torch.bfloat16, tensor_fn=_values)
    assert read_config(folder).torch_dtype == "bfloat16"
    ids = _ids(cfg)
    _close(ReferenceLM.from_folder(folder)(ids), _hf_logits(folder, ids))


def test_folder_saved_by_transformers_5_is_read(tmp_path):
    """transformers 5 writes rope_parameters and dtype (not rope_theta / rope_scaling / torch_dtype)."""
    tf = transformers_or_skip()
    hf_cfg = tf.LlamaConfig(vocab_size=80, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                            rope_theta=500000.0, tie_word_embeddings=True,
                            rope_scaling={"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0,
                                          "high_freq_factor": 4.0, "original_max_position_embeddings": 16})
    torch.manual_seed(0)
    model = tf.LlamaForCausalLM(hf_cfg).eval()
    model.save_pretrained(tmp_path / "hf")
    cfg = read_config(tmp_path / "hf")
    assert cfg.rope_scaling == Llama3RopeScaling(4.0, 1.0, 4.0, 16) and cfg.rope_theta == 500000.0
    assert cfg.tie_word_embeddings and cfg.head_dim == 8
    ids = _ids(cfg)
    with torch.no_grad():
        expected = model(ids).logits.float()
    _close(ReferenceLM.from_folder(tmp_path / "hf")(ids), expected)


def test_layer_by_layer_equals_forward(tmp_path):
    cfg = CASES["qwen2-biases-tied"]
    ref = ReferenceLM.from_folder(write_hf_folder(cfg, tmp_path / "m", tensor_fn=_values))
    ids = _ids(cfg, 1, 9)
    with torch.no_grad():
        h = ref.embed(ids)
        cos, sin = ref.rope(9)
        for layer in ref.model.layers:
            h = layer(h, cos, sin, ref.mask(9))
        assert torch.equal(ref.head(h), ref(ids))
    assert ref.lm_head.weight is ref.model.embed_tokens.weight  # tied: one tensor
    names = {n for n, _ in ref.named_parameters()}
    assert "model.layers.1.self_attn.q_proj.bias" in names and "model.layers.1.self_attn.o_proj.bias" not in names


def test_causality_and_sliding_window(tmp_path):
    """Changing token j changes no logit before j; with a window w, none at i >= j + w after one layer."""
    cfg = replace(CASES["mistral-sliding-window"], num_hidden_layers=1)
    ref = ReferenceLM.from_folder(write_hf_folder(cfg, tmp_path / "m", tensor_fn=_values))
    ids = _ids(cfg, 1, 20)
    other = ids.clone()
    other[0, 7] = (other[0, 7] + 1) % cfg.vocab_size
    diff = (ref(ids) - ref(other)).abs().amax(-1)[0]
    assert diff[:7].max() == 0 and diff[7] > 0
    assert diff[7 + cfg.sliding_window:].max() == 0


def test_token_ids_out_of_range_refused(tmp_path):
    cfg = CASES["llama2-mha-untied"]
    ref = ReferenceLM.from_folder(write_hf_folder(cfg, tmp_path / "m"))
    with pytest.raises(InvalidInputError, match="token id 96 is outside") as e:
        ref(torch.tensor([[1, 96]]))
    assert e.value.exit_code == 4
    with pytest.raises(ValueError, match="int64"):
        ref(torch.tensor([[1, 2]], dtype=torch.int32))


def test_half_precision_reference_close_to_float32(tmp_path):
    cfg = CASES["qwen3-qk-norm"]
    folder = write_hf_folder(cfg, tmp_path / "m", tensor_fn=_values)
    ids = _ids(cfg)
    full = ReferenceLM.from_folder(folder)(ids)
    half = ReferenceLM.from_folder(folder, dtype=torch.bfloat16)(ids)
    assert half.dtype == torch.float32
    assert (half - full).abs().max() < 0.05 * full.abs().max()


def test_model_larger_than_memory_refused_before_loading(tmp_path, monkeypatch):
    from balprune import safeio

    cfg = CASES["llama2-mha-untied"]
    folder = write_hf_folder(cfg, tmp_path / "m")
    monkeypatch.setattr(safeio, "memory_available", lambda: 10_000)
    with pytest.raises(InvalidInputError, match="needs .*; 9.8 KiB of memory is available") as e:
        ReferenceLM.from_folder(folder)
    assert e.value.exit_code == 4


# ---------------------------------------------------------------------------- decoding with a KV cache


@pytest.mark.parametrize("case", ["llama3-gqa-rope-scaling", "mistral-sliding-window", "qwen3-qk-norm",
                                  "qwen2-biases-tied"])
def test_cached_steps_equal_the_full_forward(tmp_path, case):
    """A prompt step, then one token per step through the static cache: every step's logits are the full
    sequence's at those positions (the sliding window included: 24 tokens over a window of 5)."""
    cfg = CASES[case]
    ref = ReferenceLM.from_folder(write_hf_folder(cfg, tmp_path / case, tensor_fn=_values))
    ids = _ids(cfg, b=1, t=24)
    full = ref(ids)
    cache = ref.new_cache(32)
    got = [ref.step(ids[:, :7], cache)]
    for i in range(7, 24):
        got.append(ref.step(ids[:, i:i + 1], cache))
    assert cache.length == 24
    _close(torch.cat(got, dim=1), full)


def test_greedy_generate_equals_transformers(tmp_path):
    tf = transformers_or_skip()
    cfg = CASES["llama3-gqa-rope-scaling"]
    folder = write_hf_folder(cfg, tmp_path / "m", tensor_fn=_values)
    prompt = _ids(cfg, b=1, t=9)
    ours = ReferenceLM.from_folder(folder).generate(prompt[0].tolist(), 12)
    model = tf.AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager", dtype=torch.float32).eval()
    with torch.no_grad():
        theirs = model.generate(prompt, max_new_tokens=12, do_sample=False, min_new_tokens=12,
                                pad_token_id=0, eos_token_id=None)[0, 9:].tolist()
    assert ours == theirs


def test_a_step_past_the_cache_is_refused_and_writes_nothing(tmp_path):
    from balprune.errors import UsageError

    cfg = CASES["llama2-mha-untied"]
    ref = ReferenceLM.from_folder(write_hf_folder(cfg, tmp_path / "m", tensor_fn=_values))
    cache = ref.new_cache(8)
    ref.step(_ids(cfg, b=1, t=6), cache)
    before = [k.clone() for k, _ in cache.layers]
    with pytest.raises(UsageError, match="do not fit a KV cache of 8 positions"):
        ref.step(_ids(cfg, b=1, t=3), cache)
    assert cache.length == 6 and all(torch.equal(a, k) for a, (k, _) in zip(before, cache.layers))
    with pytest.raises(UsageError, match="cache length must be in"):
        ref.new_cache(cfg.max_position_embeddings + 1)
    with pytest.raises(UsageError, match="do not fit"):
        ref.generate([1, 2, 3], 10, max_len=8)


def test_the_default_cache_holds_exactly_what_the_run_stores_and_batches_must_match(tmp_path):
    from balprune.errors import UsageError

    cfg = CASES["llama2-mha-untied"]  # 128 positions
    ref = ReferenceLM.from_folder(write_hf_folder(cfg, tmp_path / "m", tensor_fn=_values))
    prompt = _ids(cfg, b=1, t=126)[0].tolist()
    assert len(ref.generate(prompt, 3)) == 3  # 126 + 2 stored positions: fits 128
    with pytest.raises(UsageError, match="batch of 1 sequence"):
        ref.step(_ids(cfg, b=1, t=2), ref.new_cache(8, batch=2))
