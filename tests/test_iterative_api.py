"""The Python API of Algorithm 1: nested balanced masks through a hook that trains, then export."""

from __future__ import annotations

import torch
from torch import nn

from balprune.config import PruneOptions
from balprune.formats.packed_file import read_packed, verify_packed
from balprune.patterns.kinds import BalancedPattern
from balprune.prune.iterative import export_packed, iterative_prune
from balprune.prune.schedule import Schedule, ScheduleKind


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(96, 64), nn.ReLU(), nn.Linear(64, 10))


def test_hook_trains_between_steps_masks_stay_nested_balanced_and_zero(tmp_path):
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    options = PruneOptions(BalancedPattern(0.875, blocks=4), schedule=Schedule(ScheduleKind.CUBIC, 3))
    seen = []

    def fine_tune(step):
        # a few optimizer steps, re-applying the masks so pruned weights stay exactly zero
        params = dict(model.named_parameters())
        for _ in range(3):
            x = torch.randn(16, 96)
            loss = model(x).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            with torch.no_grad():
                for name, mask in step.masks.items():
                    params[name].mul_(mask)
        seen.append({k: v.clone() for k, v in step.masks.items()})

    sd = dict(model.named_parameters())
    masks = iterative_prune({k: v.data for k, v in sd.items()}, options, hook=fine_tune)
    assert len(seen) == 3 and set(masks) == {"0.weight", "2.weight"}
    for a, b in zip(seen, seen[1:]):
        for name in a:
            assert not bool((b[name] & ~a[name]).any())
    for name, mask in masks.items():
        w = sd[name].data
        assert bool((w[~mask] == 0).all())
        # exactly k per block at the final step: K=96 -> L=24, k=3; K=64 -> L=16, k=2
        L = w.shape[1] // 4
        k = {24: 3, 16: 2}[L]
        assert mask.reshape(w.shape[0], 4, L).sum(-1).eq(k).all()

    out = tmp_path / "model.balanced.safetensors"
    export_packed({k: v.data for k, v in sd.items()}, out, options)
    pf = verify_packed(out)
    for name in masks:
        assert torch.equal(pf.dense(name), sd[name].data)
    assert read_packed(out).manifest["tensors"]["0.bias"]["pattern"] == "dense"


def test_without_hook_equals_one_shot():
    a = {k: v.detach().clone() for k, v in _model().state_dict().items()}
    b = {k: v.clone() for k, v in a.items()}
    m_iter = iterative_prune(a, PruneOptions(BalancedPattern(0.9, blocks=8), schedule=Schedule(ScheduleKind.LINEAR, 4)))
    m_once = iterative_prune(b, PruneOptions(BalancedPattern(0.9, blocks=8)))
    for name in m_once:
        assert torch.equal(m_iter[name], m_once[name])
        assert torch.equal(a[name], b[name])


def _plan(dtype: str, shape: tuple[int, int], esize: int, sparsity: float):
    """A prune plan for a tensor of ``shape`` that exists only as a header (preflight reads no data)."""
    from balprune.checkpoint import SourceTensor
    from balprune.prune.plan import plan_tensor

    return plan_tensor(SourceTensor("w", dtype, shape, shape[0] * shape[1] * esize),
                       PruneOptions(BalancedPattern(sparsity)))


def test_preflight_refuses_a_tensor_larger_than_memory(tmp_path):
    import pytest

    from balprune.errors import InvalidInputError
    from balprune.prune.engine import preflight

    plan = _plan("F16", (200_000, 50_000), 2, 0.9)
    with pytest.raises(InvalidInputError, match="largest tensor"):
        preflight([plan], tmp_path / "o.safetensors", memory_available=8 << 30, disk_free=100 << 30)
    # Memory fits and the disk is stated: no error, whatever this machine's free space is.
    preflight([plan], tmp_path / "o.safetensors", memory_available=200 << 30, disk_free=100 << 30)


def test_preflight_refuses_an_output_larger_than_the_free_disk(tmp_path):
    import pytest

    from balprune.errors import OutputError
    from balprune.prune.engine import preflight

    plan = _plan("F32", (4096, 4096), 4, 0.5)
    with pytest.raises(OutputError, match="MiB free; the output needs"):
        preflight([plan], tmp_path / "o.safetensors", memory_available=64 << 30, disk_free=4 << 20)
    preflight([plan], tmp_path / "o.safetensors", memory_available=64 << 30, disk_free=1 << 30)
