"""Algorithm 1 (balance-aware iterative pruning) over an in-memory state dict, with a hook.

    masks = iterative_prune(model.state_dict(), options, hook=fine_tune)

At every step of ``options.schedule`` each targeted tensor is re-masked inside its previous mask
for that step's sparsity (balanced: exactly k_t per block at every step), the pruned weights are
zeroed in place, and ``hook(step)`` runs: the place to fine-tune before the next step. The hook
must keep pruned weights at zero (re-apply ``step.masks`` after optimizer steps); the masks stay
nested whatever it does. ``export_packed`` then writes the packed file from the dense-with-zeros
state dict, the one hand-off between pruning and packing.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from ..checkpoint import SourceTensor, TorchCheckpoint
from ..config import PruneOptions
from ..container import dtype_code
from ..patterns.kinds import Pattern
from ..patterns.ranking import check_finite
from .engine import PruneReport, prune_checkpoint
from .masks import nested_masks
from .plan import plan_tensor


@dataclass(frozen=True)
class Step:
    """One step of the schedule, handed to the hook after its masks were applied."""

    index: int  # 0-based
    count: int
    sparsity: float  # the default pattern's sparsity at this step
    masks: dict[str, torch.Tensor]  # name -> bool mask of the tensor's shape


def _step_sparsity(pattern: Pattern, fraction: float) -> float:
    return pattern.sparsity * fraction


def iterative_prune(state_dict: dict[str, torch.Tensor], options: PruneOptions,
                    hook: Callable[[Step], None] | None = None) -> dict[str, torch.Tensor]:
    """Prune ``state_dict`` in place along the schedule; returns the final masks by name.

    Targets are chosen exactly as ``balprune prune`` chooses them (plan_tensor). Each tensor's
    schedule is the default schedule scaled to its own target sparsity (per-layer rules may set
    different targets). Without a hook the result equals one-shot pruning.
    """
    targets: dict[str, tuple[Pattern, list[float]]] = {}
    base = options.pattern.sparsity
    fractions = [s / base if base else 1.0 for s in options.schedule.sparsities(base)]
    for name, t in state_dict.items():
        src = SourceTensor(name, dtype_code(t.dtype, name=name), tuple(t.shape), t.numel() * t.element_size())
        plan = plan_tensor(src, options)
        if plan.pruned:
            check_finite(t, name)
            targets[name] = (plan.pattern, [_step_sparsity(plan.pattern, f) for f in fractions])
    generators = {
        name: nested_masks(state_dict[name].detach().reshape(state_dict[name].shape[0], -1), pattern, sparsities)
        for name, (pattern, sparsities) in targets.items()
    }
    masks: dict[str, torch.Tensor] = {}
    for i, fraction in enumerate(fractions):
        for name, gen in generators.items():
            w = state_dict[name]
            mask = next(gen).reshape(w.shape)
            with torch.no_grad():
                w.masked_fill_(~mask, 0)
            masks[name] = mask
        if hook is not None:
            hook(Step(i, len(fractions), base * fraction, dict(masks)))
    return masks


class _MemoryCheckpoint(TorchCheckpoint):
    """A state dict held in memory, read like a checkpoint file."""

    def __init__(self, state_dict: dict[str, torch.Tensor]) -> None:
        super().__init__("<memory>", [], [state_dict])

    def sha256(self) -> str:
        h = hashlib.sha256()
        for t in self.tensors:
            h.update(t.name.encode())
            h.update(bytes(self.raw(t.name)))
        return h.hexdigest()


def export_packed(state_dict: dict[str, torch.Tensor], output: Path, options: PruneOptions, *,
                  force: bool = False, hf=None) -> PruneReport:
    """Write the packed file of a (pruned, dense-with-zeros) state dict with ``options`` (and ``hf``,
    a formats.hf_record.HfFiles, recorded in it when given).

    Pruning an already-pruned tensor with the same pattern keeps all its non-zeros, so the file
    holds exactly the weights the state dict holds.
    """
    sd = {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}
    return prune_checkpoint(_MemoryCheckpoint(sd), Path(output), options, force=force, hf=hf)
