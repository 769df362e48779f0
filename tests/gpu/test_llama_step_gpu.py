"""kernels/llama_step.cu (every decoder layer in one persistent launch, runtime.model.llama_step) on a GPU.

Files pruned with 32 blocks per row (the step kernel's lane records need a multiple of 32): the persistent
step forced on (``persistent="on"``), every dtype, against the float32 dense masked reference over 64 steps
from a 32-token prompt (positions past several attention chunks); the family variants (biases, qwen3 norms,
a sliding window); greedy tokens equal to the reference's in float32; graph replay equal to eager; and
``persistent="auto"`` chooses by timing, saying so.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from helpers import gpu_skip_reason

_why = gpu_skip_reason()
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(_why is not None, reason=_why or "")]

from balprune.runtime.measure import MODEL_TOLERANCE, relative_error  # noqa: E402

PROMPT = [(7 * i + 3) % 250 for i in range(32)]
STEPS = 64

#: lane records of one word per lane and one task per row (small), of several words and tasks (wide)
SHAPES = {"small": dict(hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2,
                        head_dim=32),
          "wide": dict(hidden_size=512, intermediate_size=4096, num_attention_heads=8, num_key_value_heads=2,
                       head_dim=64)}
VARIANTS = {"qwen2-biases": dict(model_type="qwen2", attention_bias=True, rms_norm_eps=1e-6, rope_theta=1e6),
            "qwen3-qk-norm": dict(model_type="qwen3", rms_norm_eps=1e-6, rope_theta=1e6),
            "mistral-window-4": dict(model_type="mistral", num_key_value_heads=1, sliding_window=4)}


def _file(tmp_path, shape: str, *prune_args: str, blocks: int = 32, **changes) -> object:
    from test_llama_decoder import BASE, _values

    from balprune.cli import main
    from balprune.llm.examples import write_hf_folder

    cfg = replace(BASE, **{**SHAPES[shape], **changes})  # (a variant may set a shape's field: its value wins)
    folder = write_hf_folder(cfg, tmp_path / "src", tensor_fn=_values)
    out = tmp_path / "p.safetensors"
    args = list(prune_args) or ["--sparsity", "0.5"]
    if "--nm" not in args:  # (N:M sets its own blocks: M columns each)
        args += ["--blocks", str(blocks)]
    assert main(["prune", str(folder), *args, "-o", str(out)]) == 0
    return out


def _against_reference(path, dtype: str, steps: int = STEPS, **kw):
    from test_llama_gpu import _reference_run

    from balprune.runtime.model.llama import PackedLlama

    want, tokens = _reference_run(path, steps)
    rt = PackedLlama.open(path, max_len=len(PROMPT) + steps, dtype=dtype, persistent="on", **kw)
    assert rt.decode_ops["path"] == "persistent", rt.decode_ops
    got = [rt.prefill(PROMPT).cpu()] + [rt.step(t).cpu() for t in tokens[:-1]]
    err = max(relative_error(g, w) for g, w in zip(got, want))
    assert err <= MODEL_TOLERANCE[dtype], err
    return rt, tokens


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("pattern", ["50%", "70%", "2:4"])
@pytest.mark.parametrize("shape", list(SHAPES))
def test_persistent_step_against_the_float32_reference(tmp_path, shape, pattern, dtype):
    args = ("--nm", "2:4") if pattern == "2:4" else ("--sparsity", str(int(pattern[:-1]) / 100))
    rt, tokens = _against_reference(_file(tmp_path, shape, *args), dtype)
    if dtype == "float32":
        rt.reset()
        assert rt.generate(PROMPT, STEPS) == tokens


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_persistent_step_family_variants(tmp_path, variant):
    _against_reference(_file(tmp_path, "small", **VARIANTS[variant]), "float32", 16)


def test_persistent_graph_replay_equals_eager(tmp_path):
    from balprune.runtime.model.llama import PackedLlama

    rt = PackedLlama.open(_file(tmp_path, "wide"), max_len=64, dtype="float16", persistent="on")
    assert rt.decode_ops["path"] == "persistent", rt.decode_ops
    eager = rt.generate(PROMPT, 20)
    eager_logits = rt.decoder.logits.clone()
    rt.capture()
    assert rt.generate(PROMPT, 20) == eager
    assert torch.equal(rt.decoder.logits, eager_logits)
    rt.capture()  # replayed again from a fresh capture: the kernel leaves its barrier counters at zero
    assert rt.generate(PROMPT, 20) == eager


def test_auto_chooses_by_timing_and_says_so(tmp_path):
    from balprune.runtime.model.llama import PackedLlama

    rt = PackedLlama.open(_file(tmp_path, "wide"), max_len=64, dtype="float16")
    ops = rt.decode_ops
    if ops["path"] == "persistent":
        assert "us per step against" in ops["reason"], ops
    else:
        assert ops["path"] == "fused" and "slower" in ops["persistent"], ops
    (tmp_path / "b4").mkdir()
    four = PackedLlama.open(_file(tmp_path / "b4", "small", blocks=4), max_len=64, dtype="float16")
    assert four.decode_ops["path"] == "fused" and "multiple of 32" in four.decode_ops["persistent"]
