"""Deciding, from names, dtypes and shapes alone, what happens to every tensor of a checkpoint.

A plan is complete before any tensor data is read: each tensor's action (pruned or passed
through, and why), its manifest entry, and the exact dtype and shape of every output tensor. So
bad options fail before minutes of work, and the output file's header can be written first.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from ..checkpoint import SourceTensor
from ..config import PruneOptions, glob_matcher
from ..container import PRUNABLE_CODES, PlannedTensor
from ..errors import InvalidInputError
from ..formats import balanced_entry, bsr_entry, csr_entry
from ..formats.layouts import choose_encoding
from ..formats.spec import describe_entry, part_name
from ..patterns.balanced import geometry_for
from ..patterns.block import tile_grid
from ..patterns.kinds import BalancedPattern, BlockPattern, Pattern, UnstructuredPattern, VectorPattern, keep_count
from ..patterns.registry import ENCODINGS, pattern_spec


@dataclass(frozen=True)
class TensorPlan:
    """What happens to one source tensor. ``pattern`` is None when it passes through."""

    source: SourceTensor
    pattern: Pattern | None
    reason: str
    entry: dict
    outputs: tuple[PlannedTensor, ...]
    keep: int | None = None  # unstructured nnz / block (vector) tile count; None for balanced and dense
    #: the sparsity the options ask of this tensor: its pattern's (default or its rule's), also when
    #: its geometry cannot prune it (row too short); None when it is not a target at all
    requested: float | None = None
    #: pruned as the transpose of the source tensor (a GPT-2 Conv1D weight [in, out]): ``entry`` and
    #: ``outputs`` describe the [out, in] matrix; the packer is given ``weight.t()``
    transposed: bool = False

    @property
    def pruned(self) -> bool:
        return self.pattern is not None

    @property
    def achieved(self) -> float | None:
        """The sparsity the packed tensor will have (0 for a target that passes through); None: not a target."""
        if self.requested is None:
            return None
        return float(self.entry["sparsity_achieved"]) if self.pruned else 0.0

    @property
    def packed_bytes(self) -> int:
        return sum(t.nbytes for t in self.outputs)


def _matrix_shape(shape: tuple[int, ...]) -> tuple[int, int]:
    return shape[0], math.prod(shape[1:])


def _dense(src: SourceTensor, reason: str, requested: float | None = None) -> TensorPlan:
    entry = {"pattern": "dense", "shape": list(src.shape), "dtype": src.dtype, "reason": reason}
    return TensorPlan(src, None, reason, entry, (PlannedTensor(src.name, src.dtype, src.shape),),
                      requested=requested)


def _target(src: SourceTensor, options: PruneOptions) -> tuple[Pattern | None, str, bool]:
    """(pattern or None, reason, explicitly chosen) from rules, include/exclude and defaults."""
    for rule in options.rules:
        if rule.matches(src.name):
            if rule.skip:
                return None, f"skipped by rule {rule.match!r}", True
            return rule.pattern, f"rule {rule.match!r}", True
    if options.include and not any(glob_matcher(g)(src.name) for g in options.include):
        return None, "not matched by --include", False
    if any(glob_matcher(g)(src.name) for g in options.exclude):
        return None, "excluded by --exclude", False
    return options.pattern, "default", bool(options.include)


#: What the reason column adds for a GPT-2 Conv1D weight (llm.gpt2.conv1d_weights recognises them).
CONV1D_REASON = "GPT-2 Conv1D [in, out]: each output unit's inputs balanced, stored as its [out, in] transpose"


def plan_tensor(src: SourceTensor, options: PruneOptions, keep_override: int | None = None, *,
                transposed: bool = False) -> TensorPlan:
    """The plan of one tensor (see module doc). InvalidInputError for impossible requests.

    ``transposed``: ``src`` is a 2-D weight stored [in, out] (GPT-2's Conv1D), whose rows are not its
    output units: it is planned as its transpose [out, in], so every output unit keeps the same count
    per block of its inputs, and ``transposed`` is set on the plan. When that view prunes nothing, the
    tensor passes through as it is stored.
    """
    if not transposed:
        return _plan_tensor(src, options, keep_override)
    if len(src.shape) != 2:
        raise ValueError(f"only a 2-D tensor can be planned transposed, not {src.name!r} {list(src.shape)}")
    plan = _plan_tensor(replace(src, shape=src.shape[::-1]), options, keep_override)
    if plan.pruned:
        return replace(plan, source=src, transposed=True, reason=f"{plan.reason}; {CONV1D_REASON}")
    reason = plan.reason if plan.requested is None else f"{plan.reason} (GPT-2 Conv1D, viewed as its [out, in] transpose)"
    return _dense(src, reason, requested=plan.requested)


def _plan_tensor(src: SourceTensor, options: PruneOptions, keep_override: int | None = None) -> TensorPlan:
    pattern, why, explicit = _target(src, options)
    if pattern is None:
        return _dense(src, why)
    if src.dtype not in PRUNABLE_CODES:
        if options.strict and len(src.shape) >= 2:
            raise InvalidInputError(f"tensor {src.name!r}: dtype {src.dtype} cannot be pruned (--strict)",
                                    hint="exclude it, or drop --strict to pass it through")
        return _dense(src, f"dtype {src.dtype} is not pruned")
    if len(src.shape) < 2:
        return _dense(src, f"{len(src.shape)}-D tensor")
    if len(src.shape) not in (2, 4) and not explicit:
        return _dense(src, f"{len(src.shape)}-D tensor is not a default target (select it with --include)")
    if src.numel == 0:
        return _dense(src, "empty tensor")
    if pattern.sparsity == 0:
        return _dense(src, "sparsity 0")
    rows, cols = _matrix_shape(src.shape)
    planned = pattern_spec(pattern).plan(src, rows, cols, pattern, keep_override, index=options.index)
    if isinstance(planned, str):  # its geometry prunes nothing: passed through, still a target
        return _dense(src, planned, requested=pattern.sparsity)
    entry, keep = planned
    specs = ENCODINGS[entry["pattern"]].packed_class.get().part_specs(entry, src.name)
    outputs = tuple(PlannedTensor(part_name(src.name, part), ps.dtype, ps.shape) for part, ps in specs.items())
    reason = f"{pattern.kind.value} {describe_entry(entry)}" + ("" if why == "default" else f" ({why})")
    if "index_encoding" in entry:  # say why this index encoding (layouts.choose_encoding's figures)
        reason += f"; {index_reason(options.index, entry)}"
    return TensorPlan(src, pattern, reason, entry, outputs, keep, requested=pattern.sparsity)


# --------------------------------------------------------------------------- planners
# One per pattern, named by patterns.registry (PatternSpec.plan): (src, rows, cols, pattern,
# keep_override, index=) -> (manifest entry, keep count or None), or the reason the tensor passes
# through dense; InvalidInputError for a request no geometry can meet. ``index`` (--index) is used
# by the balanced planner only: the other patterns have one position encoding.

Planned = tuple[dict, int | None] | str


def plan_balanced(src: SourceTensor, rows: int, cols: int, pattern: BalancedPattern,
                  keep_override: int | None = None, index: str = "auto") -> Planned:
    """Balanced: one block geometry for every row (keep is None: k lives in the entry), its
    positions stored in the index encoding ``index`` picks (layouts.choose_encoding)."""
    try:
        g = geometry_for(rows, cols, pattern)
    except ValueError as exc:
        raise InvalidInputError(f"tensor {src.name!r} (K={cols}): {exc}", hint="use more --blocks") from None
    if not g.prunes_anything:
        return (f"row too short: K={cols} gives block length {g.block_length}, "
                f"keeping {g.keep} of {g.block_length} prunes nothing")
    encoding, _ = choose_encoding(index, g.rows, g.blocks, g.block_length, g.keep)
    return balanced_entry(src.shape, src.dtype, g, pattern.sparsity, encoding), None


def index_reason(index: str, entry: dict) -> str:
    """Why a balanced entry stores its positions the way it does, with the figures."""
    return choose_encoding(index, entry["rows"], entry["blocks"], entry["block_length"], entry["keep"])[1]


def plan_unstructured(src: SourceTensor, rows: int, cols: int, pattern: UnstructuredPattern,
                      keep_override: int | None = None, index: str = "auto") -> Planned:
    """Unstructured: keep is the tensor's nnz (``keep_override``: its share of a global ranking)."""
    keep = keep_override if keep_override is not None else keep_count(pattern.sparsity, rows * cols)
    return csr_entry(src.shape, src.dtype, keep, pattern.sparsity), keep


def plan_tiles(src: SourceTensor, rows: int, cols: int, pattern: BlockPattern | VectorPattern,
               keep_override: int | None = None, index: str = "auto") -> Planned:
    """Block and vector (1 x V tiles): keep is the kept tile count; packed as BSR."""
    bh, bw = pattern.block_shape
    if bh > rows or bw > cols:  # padded to whole tiles it would be larger than dense and prune nothing
        return f"tile {bh}x{bw} is larger than the [{rows}, {cols}] matrix"
    rb, cb = tile_grid(rows, cols, pattern.block_shape)
    keep = keep_count(pattern.sparsity, rb * cb)
    if keep >= rb * cb:
        return f"{rb * cb} tile(s) of {bh}x{bw}: keeping {keep} prunes nothing"
    return bsr_entry(src.shape, src.dtype, pattern.block_shape, keep, pattern.sparsity), keep


#: Most "glob matches no tensor" warnings one run prints before it counts the rest.
MAX_GLOB_WARNINGS = 20


def unmatched_globs(names: list[str], options: PruneOptions) -> list[str]:
    """One warning per include / exclude glob and [[layers]] rule that matches no tensor name, the first
    MAX_GLOB_WARNINGS of them and then one line counting the rest (a config of 10^6 rules printed 10^6 lines).

    Such a glob does nothing, which is almost always a typo (``fc*.weight`` for ``fc1.w``); the
    run goes on (exit 0) and says so.
    """
    out = []
    for what, globs in (("include", options.include), ("exclude", options.exclude),
                        ("[[layers]] rule", tuple(r.match for r in options.rules))):
        for g in dict.fromkeys(globs):
            match = glob_matcher(g)
            if not any(match(n) for n in names):
                out.append(f"{what} glob {g!r} matches no tensor")
    if len(out) > MAX_GLOB_WARNINGS:
        out[MAX_GLOB_WARNINGS:] = [f"... and {len(out) - MAX_GLOB_WARNINGS} more globs that match no tensor"]
    return out
