"""kernels/llama_ops.cu attention_split (flash-decoding over the KV cache) modelled on the CPU.

``split_attention`` follows the kernel's arithmetic chunk by chunk and CTA by CTA: which chunks are
active for a position and a sliding window, the per-chunk max and exp-sum per query head over the
visible positions, the unnormalised partial outputs, the last-CTA combine and the counter it resets;
held to direct float64 softmax attention with grouped K/V heads. Running the kernel is
tests/gpu/test_llama_gpu.py's job (the fused step against the float32 reference); here the launch
geometry the runtime gives it (FusedOps.attention_chunk / attention_shared) is checked against the
kernel's limits and its constants against the source.
"""

from __future__ import annotations

import math
import re

import numpy as np
import pytest

from balprune.llm.family import LlmConfig
from balprune.runtime.kernels import kernel_source
from balprune.runtime.model.llama import FusedOps


def split_attention(q, K, V, pos, window, scaling, chunk, max_len, count):
    """q [heads, d]; K, V [kvh, max_len, d]; returns out [heads, d] as attention_split computes it
    (float64 here: the kernel's fp32 and its roundings to T are the GPU test's); ``count`` [kvh] ints
    are the kernel's counters (must start and end at zero)."""
    heads, d = q.shape
    kvh = K.shape[0]
    rep = heads // kvh
    nchunks = -(-max_len // chunk)
    part = np.full((heads, nchunks, d + 2), np.nan)
    out = np.full((heads, d), np.nan)
    lo, hi = (max(0, pos - window + 1) if window > 0 else 0), pos
    for g in range(kvh):
        for c in range(nchunks):  # CTAs in any order: the combine must not depend on it
            j0 = c * chunk
            if j0 > hi or j0 + chunk <= lo:
                continue
            rows = min(chunk, max_len - j0)
            k = np.zeros((chunk, d))
            k[:rows] = K[g, j0:j0 + rows]
            j = j0 + np.arange(chunk)
            vis = (j >= lo) & (j <= hi)
            assert vis.any()
            s = np.where(vis[None, :], (q[g * rep:(g + 1) * rep] @ k.T) * scaling, -np.inf)  # [rep, chunk]
            m = s.max(axis=1)
            e = np.where(np.isinf(s), 0.0, np.exp(s - m[:, None]))
            v = np.zeros((chunk, d))
            v[:rows] = V[g, j0:j0 + rows]
            part[g * rep:(g + 1) * rep, c, :d] = e @ v
            part[g * rep:(g + 1) * rep, c, d] = m
            part[g * rep:(g + 1) * rep, c, d + 1] = e.sum(axis=1)
            last = count[g] == hi // chunk - lo // chunk
            count[g] += 1
            if last:
                cs = slice(lo // chunk, hi // chunk + 1)
                sub = part[g * rep:(g + 1) * rep, cs]
                assert not np.isnan(sub).any(), "the combine reads a chunk that was not written"
                M = sub[:, :, d].max(axis=1)
                f = np.exp(sub[:, :, d] - M[:, None])
                out[g * rep:(g + 1) * rep] = (sub[:, :, :d] * f[:, :, None]).sum(axis=1) / (sub[:, :, d + 1] * f).sum(1)[:, None]
                count[g] = 0
    return out


def _direct(q, K, V, pos, window, scaling):
    heads, d = q.shape
    rep = heads // K.shape[0]
    lo = max(0, pos - window + 1) if window > 0 else 0
    out = np.zeros((heads, d))
    for h in range(heads):
        g = h // rep
        s = K[g, lo:pos + 1] @ q[h] * scaling
        p = np.exp(s - s.max())
        out[h] = (p / p.sum()) @ V[g, lo:pos + 1]
    return out


@pytest.mark.parametrize("pos", [0, 1, 63, 64, 65, 200, 255])
@pytest.mark.parametrize("window", [0, 5, 64, 100])
@pytest.mark.parametrize("chunk", [8, 64])
def test_split_attention_is_softmax_attention(pos, window, chunk):
    rng = np.random.default_rng(pos * 7 + window + chunk)
    heads, kvh, d, max_len = 8, 2, 16, 256
    q = rng.standard_normal((heads, d))
    K, V = rng.standard_normal((kvh, max_len, d)), rng.standard_normal((kvh, max_len, d))
    count = np.zeros(kvh, np.int64)
    got = split_attention(q, K, V, pos, window, d ** -0.5, chunk, max_len, count)
    np.testing.assert_allclose(got, _direct(q, K, V, pos, window, d ** -0.5), rtol=1e-10, atol=1e-12)
    assert (count == 0).all()  # every counter reset for the next step


def test_a_max_len_that_is_not_a_multiple_of_the_chunk():
    rng = np.random.default_rng(3)
    q, K, V = rng.standard_normal((4, 8)), rng.standard_normal((1, 70, 8)), rng.standard_normal((1, 70, 8))
    got = split_attention(q, K, V, 69, 0, 0.3, 64, 70, np.zeros(1, np.int64))
    np.testing.assert_allclose(got, _direct(q, K, V, 69, 0, 0.3), rtol=1e-10)


def _cfg(d: int, heads: int, kvh: int) -> LlmConfig:
    return LlmConfig(model_type="llama", vocab_size=300, hidden_size=heads * d, intermediate_size=64,
                     num_hidden_layers=1, num_attention_heads=heads, num_key_value_heads=kvh, head_dim=d,
                     rms_norm_eps=1e-5, rope_theta=1e4, rope_scaling=None, tie_word_embeddings=True,
                     attention_bias=False, max_position_embeddings=4096, torch_dtype="float32")


@pytest.mark.parametrize("d,heads,kvh,chunk", [(64, 32, 8, 64), (128, 32, 8, 32), (256, 16, 8, 16), (8, 4, 2, 64),
                                               (512, 4, 2, 8)])
def test_the_chunk_is_the_largest_that_fits_shared_memory(d, heads, kvh, chunk):
    cfg = _cfg(d, heads, kvh)
    assert FusedOps.attention_chunk(cfg) == chunk
    assert FusedOps.attention_shared(cfg, chunk) <= FusedOps.SHARED_LIMIT
    bigger = [c for c in FusedOps.CHUNKS if c > chunk]
    assert all(FusedOps.attention_shared(cfg, c) > FusedOps.SHARED_LIMIT for c in bigger)


def test_a_head_too_wide_for_any_chunk_is_left_to_torch_ops():
    cfg = _cfg(1024, 8, 1)  # 8 query heads of 1024 on one K/V head: even 8 positions need 98 KB
    assert FusedOps.attention_chunk(cfg) is None

    class Dec:  # what FusedOps.supported reads
        dtype = __import__("torch").float16

    Dec.cfg = cfg
    assert "shared memory" in FusedOps.supported(Dec)


def test_kernel_constants_and_the_shared_memory_formula_match_the_source():
    src = re.sub(r"\s+", " ", kernel_source("llama_ops.cu"))
    threads = int(re.search(r"constexpr int kAttThreads = (\d+);", src).group(1))
    assert threads == FusedOps.THREADS_ATTENTION and threads % 32 == 0
    assert "2 * chunk * (d + 1) + rep * d + rep * chunk floats" in src
    assert "__shared__ float mx[32], sum[32];" in src  # FusedOps.supported: at most 32 query heads per K/V head
    assert math.log2(max(FusedOps.CHUNKS)).is_integer()
