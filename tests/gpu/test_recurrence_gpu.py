"""The LSTM recurrence stage on the GPU (runtime/model/recurrence.py, kernels/lstm_recurrence.cu):
every candidate (the per-step chains and each persistent launch shape) gives the float64
recurrence's output within the layer gate and the same output as the per-step balanced chain up
to rounding; the launch leaves its finished-CTA count at zero (so the next launch and graph replays
start clean); odd sizes (hidden not a multiple of the CTA count, one frame)."""

from __future__ import annotations

import pytest
import torch
from helpers import gpu_skip_reason

from balprune import examples
from balprune.cli import main
from balprune.runtime.measure import MODEL_TOLERANCE as TOLERANCE
from balprune.runtime.measure import relative_error
from balprune.save import save_state_dict

_why = gpu_skip_reason()
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(_why is not None, reason=_why or "")]


def _packed_bilstm(tmp_path, *, hidden: int, layers: int = 2, sparsity: float = 0.75, blocks: int = 8):
    torch.manual_seed(1)
    m = examples.BiLstmAcousticModel(features=39, hidden=hidden, layers=layers, labels=20)
    src = tmp_path / f"bilstm-{hidden}.safetensors"
    save_state_dict({k: v.detach().contiguous() for k, v in m.state_dict().items()}, src)
    out = tmp_path / f"bilstm-{hidden}.balanced.safetensors"
    assert main(["prune", str(src), "-s", str(sparsity), "--blocks", str(blocks), "-o", str(out)]) == 0
    return out


def _recurrences(rt):
    return [rec for _, rec in rt._layers]


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("hidden,frames", [(64, 12), (50, 7), (96, 1)])
def test_every_candidate_matches_the_float64_recurrence(tmp_path, dtype, hidden, frames):
    from balprune.runtime.measure import STAGE_TOLERANCE as LAYER_GATE
    from balprune.runtime.measure import relative_error as rel_error
    from balprune.runtime.model import load_model

    path = _packed_bilstm(tmp_path, hidden=hidden)
    rt = load_model(path, dtype=dtype, paths="sparse", frames=frames, measure=False)
    for rec in _recurrences(rt):
        ref = rec.reference()
        cands = rec.candidates()
        persistent = [k for k in cands if "(persistent" in k]
        assert persistent, list(cands)
        outs = {}
        for key, fn in cands.items():
            outs[key] = fn().clone()
            torch.cuda.synchronize()
            assert rel_error(outs[key], ref) <= LAYER_GATE[dtype], (key, rel_error(outs[key], ref))
            assert int(rec.persistent.ctl[0]) == 0, key  # finished-CTA count back at zero
        chain = next(k for k in cands if k.startswith("balanced (steps"))
        for key in persistent:
            # Same products and cell, another summation order: within a few roundings of h.
            assert rel_error(outs[key], outs[chain].double()) <= LAYER_GATE[dtype], key


def test_persistent_replays_equal_eager(tmp_path):
    """Graph replays of the persistent path equal an eager run bit for bit, many times over (each launch's
    tags differ from the last one's; a cooperative launch is captured)."""
    from balprune.runtime.model import load_model

    path = _packed_bilstm(tmp_path, hidden=64)
    rt = load_model(path, dtype="float16", paths="sparse", frames=9, measure=False)
    assert all("persistent" in r.choice.variants["balanced"] for r in _recurrences(rt))
    rt.run()
    torch.cuda.synchronize()
    eager = rt.out.clone()
    g = rt.capture()
    for _ in range(7400):  # 7400 launches x 9 steps: the 16-bit step tags wrap around
        g.replay()
    torch.cuda.synchronize()
    assert torch.equal(rt.out, eager)


def test_paper_sized_recurrence_is_persistent_and_correct(tmp_path):
    """Bi-LSTM 1024 at 87.5% (the paper's CTC model), fp16: the dispatcher's choice for every layer's
    recurrence is reported with its time per utterance, and the model is within tolerance."""
    from balprune.formats.packed_file import read_packed
    from balprune.models import detect, reference_module, reference_outputs, sample_inputs
    from balprune.runtime.model import load_model

    torch.manual_seed(0)
    sd = {k: v.detach().contiguous() for k, v in examples.EXAMPLES["ctc-bilstm"][1]().state_dict().items()}
    src = tmp_path / "ctc.safetensors"
    save_state_dict(sd, src)
    path = tmp_path / "ctc.balanced.safetensors"
    assert main(["prune", str(src), "-s", "0.875", "--blocks", "32", "-o", str(path)]) == 0
    pf = read_packed(path)
    arch = detect(pf)
    inputs = sample_inputs(arch, frames=30)
    ref = reference_outputs(reference_module(pf, arch, device="cuda"), arch, inputs)
    rt = load_model(path, dtype="float16", frames=30)
    assert relative_error(rt.forward(inputs), ref) <= TOLERANCE["float16"]
    for rec in _recurrences(rt):
        c = rec.choice
        assert c.path in c.times_us and "(steps" in c.variants.get("dense", "(steps")
        assert any("(persistent" in k for k in c.variants.values()) or "persistent" in str(c.unavailable)
