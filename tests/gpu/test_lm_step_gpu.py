"""The LSTM LM's token-step stage on the GPU (runtime/model/lm_step.py, kernels/lstm_lm_step.cu):
every candidate (dense and balanced per-piece launches, the persistent launch) gives the float64
step's logits within the layer gate; the persistent path follows the per-piece path token after
token (state carried); graph replays equal eager runs, also after the 15-bit tags wrap around."""

from __future__ import annotations

import pytest
import torch
from helpers import gpu_skip_reason

from balprune import examples
from balprune.cli import main
from balprune.save import save_state_dict

_why = gpu_skip_reason()
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(_why is not None, reason=_why or "")]


def _packed_lm(tmp_path, *, vocab: int, hidden: int, layers: int = 2, sparsity: float = 0.75, blocks: int = 8):
    torch.manual_seed(2)
    m = examples.LstmLanguageModel(vocab=vocab, hidden=hidden, layers=layers)
    src = tmp_path / f"lm-{vocab}-{hidden}-{layers}.safetensors"
    save_state_dict({k: v.detach().contiguous() for k, v in m.state_dict().items()}, src)
    out = tmp_path / f"lm-{vocab}-{hidden}-{layers}.balanced.safetensors"
    assert main(["prune", str(src), "-s", str(sparsity), "--blocks", str(blocks), "-o", str(out)]) == 0
    return out


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("vocab,hidden,layers", [(300, 96, 2), (157, 200, 3), (64, 40, 1)])
def test_every_step_candidate_matches_the_float64_step(tmp_path, dtype, vocab, hidden, layers):
    from balprune.runtime.measure import STAGE_TOLERANCE as LAYER_GATE
    from balprune.runtime.measure import relative_error as rel_error
    from balprune.runtime.model import load_model

    rt = load_model(_packed_lm(tmp_path, vocab=vocab, hidden=hidden, layers=layers), dtype=dtype, paths="sparse",
                    measure=False)
    step = rt.step
    ref = step.reference()
    cands = step.candidates()
    assert any("(persistent" in k for k in cands), (list(cands), step.unavailable)
    assert {"balanced (steps)", "dense (steps)"} <= set(cands)
    for key, fn in cands.items():
        err = rel_error(fn().clone(), ref)
        assert err <= LAYER_GATE[dtype], (key, err)


@pytest.mark.parametrize("blocks", [24, 48])
def test_persistent_kernel_past_32_blocks_and_its_limit(tmp_path, blocks):
    """A fused layer [x | 0 | h] has the blocks of W_ih and of W_hh (--blocks 24 on 200 columns:
    2 x 23): past 32, x in column order no longer fits the staged rows' spare halves and sits
    after them; --blocks 48 gives 2 x 40, past the kernel's 64 (4 * block must fit one byte of an
    x offset), so the persistent launch is unavailable with its reason and the per-piece paths
    still gate."""
    from balprune.runtime.measure import STAGE_TOLERANCE as LAYER_GATE
    from balprune.runtime.measure import relative_error as rel_error
    from balprune.runtime.model import load_model

    rt = load_model(_packed_lm(tmp_path, vocab=300, hidden=200, blocks=blocks), dtype="float16", paths="sparse",
                    measure=False)
    step = rt.step
    ref = step.reference()
    cands = step.candidates()
    persistent = [k for k in cands if "(persistent" in k]
    if blocks == 24:
        assert persistent, (list(cands), step.unavailable)
        assert 32 < step.persistent.max_blocks <= 64 and not step.persistent.xl_inline
    else:
        assert not persistent
        assert any("at most 64" in why for why in step.unavailable.values()), step.unavailable
    for key, fn in cands.items():
        err = rel_error(fn().clone(), ref)
        assert err <= LAYER_GATE["float16"], (key, err)


def test_persistent_follows_the_per_piece_path_token_after_token(tmp_path):
    from balprune.runtime.measure import relative_error as rel_error
    from balprune.runtime.model import load_model

    rt = load_model(_packed_lm(tmp_path, vocab=300, hidden=96), dtype="float16", paths="sparse", measure=False)
    cands = rt.step.timing_candidates()
    persistent = next(k for k in cands if "(persistent" in k)
    tokens = [5, 17, 250, 0, 299, 42]
    outs = {}
    for key in (persistent, "balanced (steps)"):
        rt.reset()
        seq = []
        for t in tokens:
            rt.token.fill_(t)
            cands[key]()
            seq.append(rt.logits.double().clone())
        outs[key] = torch.stack(seq)
    assert rel_error(outs[persistent], outs["balanced (steps)"]) <= 4e-3


def test_graph_replays_equal_eager_after_the_tags_wrap(tmp_path):
    from balprune.runtime.model import load_model

    rt = load_model(_packed_lm(tmp_path, vocab=300, hidden=96), dtype="float16", paths="sparse", measure=False)
    assert "persistent" in rt.choices[0].variants["balanced"]
    g = rt.capture()

    def three(run):
        rt.reset()
        for t in (3, 7, 11):
            rt.token.fill_(t)
            run()
        torch.cuda.synchronize()
        return rt.logits.clone()

    eager = three(rt.run)
    assert torch.equal(three(g.replay), eager)
    for _ in range(33000):  # past 2^15 launches: every tag value has been used
        g.replay()
    torch.cuda.synchronize()
    assert torch.equal(three(g.replay), eager)
    assert torch.equal(three(rt.run), eager)
