"""bench.hf_peer.TransformersDecoder (the transformers peer of ``bench --model`` on a Llama-family
file) on the CPU: built from a packed file's recorded config.json and its masked weights, its prefill
and teacher-forced decode steps (StaticCache, eager) give the float32 reference model's logits, for a
tied llama and the family's variants; a weight whose shape disagrees is refused. The CUDA-graph
capture is the GPU bench test's (tests/gpu/test_llama_gpu.py)."""

from __future__ import annotations

import pytest
import torch
from helpers import transformers_or_skip
from test_llama_decoder import PROMPT, _packed

from balprune.bench.hf_peer import TransformersDecoder, transformers_or_reason
from balprune.errors import UsageError
from balprune.formats.packed_file import read_packed
from balprune.llm.evaluate import open_model
from balprune.llm.reference import ReferenceLM
from balprune.runtime.model.llama import checkpoint_weights


def _peer_and_reference(path, max_len=24):
    cfg, ckpt, _ = open_model(path)
    config = read_packed(path).hf_files().config
    peer = TransformersDecoder(cfg, config, checkpoint_weights(ckpt), max_len=max_len, dtype="float32",
                               device=torch.device("cpu"))
    return cfg, ckpt, peer, ReferenceLM.from_checkpoint(cfg, ckpt)


@pytest.mark.parametrize("variant", [None, "qwen2-biases", "qwen3-qk-norm", "llama-bias-untied-mha"])
def test_the_peer_computes_the_reference_models_logits(tmp_path, variant):
    transformers_or_skip()
    path = _packed(tmp_path, variant)
    cfg, _, peer, ref = _peer_and_reference(path)
    cache = ref.new_cache(len(PROMPT) + 6)
    want = ref.step(torch.tensor([PROMPT]), cache)[0, -1]
    got = peer.prefill(PROMPT)
    assert float((got - want).norm() / want.norm()) < 1e-4
    for t in (3, 250, 7, 42, 1):
        want = ref.step(torch.tensor([[t]]), cache)[0, -1]
        got = peer.step(t)
        assert float((got - want).norm() / want.norm()) < 1e-4, t
    assert peer.length == len(PROMPT) + 5
    # greedy continuation from the device-side id, after a reset
    peer.reset()
    peer.prefill(PROMPT)
    first = int(torch.argmax(peer.logits))
    peer.step()
    assert int(peer.ids[0, 0]) == int(torch.argmax(peer.logits)) and peer.length == len(PROMPT) + 1
    assert first >= 0
    # bytes: every parameter once (a tied head shares the embedding's)
    n = sum(p.numel() for p in {id(p): p for p in peer.model.parameters()}.values())
    assert peer.weight_bytes == 4 * n


def test_runs_past_the_cache_are_refused(tmp_path):
    transformers_or_skip()
    _, _, peer, _ = _peer_and_reference(_packed(tmp_path), max_len=len(PROMPT) + 1)
    with pytest.raises(UsageError, match="does not fit"):
        peer.prefill(list(range(len(PROMPT) + 2)))
    peer.prefill(PROMPT)
    peer.step(3)
    with pytest.raises(UsageError, match="does not fit"):
        peer.step(4)


def test_a_weight_of_another_shape_is_refused(tmp_path):
    transformers_or_skip()
    path = _packed(tmp_path)
    cfg, ckpt, _ = open_model(path)
    weight = checkpoint_weights(ckpt)

    def wrong(name):
        packed, dense = weight(name)
        return (packed, dense[:-1]) if name.endswith("o_proj.weight") else (packed, dense)

    with pytest.raises(UsageError, match="o_proj.weight"):
        TransformersDecoder(cfg, read_packed(path).hf_files().config, wrong, max_len=16, dtype="float32",
                            device=torch.device("cpu"))


def test_the_reason_is_given_when_transformers_is_missing(monkeypatch):
    import builtins

    real = builtins.__import__

    def no_transformers(name, *a, **k):
        if name == "transformers":
            raise ImportError("no module named transformers")
        return real(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_transformers)
    tf, why = transformers_or_reason()
    assert tf is None and "transformers is not importable" in why
