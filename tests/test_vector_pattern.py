"""Vector sparsity (1-D vectors of V weights kept or dropped whole) and the one-step mask chain."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from balprune.config import build_pattern, load_config, prune_options_from_config
from balprune.errors import ConfigError, UsageError
from balprune.formats.packed_file import read_packed, verify_packed
from balprune.patterns.kinds import BalancedPattern, BlockPattern, UnstructuredPattern, VectorPattern, keep_count
from balprune.patterns.vector import vector_mask
from balprune.prune.masks import nested_masks, next_mask, one_shot_mask


def _vectors(mask, length):
    rows, cols = mask.shape
    n = math.ceil(cols / length)
    padded = torch.zeros(rows, n * length, dtype=torch.bool)
    padded[:, :cols] = mask
    return padded.reshape(rows, n, length), n


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 12), st.integers(1, 50), st.sampled_from([1, 2, 4, 7, 8]), st.sampled_from([0.5, 0.8, 0.9]),
       st.integers(0, 2**31 - 1))
def test_vector_mask_keeps_whole_vectors_by_l2_norm(rows, cols, length, s, seed):
    m = torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed))
    mask = vector_mask(m, length, s)
    vecs, n = _vectors(mask, length)
    real, _ = _vectors(torch.ones(rows, cols, dtype=torch.bool), length)
    kept = vecs.any(-1)
    assert torch.equal(vecs, kept[..., None] & real), "a vector is kept or dropped whole"
    assert int(kept.sum()) == keep_count(s, rows * n)
    padded = torch.zeros(rows, n * length)
    padded[:, :cols] = m
    norms = padded.reshape(rows, n, length).norm(dim=-1)
    if bool(kept.any()) and bool((~kept).any()):
        assert float(norms[kept].min()) >= float(norms[~kept].max())


def test_vector_is_the_1xV_block_pattern():
    m = torch.randn(16, 40, generator=torch.Generator().manual_seed(1))
    assert torch.equal(one_shot_mask(m, VectorPattern(0.75, 8)), one_shot_mask(m, BlockPattern(0.75, (1, 8))))


PATTERNS = [BalancedPattern(0.9, blocks=4), BalancedPattern(0.9, blocks=7), UnstructuredPattern(0.9),
            BlockPattern(0.9, (2, 4)), VectorPattern(0.9, 4)]


@pytest.mark.parametrize("pattern", PATTERNS, ids=lambda p: f"{p.kind.value}")
def test_next_mask_chain_equals_the_generator_with_changing_weights(pattern):
    # The chain state is the previous bool mask, so a run can stop and continue from a saved mask.
    g = torch.Generator().manual_seed(7)
    w1 = torch.randn(10, 45, generator=g)
    w2 = w1.clone()
    sparsities = [0.3, 0.6, 0.8, 0.9]
    gen = nested_masks(w1, pattern, sparsities)
    prev = None
    for s in sparsities:
        a = next(gen)
        b = next_mask(w2, pattern, s, prev)
        assert torch.equal(a, b)
        if prev is not None:
            assert not bool((b & ~prev).any())
        prev = b
        noise = torch.randn(10, 45, generator=g)
        w1.mul_(a).add_(noise * a)  # "fine-tune" the kept weights
        w2.mul_(b).add_(noise * b)


def test_vector_pattern_config_and_errors(tmp_path):
    assert build_pattern("vector", sparsity="0.9") == VectorPattern(0.9, 8)
    assert build_pattern("vector", sparsity="0.9", vector_length="16") == VectorPattern(0.9, 16)
    with pytest.raises(UsageError):
        build_pattern("vector", sparsity="0.9", vector_length="0")
    with pytest.raises(ConfigError):
        VectorPattern(0.9, length=0)
    cfg = tmp_path / "v.toml"
    cfg.write_text('[prune]\npattern = "vector"\nsparsity = 0.8\nvector_length = 4\n'
                   '[[layers]]\nmatch = "fc2.*"\nsparsity = 0.5\n')
    opts = prune_options_from_config(load_config(cfg))
    assert opts.pattern == VectorPattern(0.8, 4) and opts.rules[0].pattern == VectorPattern(0.5, 4)
    cfg.write_text('[prune]\npattern = "vector"\nsparsity = 0.8\nvector_len = 4\n')
    with pytest.raises(ConfigError, match="vector_len"):
        load_config(cfg)


def test_prune_cli_vector_pattern_packs_1xV_tiles(cli, small_pt, tmp_path):
    out = tmp_path / "v.safetensors"
    r = cli("prune", small_pt, "--pattern", "vector", "--vector-length", "4", "--sparsity", "0.75", "-o", out)
    assert r.code == 0, r.err
    pf = verify_packed(out)
    entry = read_packed(out).manifest["tensors"]["fc1.weight"]
    assert entry["pattern"] == "block" and entry["block_shape"] == [1, 4]
    assert pf.manifest["options"]["pattern"] == "vector" and pf.manifest["options"]["vector_length"] == 4
    dense = pf.dense("fc1.weight")
    vecs, _ = _vectors(dense != 0, 4)
    assert int(vecs.any(-1).sum()) <= keep_count(0.75, 24 * 25)
    r = cli("prune", small_pt, "--pattern", "vector", "--vector-length", "-2", "--sparsity", "0.75", "-o",
            tmp_path / "bad.safetensors")
    assert r.code == 2 and "--vector-length" in r.err and not (tmp_path / "bad.safetensors").exists()
