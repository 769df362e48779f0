"""The fine-tuning API (balprune.finetune.Pruner): schedule, nested balanced masks, exact zeros, DDP, export."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from balprune.config import PruneOptions
from balprune.errors import ConfigError, InvalidInputError, UsageError
from balprune.finetune import Pruner, clean_name
from balprune.formats.packed_file import verify_packed
from balprune.patterns.balanced import geometry_for
from balprune.patterns.kinds import (
    BalancedPattern,
    BlockPattern,
    UnstructuredPattern,
    UnstructuredScope,
    VectorPattern,
    keep_count,
)
from balprune.prune.schedule import Schedule, ScheduleKind


def _model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(96, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))


def _train_step(model, opt, g):
    x = torch.randn(16, 96, generator=g)
    y = torch.randint(0, 10, (16,), generator=g)
    loss = nn.functional.cross_entropy(model(x), y)
    opt.zero_grad()
    loss.backward()
    opt.step()


def _check_balanced_exact(weight, mask, sparsity, blocks):
    rows, cols = weight.shape
    g = geometry_for(rows, cols, BalancedPattern(sparsity, blocks=blocks))
    padded = torch.zeros(rows, g.padded_width, dtype=torch.bool)
    padded[:, :cols] = mask
    per_block = padded.reshape(rows, g.blocks, g.block_length).sum(-1)
    assert bool(per_block.eq(g.keep).all()), f"exactly k={g.keep} per block at sparsity {sparsity}"


@pytest.mark.parametrize("optimizer", ["sgd-momentum-wd", "adam"])
def test_masks_nested_balanced_and_zeros_exact_through_training(optimizer):
    model = _model()
    if optimizer == "adam":
        opt = torch.optim.Adam(model.parameters(), lr=1e-2, weight_decay=1e-3)
    else:
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
    options = PruneOptions(BalancedPattern(0.875, blocks=4), schedule=Schedule(ScheduleKind.CUBIC, 4))
    pruner = Pruner(model, options, every=5, optimizer=opt)
    assert pruner.at == (0, 5, 10, 15)
    g = torch.Generator().manual_seed(1)
    history = []
    for step in range(25):
        applied = pruner.step(step)
        if applied:
            history.append((pruner.sparsity, {k: v.clone() for k, v in pruner.masks.items()}))
        _train_step(model, opt, g)
        params = dict(model.named_parameters())
        for name, mask in pruner.masks.items():
            assert bool((params[name].detach()[~mask] == 0).all()), f"step {step}: pruned weights of {name} moved"
            assert bool((params[name].detach()[mask] != 0).all()), "kept weights keep training"
    assert pruner.done and len(history) == 4 and set(pruner.names) == {"0.weight", "2.weight", "4.weight"}
    for (_, prev), (_, cur) in zip(history, history[1:]):
        for name in prev:
            assert not bool((cur[name] & ~prev[name]).any()), "masks are nested"
    for s, masks in history:
        for name, mask in masks.items():
            blocks_of = {"0.weight": 4, "2.weight": 4, "4.weight": 4}
            _check_balanced_exact(dict(model.named_parameters())[name], mask, s, blocks_of[name])


def test_momentum_would_resurrect_pruned_weights_without_the_post_step_hook():
    # Why the pruner re-applies masks after optimizer.step(): momentum built up before pruning moves
    # a pruned weight even though its gradient is masked to zero.
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        _train_step(model, opt, g)
    pruner = Pruner(model, PruneOptions(UnstructuredPattern(0.5)))  # no optimizer attached
    pruner.step(0)
    mask = pruner.masks["2.weight"]
    _train_step(model, opt, g)
    w = dict(model.named_parameters())["2.weight"].detach()
    assert bool((w[~mask] != 0).any()), "momentum moved pruned weights"
    pruner.apply()
    assert bool((w[~mask] == 0).all())
    # gradients of pruned weights are masked by the tensor hooks
    model(torch.randn(4, 96)).sum().backward()
    grad = dict(model.named_parameters())["2.weight"].grad
    assert bool((grad[~mask] == 0).all()) and bool((grad[mask] != 0).any())


def test_step_applies_due_schedule_steps_and_catches_up():
    model = _model()
    pruner = Pruner(model, PruneOptions(UnstructuredPattern(0.8), schedule=Schedule(ScheduleKind.LINEAR, 4)),
                    at=[10, 20, 30, 40])
    assert pruner.step(9) == 0 and pruner.sparsity == 0.0 and pruner.masks == {}
    assert pruner.step(10) == 1 and pruner.sparsity == pytest.approx(0.2)
    assert pruner.step(10) == 0
    assert pruner.step(35) == 2 and pruner.sparsity == pytest.approx(0.6)
    w = dict(model.named_parameters())["2.weight"]
    assert int((w == 0).sum()) == w.numel() - keep_count(0.6, w.numel())
    assert pruner.step(1000) == 1 and pruner.done and pruner.sparsity == 0.8
    with pytest.raises(UsageError):
        pruner.advance()


@pytest.mark.parametrize("kwargs", [{"at": [0, 1]}, {"at": [5, 3, 9]}, {"every": 0}, {"start": -1}, {"at": [0, 1.5, 2]}])
def test_bad_schedule_positions_are_usage_errors(kwargs):
    with pytest.raises(UsageError):
        Pruner(_model(), PruneOptions(BalancedPattern(0.5, blocks=4), schedule=Schedule(ScheduleKind.CUBIC, 3)),
               **kwargs)


def test_global_unstructured_scope_is_refused():
    with pytest.raises(ConfigError, match="scope"):
        Pruner(_model(), PruneOptions(UnstructuredPattern(0.5, UnstructuredScope.GLOBAL)))


@pytest.mark.parametrize("pattern", [BalancedPattern(0.9, blocks=8), UnstructuredPattern(0.9), BlockPattern(0.9, (8, 8)),
                                     VectorPattern(0.9, 8)], ids=lambda p: p.kind.value)
def test_state_dict_round_trip_continues_exactly(pattern):
    options = PruneOptions(pattern, schedule=Schedule(ScheduleKind.CUBIC, 3))

    def run(split: bool):
        model = _model()
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        pruner = Pruner(model, options, every=4, optimizer=opt)
        g = torch.Generator().manual_seed(5)
        for step in range(12):
            if split and step == 6:  # "restart": a new model, optimizer and pruner from saved state
                saved = (model.state_dict(), opt.state_dict(), pruner.state_dict(), g.get_state())
                model = _model(seed=99)
                opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
                pruner = Pruner(model, options, every=4, optimizer=opt)
                model.load_state_dict(saved[0])
                opt.load_state_dict(saved[1])
                pruner.load_state_dict(saved[2])
                g.set_state(saved[3])
            pruner.step(step)
            _train_step(model, opt, g)
        return model, pruner

    (m1, p1), (m2, p2) = run(False), run(True)
    for (n1, t1), (n2, t2) in zip(m1.state_dict().items(), m2.state_dict().items()):
        assert n1 == n2 and torch.equal(t1, t2)
    for name in p1.masks:
        assert torch.equal(p1.masks[name], p2.masks[name])


def test_load_state_dict_refuses_a_foreign_state():
    pruner = Pruner(_model(), PruneOptions(BalancedPattern(0.5, blocks=4)))
    with pytest.raises(InvalidInputError):
        pruner.load_state_dict({"applied": 1, "masks": {"other.weight": torch.ones(2, 2, dtype=torch.bool)}})
    with pytest.raises(InvalidInputError):
        pruner.load_state_dict({"applied": 1, "masks": {n: torch.ones(3, 3, dtype=torch.bool)
                                                        for n in ("0.weight", "2.weight", "4.weight")}})


def test_export_only_after_the_last_step_and_holds_the_model_weights(tmp_path):
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    pruner = Pruner(model, PruneOptions(VectorPattern(0.75, 4), schedule=Schedule(ScheduleKind.LINEAR, 2)),
                    every=3, optimizer=opt)
    g = torch.Generator().manual_seed(2)
    pruner.step(0)
    with pytest.raises(UsageError, match="1 of 2"):
        pruner.export(tmp_path / "early.safetensors")
    assert not (tmp_path / "early.safetensors").exists()
    for step in range(1, 6):
        pruner.step(step)
        _train_step(model, opt, g)
    out = tmp_path / "model.vector.safetensors"
    pruner.export(out)
    pf = verify_packed(out)
    for name, t in model.state_dict().items():
        assert torch.equal(pf.dense(name), t), name
    entry = pf.manifest["tensors"]["2.weight"]
    assert entry["pattern"] == "block" and entry["block_shape"] == [1, 4]


def test_clean_name_strips_wrapper_prefixes():
    assert clean_name("module.fc.weight") == "fc.weight"
    assert clean_name("_orig_mod.module.fc.weight") == "fc.weight"
    assert clean_name("modules.x") == "modules.x"


def test_distributed_data_parallel_one_process_gloo(tmp_path):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        model = DDP(_model())
        assert next(iter(dict(model.named_parameters()))).startswith("module.")
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        options = PruneOptions(BalancedPattern(0.75, blocks=4), exclude=("4.*",),
                               schedule=Schedule(ScheduleKind.CUBIC, 2))
        pruner = Pruner(model, options, every=3, optimizer=opt)
        assert set(pruner.names) == {"0.weight", "2.weight"}  # rules see clean names (4.* excluded)
        g = torch.Generator().manual_seed(0)
        for step in range(8):
            pruner.step(step)
            _train_step(model, opt, g)
            for name, mask in pruner.masks.items():
                p = dict(model.named_parameters())["module." + name]
                assert bool((p.detach()[~mask] == 0).all())
                assert bool((p.grad[~mask] == 0).all()), "DDP all-reduced the masked gradients"
        out = tmp_path / "ddp.balanced.safetensors"
        pruner.export(out)
        pf = verify_packed(out)
        assert "0.weight" in pf.names() and not any(n.startswith("module.") for n in pf.names())
        assert torch.equal(pf.dense("2.weight"), model.module[2].weight.detach())
    finally:
        dist.destroy_process_group()


def test_pruner_from_a_recipe_matches_the_prune_cli_options(tmp_path):
    from helpers import REPO

    from balprune.cli.app import _prune_options

    cfg = REPO / "configs" / "lstm-lm-balanced.toml"
    expected = _prune_options(cfg, None, None, None, None, None, None, None, [], [], None, None, False)
    from balprune.examples import LstmLanguageModel

    model = LstmLanguageModel(vocab=50, hidden=64)
    pruner = Pruner(model, cfg)
    assert pruner.options == expected
    assert "embedding.weight" not in pruner.names and "lstm.weight_hh_l1" in pruner.names
    recipe = Pruner(nn.Sequential(), REPO / "configs" / "digits-balanced.toml")  # a fine-tuning recipe works too
    assert recipe.options.pattern == BalancedPattern(0.875, blocks=None, block_size=16)


def test_a_diverged_weight_at_a_schedule_step_says_training_diverged_not_exclude():
    """A NaN weight when the next schedule step masks is what a diverged run leaves: exit 4 naming the tensor
    with a training hint (it said "fix or exclude the tensor (--exclude)", an option finetune does not have)."""
    model = _model()
    pruner = Pruner(model, PruneOptions(UnstructuredPattern(0.5), schedule=Schedule(ScheduleKind.LINEAR, 2)), at=[1, 2])
    with torch.no_grad():
        model[2].weight[3, 4] = float("nan")
    with pytest.raises(InvalidInputError) as e:
        pruner.advance()
    line = e.value.one_line()
    assert "'2.weight'" in line and "NaN/Inf" in line and "training diverged" in line and "--exclude" not in line, line
