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
from ..llm.gpt2 import conv1d_weights
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
    sources = [SourceTensor(name, dtype_code(t.dtype, name=name), tuple(t.shape), t.numel() * t.element_size())
               for name, t in state_dict.items()]
    conv1d = conv1d_weights(sources, None)  # GPT-2 Conv1D [in, out]: balanced per output unit, as prune does
    transposed: set[str] = set()
    for src in sources:
        plan = plan_tensor(src, options, transposed=src.name in conv1d)
        if plan.pruned:
            check_finite(state_dict[src.name], src.name)
            targets[src.name] = (plan.pattern, [_step_sparsity(plan.pattern, f) for f in fractions])
            if plan.transposed:
                transposed.add(src.name)

    def matrix(name: str) -> torch.Tensor:
        w = state_dict[name].detach()
        return w.t() if name in transposed else w.reshape(w.shape[0], -1)

    generators = {name: nested_masks(matrix(name), pattern, sparsities)
                  for name, (pattern, sparsities) in targets.items()}
    masks: dict[str, torch.Tensor] = {}
    for i, fraction in enumerate(fractions):
        for name, gen in generators.items():
            w = state_dict[name]
            mask = next(gen)
            mask = mask.t() if name in transposed else mask.reshape(w.shape)
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
                  force: bool = False, hf=None, transposed: frozenset[str] | None = None) -> PruneReport:
    """Write the packed file of a (pruned, dense-with-zeros) state dict with ``options`` (and ``hf``,
    a formats.hf_record.HfFiles, recorded in it when given). ``transposed``: the tensors that were
    pruned as their transpose (GPT-2 Conv1D; None: recognised by name, as ``prune`` and
    ``iterative_prune`` do), so the file is planned on the axis the masks were made on.

    Pruning an already-pruned tensor with the same pattern keeps all its non-zeros, so the file
    holds exactly the weights the state dict holds.
    """
    sd = {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}
    return prune_checkpoint(_MemoryCheckpoint(sd), Path(output), options, force=force, hf=hf, transposed=transposed)
