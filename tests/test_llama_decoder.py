"""runtime.model.llama.LlamaDecoder on the CPU: its static-buffer step and batched prefill against the
float32 masked reference model (llm.reference.ReferenceLM) of the same packed file, for the family's
variants (GQA, qwen2 biases, qwen3 q/k norms, a mistral sliding window, untied heads); the row
stacking of q/k/v and gate/up; and the step's state machine (position, token, history)."""

from __future__ import annotations

import zlib
from dataclasses import replace

import pytest
import torch

from balprune.errors import UsageError
from balprune.llm.evaluate import open_model
from balprune.llm.examples import write_example, write_hf_folder
from balprune.llm.family import Llama3RopeScaling, LlmConfig
from balprune.llm.reference import ReferenceLM
from balprune.runtime.model.llama import LlamaDecoder, checkpoint_weights, dense_projection, stack_rows

PROMPT = [5, 17, 3, 99, 42, 8, 250, 1]


def _values(name: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """Norms 1 +- 0.2, biases and weights N(0, 0.1): every parameter shows in the logits."""
    g = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    if name.endswith("norm.weight"):
        return (1 + 0.2 * torch.randn(shape, generator=g)).to(dtype)
    return (0.1 * torch.randn(shape, generator=g)).to(dtype)


BASE = LlmConfig(model_type="llama", vocab_size=300, hidden_size=32, intermediate_size=56, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, head_dim=8, rms_norm_eps=1e-5, rope_theta=10000.0,
                 rope_scaling=None, tie_word_embeddings=False, attention_bias=False, max_position_embeddings=128,
                 torch_dtype="float32")
VARIANTS = {
    "llama3-gqa-rope-scaling-tied": replace(BASE, rope_theta=500000.0, tie_word_embeddings=True,
                                            rope_scaling=Llama3RopeScaling(8.0, 1.0, 4.0, 16)),
    "llama-bias-untied-mha": replace(BASE, attention_bias=True, num_key_value_heads=4),
    "qwen2-biases": replace(BASE, model_type="qwen2", attention_bias=True, rms_norm_eps=1e-6, rope_theta=1e6),
    "qwen3-qk-norm": replace(BASE, model_type="qwen3", head_dim=16, rms_norm_eps=1e-6, rope_theta=1e6),
    "mistral-window-4": replace(BASE, model_type="mistral", num_key_value_heads=1, sliding_window=4),
}


def _packed(tmp_path, variant: str | None = None, *extra: str):
    """A packed file at 50% balanced (4 blocks) of llama-tiny, or of a VARIANTS folder."""
    from balprune.cli import main

    if variant is None:
        folder = write_example("llama-tiny", tmp_path / "src")
    else:
        folder = write_hf_folder(VARIANTS[variant], tmp_path / "src", tensor_fn=_values)
    out = tmp_path / "p.safetensors"
    pattern = [] if "--nm" in extra else ["--sparsity", "0.5", "--blocks", "4"]  # N:M sets its own sparsity
    assert main(["prune", str(folder), *pattern, "-o", str(out), *extra]) == 0
    return out


def _decoder(path, max_len=32):
    cfg, ckpt, _ = open_model(path)
    dec = LlamaDecoder(cfg, checkpoint_weights(ckpt), dtype=torch.float32, device=torch.device("cpu"),
                       max_len=max_len, make_projection=dense_projection("float32"))
    return cfg, ckpt, dec


def _close(a: torch.Tensor, b: torch.Tensor) -> None:
    assert float((a.double() - b.double()).norm() / b.double().norm()) < 1e-5


def test_steps_equal_the_float32_reference(tmp_path):
    cfg, ckpt, dec = _decoder(_packed(tmp_path))
    ref = ReferenceLM.from_checkpoint(cfg, ckpt)
    cache = ref.new_cache(32)
    want = ref.step(torch.tensor([PROMPT]), cache)[0, -1]
    _close(dec.prefill(torch.tensor(PROMPT)), want)
    assert int(dec.pos) == dec.length == len(PROMPT) and int(dec.token) == int(torch.argmax(want))
    for _ in range(10):
        token = int(dec.token)
        dec.step_()
        want = ref.step(torch.tensor([[token]]), cache)[0, -1]
        _close(dec.logits, want)
        assert int(dec.next_token) == int(dec.token) == int(torch.argmax(want))
    assert int(dec.pos) == len(PROMPT) + 10
    history = dec.history[len(PROMPT) - 1:len(PROMPT) + 10].tolist()
    assert history == ref.generate(PROMPT, 11)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_family_variants_equal_the_reference(tmp_path, variant):
    cfg, ckpt, dec = _decoder(_packed(tmp_path, variant))
    ref = ReferenceLM.from_checkpoint(cfg, ckpt)
    cache = ref.new_cache(32)
    _close(dec.prefill(torch.tensor(PROMPT)), ref.step(torch.tensor([PROMPT]), cache)[0, -1])
    for _ in range(6):  # past the mistral window of 4
        token = int(dec.token)
        dec.step_()
        _close(dec.logits, ref.step(torch.tensor([[token]]), cache)[0, -1])


def test_qkv_and_gate_up_are_one_launch_each_when_the_geometry_matches(tmp_path):
    _, _, dec = _decoder(_packed(tmp_path))
    layer = dec.layers[0]
    assert [len(layer.projections[k]) for k in ("qkv", "o", "gate_up", "down")] == [1, 1, 1, 1]
    cfg = dec.cfg
    assert layer.projections["qkv"][0].rows == cfg.q_dim + 2 * cfg.kv_dim
    assert layer.projections["gate_up"][0].rows == 2 * cfg.intermediate_size


def test_stack_rows_refuses_different_geometry():
    from balprune.formats.balanced import BalancedTensor
    from balprune.patterns.kinds import BalancedPattern

    a = BalancedTensor.from_dense(torch.zeros(4, 16), BalancedPattern(0.5, blocks=4))
    b = BalancedTensor.from_dense(torch.zeros(2, 16), BalancedPattern(0.75, blocks=4))
    c = BalancedTensor.from_dense(torch.arange(32.0).reshape(2, 16) * (torch.arange(16) % 2 == 0), BalancedPattern(0.5, blocks=4))
    assert stack_rows([a, b]) is None and stack_rows([a, torch.zeros(2, 16)]) is None
    s = stack_rows([a, c])
    assert s.shape == (6, 16) and torch.equal(s.to_dense(), torch.cat([a.to_dense(), c.to_dense()]))


def test_separate_launches_when_sparsities_differ(tmp_path):
    """A per-layer plan giving k_proj another sparsity: q/k/v run as three launches on slices of the one
    output buffer, with the same numbers."""
    path = tmp_path / "plan.toml"
    path.write_text('[prune]\nsparsity = 0.5\nblocks = 4\n\n[[layers]]\nmatch = "model.layers.*.self_attn.k_proj.weight"\n'
                    'sparsity = 0.75\n')
    cfg, ckpt, dec = _decoder(_packed(tmp_path, None, "--config", str(path)))
    assert len(dec.layers[0].projections["qkv"]) == 3
    ref = ReferenceLM.from_checkpoint(cfg, ckpt)
    cache = ref.new_cache(32)
    _close(dec.prefill(torch.tensor(PROMPT)), ref.step(torch.tensor([PROMPT]), cache)[0, -1])
    token = int(dec.token)
    dec.step_()
    _close(dec.logits, ref.step(torch.tensor([[token]]), cache)[0, -1])


def test_cache_bounds(tmp_path):
    path = _packed(tmp_path)
    with pytest.raises(UsageError, match="KV cache"):
        _decoder(path, max_len=0)
    _, _, dec = _decoder(path, max_len=4)
    with pytest.raises(UsageError, match="does not fit"):
        dec.prefill(torch.tensor(PROMPT))
