"""Algorithm 1 inside a user's own training loop: a pruner that follows the schedule and keeps zeros zero.

    pruner = Pruner(model, options, every=200, optimizer=opt)   # options: PruneOptions or a recipe
    for step, batch in enumerate(loader):
        pruner.step(step)            # at steps 0, 200, 400, ...: prune to the schedule's next sparsity
        loss = model(batch).loss
        opt.zero_grad(); loss.backward(); opt.step()   # masks re-applied right after (post-step hook)
    pruner.export("model.balanced.safetensors")

Targets, per-layer rules and sparsities are chosen exactly as ``balprune prune`` chooses them
(``plan_tensor``), from the parameter names with any ``module.`` (DistributedDataParallel,
DataParallel) or ``_orig_mod.`` (torch.compile) prefix removed. Masks come from
``balprune.prune.masks.next_mask``: each step's mask lies inside the previous one and, for the
balanced pattern, every block holds exactly k_t entries at every step.

How pruned weights stay exactly zero (three mechanisms, each for a reason):

1. At every schedule step the pruned weights are set to zero in place.
2. Gradient hooks zero the gradients of pruned weights, so gradient clipping, momentum and Adam's
   moments never see them (and DistributedDataParallel all-reduces the masked gradients).
3. After every ``optimizer.step()`` the masks are re-applied (``attach(optimizer)`` or the
   ``optimizer=`` argument install a post-step hook; without one, call ``pruner.apply()``
   yourself). This is what makes the zeros exact: a momentum buffer or Adam moment filled before
   a weight was pruned keeps moving it after its gradient is zero, and so would weight decay
   implementations that are not purely multiplicative.

With torch.distributed initialised, each mask is broadcast from rank 0, so every rank holds the
same masks even if floating-point differences made the rankings disagree.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..config import PruneOptions, load_config, prune_options_from_config
from ..container import PRUNABLE_CODES, dtype_code
from ..errors import ConfigError, InvalidInputError, UsageError
from ..patterns.ranking import check_finite
from ..prune.masks import next_mask

#: Prefixes wrappers add to parameter names; removed before matching rules and in the export.
WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def clean_name(name: str) -> str:
    """``module.fc.weight`` (DDP) or ``_orig_mod.fc.weight`` (torch.compile) -> ``fc.weight``."""
    changed = True
    while changed:
        changed = False
        for prefix in WRAPPER_PREFIXES:
            if name.startswith(prefix):
                name, changed = name[len(prefix):], True
    return name


def clean_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict under clean names (see ``clean_name``), tensors detached."""
    return {clean_name(k): v.detach() for k, v in model.state_dict().items()}


@dataclass
class _Target:
    name: str  # clean name
    tensor: torch.Tensor  # the parameter or buffer, pruned in place
    pattern: object
    sparsities: list[float]  # one per schedule step
    mask: torch.Tensor | None = None  # bool [R, K] of the matrix pruned (matrix_of), on the CPU (nested chain state)
    pruned: torch.Tensor | None = None  # bool, the tensor's shape, on its device: True where pruned
    #: stored [in, out] (transformers' Conv1D, GPT-2): pruned as its [out, in] transpose, as ``prune`` does
    transposed: bool = False

    def matrix_of(self, w: torch.Tensor) -> torch.Tensor:
        """The [out, in] matrix whose rows the pattern balances (a view of ``w``)."""
        return w.t() if self.transposed else w.reshape(w.shape[0], -1)

    def tensor_mask(self, mask: torch.Tensor) -> torch.Tensor:
        """A mask of ``matrix_of``'s shape as a mask of the tensor's."""
        return mask.t() if self.transposed else mask.reshape(self.tensor.shape)


def conv1d_parameters(model: nn.Module) -> set[int]:
    """ids of the weights of transformers' Conv1D modules (GPT-2 & co.: ``nf`` outputs, weight [in, nf])."""
    return {id(m.weight) for m in model.modules()
            if type(m).__name__ == "Conv1D" and hasattr(m, "nf") and isinstance(getattr(m, "weight", None), torch.Tensor)
            and m.weight.dim() == 2 and m.weight.shape[1] == m.nf}


class Pruner:
    """Balance-aware iterative pruning for a model trained by the caller (module docstring).

    ``options`` is a PruneOptions, or a path to a TOML recipe read like ``balprune prune --config``
    (its [prune], [schedule] and [[layers]] tables; other tables of a fine-tuning recipe are
    ignored here). Schedule step i (0-based) is applied by the first ``step(g)`` call with
    g >= ``at[i]``; by default ``at = (start, start + every, ...)``, one entry per schedule step.
    """

    def __init__(self, model: nn.Module, options: PruneOptions | str | Path, *, every: int = 1, start: int = 0,
                 at: Sequence[int] | None = None, optimizer: torch.optim.Optimizer | None = None,
                 mask_gradients: bool = True) -> None:
        if not isinstance(options, PruneOptions):
            options = options_from_recipe(options)
        for p in [options.pattern] + [r.pattern for r in options.rules if r.pattern is not None]:
            if p.ranks_globally:
                raise ConfigError("fine-tuning supports unstructured scope 'tensor' only (a global ranking would "
                                  "move weights between layers at every step); set scope = \"tensor\"")
        self.model = model
        self.options = options
        base = options.pattern.sparsity
        self.fractions = [s / base if base else 1.0 for s in options.schedule.sparsities(base)]
        n = len(self.fractions)
        if at is None:
            if isinstance(every, bool) or not isinstance(every, int) or every < 1:
                raise UsageError(f"every: expected an integer >= 1, got {every!r}")
            if isinstance(start, bool) or not isinstance(start, int) or start < 0:
                raise UsageError(f"start: expected an integer >= 0, got {start!r}")
            at = [start + i * every for i in range(n)]
        at = tuple(at)
        if len(at) != n:
            raise UsageError(f"at: the schedule has {n} step(s), got {len(at)} step number(s)")
        if any(isinstance(a, bool) or not isinstance(a, int) or a < 0 for a in at) or list(at) != sorted(at):
            raise UsageError(f"at: expected non-decreasing integers >= 0, got {list(at)}")
        self.at = at
        self.applied = 0
        self._targets = self._plan(model, options)
        self._handles: list = []
        if mask_gradients:
            for t in self._targets.values():
                if isinstance(t.tensor, nn.Parameter) and t.tensor.requires_grad:
                    self._handles.append(t.tensor.register_hook(self._grad_hook(t)))
        if optimizer is not None:
            self.attach(optimizer)

    # ------------------------------------------------------------------ planning

    @staticmethod
    def _plan(model: nn.Module, options: PruneOptions) -> dict[str, _Target]:
        from ..checkpoint import SourceTensor
        from ..prune.plan import plan_tensor

        base = options.pattern.sparsity
        fractions = [s / base if base else 1.0 for s in options.schedule.sparsities(base)]
        targets: dict[str, _Target] = {}
        seen: set[int] = set()
        conv1d = conv1d_parameters(model)
        for raw, t in [*model.named_parameters(), *model.named_buffers()]:
            name = clean_name(raw)
            if id(t) in seen or not t.is_floating_point() or name in targets:
                continue
            seen.add(id(t))
            code = dtype_code(t.dtype, name=name)
            if code not in PRUNABLE_CODES:
                continue
            plan = plan_tensor(SourceTensor(name, code, tuple(t.shape), t.numel() * t.element_size()), options,
                               transposed=id(t) in conv1d)
            if plan.pruned:
                targets[name] = _Target(name, t, plan.pattern, [plan.pattern.sparsity * f for f in fractions],
                                        transposed=plan.transposed)
        return targets

    @staticmethod
    def _grad_hook(t: _Target):
        def hook(grad: torch.Tensor) -> torch.Tensor:
            return grad if t.pruned is None else grad.masked_fill(t.pruned, 0)

        return hook

    # ------------------------------------------------------------------ the schedule

    @property
    def steps(self) -> int:
        """Number of schedule steps."""
        return len(self.fractions)

    @property
    def done(self) -> bool:
        """True once the last schedule step (the target sparsity) has been applied."""
        return self.applied == len(self.fractions)

    @property
    def sparsity(self) -> float:
        """The default pattern's sparsity at the last applied step (0 before the first)."""
        return 0.0 if self.applied == 0 else self.options.pattern.sparsity * self.fractions[self.applied - 1]

    @property
    def names(self) -> list[str]:
        """Clean names of the pruned tensors."""
        return list(self._targets)

    def targets(self) -> dict[str, tuple[torch.Tensor, object]]:
        """Clean name -> (the live tensor, its final pattern) for every pruned tensor."""
        return {n: (t.tensor, t.pattern) for n, t in self._targets.items()}

    @property
    def masks(self) -> dict[str, torch.Tensor]:
        """Clean name -> bool mask (the tensor's shape, CPU) of the last applied step."""
        return {n: t.tensor_mask(t.mask) for n, t in self._targets.items() if t.mask is not None}

    def step(self, global_step: int) -> int:
        """Apply every schedule step due at ``global_step``; returns how many were applied (often 0)."""
        n = 0
        while self.applied < len(self.fractions) and global_step >= self.at[self.applied]:
            self.advance()
            n += 1
        return n

    def advance(self) -> float:
        """Apply the next schedule step now (nested re-masking, pruned weights zeroed); returns its sparsity."""
        if self.done:
            raise UsageError(f"the schedule's {len(self.fractions)} step(s) are all applied")
        i = self.applied
        for t in self._targets.values():
            w = t.tensor.detach()
            # during training a NaN is a diverged run, not a tensor to exclude (the default hint names --exclude,
            # which neither finetune nor a training loop has)
            check_finite(w, t.name, hint="if training diverged: lower lr / finetune_lr or set grad_clip "
                                         "(a recipe's [train]); else the weights were not finite to begin with")
            matrix = t.matrix_of(w).cpu()
            mask = next_mask(matrix, t.pattern, t.sparsities[i], t.mask)
            self._set_mask(t, _broadcast(mask, w.device))
        self.applied = i + 1
        self.apply()
        return self.sparsity

    def _set_mask(self, t: _Target, mask: torch.Tensor) -> None:
        t.mask = mask.cpu()
        t.pruned = t.tensor_mask(~mask).to(t.tensor.device)

    def apply(self) -> None:
        """Set every pruned weight to exactly zero (after an optimizer step, a load, an averaging...)."""
        with torch.no_grad():
            for t in self._targets.values():
                if t.pruned is not None:
                    t.tensor.masked_fill_(t.pruned, 0)

    def attach(self, optimizer: torch.optim.Optimizer) -> None:
        """Re-apply the masks after every ``optimizer.step()`` (a post-step hook)."""
        self._handles.append(optimizer.register_step_post_hook(lambda opt, args, kwargs: self.apply()))

    def remove_hooks(self) -> None:
        """Remove the gradient and optimizer hooks (the masks stay applied)."""
        for h in self._handles:
            h.remove()
        self._handles.clear()

    # ------------------------------------------------------------------ checkpoints and export

    def state_dict(self) -> dict:
        """The schedule position and masks: save it with the model and optimizer to resume exactly."""
        return {"applied": self.applied, "masks": {n: t.mask.clone() for n, t in self._targets.items()
                                                   if t.mask is not None}}

    def load_state_dict(self, state: dict) -> None:
        """Restore ``state_dict()``'s position and masks (the model's weights are loaded separately)."""
        applied = state.get("applied")
        masks = state.get("masks")
        if not isinstance(applied, int) or not 0 <= applied <= len(self.fractions) or not isinstance(masks, dict):
            raise InvalidInputError("pruner state: expected {'applied': 0..steps, 'masks': {name: mask}}")
        expected = set(self._targets) if applied else set()
        if set(masks) != expected:
            raise InvalidInputError(f"pruner state: masks for {sorted(masks)[:3]}..., this model prunes "
                                    f"{sorted(expected)[:3]}... (a different model or recipe?)")
        for name, mask in masks.items():
            t = self._targets[name]
            if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or \
                    tuple(mask.shape) != tuple(t.matrix_of(t.tensor.detach()).shape):
                raise InvalidInputError(f"pruner state: mask of {name!r} does not fit the tensor")
            self._set_mask(t, mask)
        if not applied:
            for t in self._targets.values():
                t.mask, t.pruned = None, None
        self.applied = applied
        self.apply()

    def export(self, path: str | Path, *, force: bool = False, hf=None):
        """Write the packed file of the pruned model (balprune.prune.iterative.export_packed), with
        ``hf`` (formats.hf_record.HfFiles, a task's HF record) in it when given.

        Only after the last schedule step: the file holds the target sparsity, and an earlier
        export would re-prune the model in one shot. Returns the PruneReport.
        """
        from ..prune.iterative import export_packed

        if not self.done:
            raise UsageError(f"export: {self.applied} of {len(self.fractions)} schedule steps applied; "
                             "export after the last one")
        self.apply()
        return export_packed(clean_state_dict(self.model), Path(path), self.options, force=force, hf=hf,
                             transposed=frozenset(n for n, t in self._targets.items() if t.transposed))


def options_from_recipe(path: str | Path) -> PruneOptions:
    """PruneOptions from a recipe's [prune], [schedule] and [[layers]] tables (other tables ignored)."""
    from ..config import read_toml

    path = Path(path)
    data = read_toml(path)  # regular files only, bounded size and nesting (ConfigError, exit 4)
    if not set(data) - {"prune", "schedule", "layers"}:
        data = load_config(path)  # a prune config: strict keys, as `balprune prune --config`
    else:
        from .recipe import load_recipe

        data = load_recipe(path).prune_config
    return prune_options_from_config(data)


def _broadcast(mask: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Rank 0's mask on every rank when torch.distributed is initialised; the mask itself otherwise."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return mask
    buf = mask.to(device=device, dtype=torch.uint8)
    if dist.get_backend() == "nccl" and buf.device.type != "cuda":
        buf = buf.cuda()
    dist.broadcast(buf, src=0)
    return buf.bool().cpu()
