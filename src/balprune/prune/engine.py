"""One pruning run over a checkpoint: plan, prune tensor by tensor, stream the packed file.

Peak memory is about the largest pruned tensor times a small constant: tensors are read, pruned,
packed and written one at a time into a file whose layout was fixed by the plan.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .. import __version__, safeio
from ..checkpoint import Checkpoint
from ..config import PruneOptions
from ..container import AtomicOutput, StreamingWriter, check_not_an_input, verify_written
from ..errors import InvalidInputError, OutputError
from ..formats import BalancedTensor, BsrTensor, CsrTensor, hf_record, spec
from ..llm.family import check_recorded
from ..llm.gpt2 import conv1d_weights, recognition_type
from ..models.bnfold import fold_batch_norms
from ..patterns.balanced import balanced_offsets, geometry_for
from ..patterns.ranking import check_finite
from ..patterns.registry import ENCODINGS
from ..patterns.unstructured import global_keep_counts
from .masks import one_shot_mask
from .plan import TensorPlan, plan_tensor, unmatched_globs

#: progress(done_bytes, total_bytes, tensor_name): called after each tensor.
Progress = Callable[[int, int, str], None]

#: Targets pruned before the streaming loop by another criterion than magnitude (llm.calibrate through
#: prune.criteria): called with the plans by tensor name, it yields (name, the tensor's dense-with-zeros
#: weight in its source dtype and shape) for pruned targets, in any order; each is packed by its plan and
#: written at once (the writer's offsets are fixed, so the order does not change the bytes).
PrunedWeights = Callable[[Mapping[str, TensorPlan]], Iterable[tuple[str, torch.Tensor]]]

#: A target whose achieved sparsity falls more than this (2 points) below its request is reported
#: (a warning; --strict refuses the run). Rounding of k alone stays well inside it for real layers.
SHORTFALL = 0.02


@dataclass(frozen=True)
class TensorReport:
    name: str
    action: str  # "pruned" | "passed"
    reason: str
    shape: tuple[int, ...]
    dtype: str
    sparsity_achieved: float | None
    dense_bytes: int
    packed_bytes: int
    sparsity_requested: float | None = None  # None: not a target (see TensorPlan.requested)
    shortfall: bool = False  # achieved more than SHORTFALL below the request


@dataclass
class PruneReport:
    """What a prune run did; the CLI renders it as a table or JSON.

    ``notes`` are whole lines for people and CI logs, each starting with ``warning: `` (a
    shortfall, a glob matching nothing) or ``note: ``. The sparsity totals are over the targets
    (tensors the options ask to prune, weighted by element count; None without any) and, for
    ``sparsity_achieved_all``, over every element of the checkpoint.
    """

    source: str
    output: str
    source_sha256: str
    tensors: list[TensorReport] = field(default_factory=list)
    aliases: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    sparsity_requested: float | None = None
    sparsity_achieved: float | None = None
    sparsity_achieved_all: float = 0.0
    criterion: str = "magnitude"  # which weights were kept (prune.criteria.Criterion)

    @property
    def dense_bytes(self) -> int:
        return sum(t.dense_bytes for t in self.tensors)

    @property
    def packed_bytes(self) -> int:
        return sum(t.packed_bytes for t in self.tensors)

    def to_dict(self) -> dict:
        return {
            "schema": "balprune.prune-report/1", "source": self.source, "output": self.output,
            "criterion": self.criterion,
            "source_sha256": self.source_sha256, "aliases": self.aliases, "notes": self.notes,
            "dense_bytes": self.dense_bytes, "packed_bytes": self.packed_bytes,
            "sparsity_requested": self.sparsity_requested, "sparsity_achieved": self.sparsity_achieved,
            "sparsity_achieved_all": self.sparsity_achieved_all,
            "tensors": [
                {"name": t.name, "action": t.action, "reason": t.reason, "shape": list(t.shape), "dtype": t.dtype,
                 "sparsity_requested": t.sparsity_requested, "sparsity_achieved": t.sparsity_achieved,
                 "shortfall": t.shortfall, "dense_bytes": t.dense_bytes, "packed_bytes": t.packed_bytes}
                for t in self.tensors
            ],
        }


def default_output(source: Path, pattern_name: str) -> Path:
    """model.pt -> model.<pattern>.safetensors beside it; a folder -> <folder>.<pattern>.safetensors."""
    source = Path(source)
    if source.name.endswith(".index.json"):
        source = source.parent
    if source.is_dir():
        return source.parent / f"{source.name}.{pattern_name}.safetensors"
    stem = source.name
    for suffix in (".safetensors", ".pt", ".pth", ".bin", ".ckpt"):
        if stem.endswith(suffix) and len(stem) > len(suffix):
            stem = stem[: -len(suffix)]
            break
    return source.with_name(f"{stem}.{pattern_name}.safetensors")


def plan_checkpoint(ckpt: Checkpoint, options: PruneOptions, transposed: frozenset[str] | None = None
                    ) -> list[TensorPlan]:
    """Plans for every tensor in source order; global unstructured scope reads magnitudes first.
    ``transposed``: the tensors stored [in, out] (GPT-2 Conv1D), planned as their transpose; None
    recognises them (llm.gpt2.conv1d_weights, with the config.json beside the checkpoint if any), so
    every caller plans a checkpoint the way ``prune`` does."""
    if transposed is None:
        hf = hf_record.read_beside(ckpt.files)
        transposed = conv1d_weights(ckpt.tensors, recognition_type(hf.config if hf else None))
    plans = [plan_tensor(t, options, transposed=t.name in transposed) for t in ckpt.tensors]
    global_ = [p for p in plans if p.pattern is not None and p.pattern.ranks_globally]
    if global_:
        sparsities = {p.pattern.sparsity for p in global_}
        if len(sparsities) > 1:
            raise InvalidInputError("global unstructured pruning needs one sparsity for all its tensors")
        mags = []
        for p in global_:
            t = ckpt.load(p.source.name)
            check_finite(t, p.source.name)
            mags.append(t.reshape(-1))
        counts = global_keep_counts(mags, sparsities.pop())
        by_name = {p.source.name: c for p, c in zip(global_, counts)}
        plans = [plan_tensor(t, options, keep_override=max(1, by_name[t.name]), transposed=t.name in transposed)
                 if t.name in by_name else p for t, p in zip(ckpt.tensors, plans)]
    return plans


def _per_layer(plan: TensorPlan) -> bool:
    """Whether the plan's own request is what its layer should meet (a global ranking only meets it in total)."""
    return not (plan.pattern is not None and plan.pattern.ranks_globally)


def is_shortfall(plan: TensorPlan) -> bool:
    """A target whose achieved sparsity is more than SHORTFALL below its own request."""
    return (plan.requested is not None and _per_layer(plan)
            and plan.achieved < plan.requested - SHORTFALL - 1e-9)


def shortfall_line(plan: TensorPlan) -> str:
    short = 100 * (plan.requested - plan.achieved)
    return (f"tensor {plan.source.name!r} is {short:.1f} points short: {100 * plan.achieved:.1f}% sparsity, "
            f"{100 * plan.requested:.1f}% requested ({plan.reason})")


def check_shortfalls(plans: list[TensorPlan], options: PruneOptions) -> list[TensorPlan]:
    """The plans short of their request (``is_shortfall``); under ``options.strict`` an InvalidInputError
    (exit 4) naming the first and counting the rest instead. Plans need no tensor data, so callers
    run this before any work (prune: before anything is written; finetune: before training)."""
    short = [p for p in plans if is_shortfall(p)]
    if short and options.strict:
        more = f" (and {len(short) - 1} more)" if len(short) > 1 else ""
        raise InvalidInputError(
            f"{shortfall_line(short[0])}{more}; --strict refuses more than {100 * SHORTFALL:.0f} points short",
            hint="choose a geometry that reaches it (e.g. fewer --blocks), exclude the tensor, or drop --strict")
    return short


def sparsity_totals(plans: list[TensorPlan]) -> tuple[float | None, float | None, float]:
    """(requested, achieved) over the targets, weighted by elements, and achieved over every element."""
    targets = [p for p in plans if p.requested is not None]
    n = sum(p.source.numel for p in targets)
    removed = sum(p.achieved * p.source.numel for p in targets)
    every = sum(p.source.numel for p in plans)
    if not n:
        return None, None, 0.0
    return sum(p.requested * p.source.numel for p in targets) / n, removed / n, removed / every if every else 0.0


def preflight(plans: list[TensorPlan], output: Path, memory_available: int | None = None,
              disk_free: int | None = None) -> None:
    """Refuse early when memory or disk clearly cannot hold the run.

    ``memory_available`` defaults to the kernel's MemAvailable estimate and ``disk_free`` to the
    free space of the output's folder (both injectable so the checks are testable on any machine).
    """
    largest = max((p.source.nbytes for p in plans if p.pruned), default=0)
    # Per tensor: the tensor, its float copy for ranking keys (chunked), the dense-with-zeros
    # copy and the packed parts; 4x plus the key chunk budget covers it.
    need = 4 * largest + (768 << 20)
    avail = memory_available if memory_available is not None else safeio.memory_available()
    if avail is not None and largest and need > avail:
        raise InvalidInputError(
            f"the largest tensor ({largest / 2**30:.1f} GiB) needs about {need / 2**30:.1f} GiB to prune; "
            f"{avail / 2**30:.1f} GiB is available",
            hint="exclude it or run on a machine with more memory",
        )
    out_bytes = sum(p.packed_bytes for p in plans) + (1 << 20)
    free = disk_free if disk_free is not None else shutil.disk_usage(output.parent).free
    if out_bytes > free:
        raise OutputError(f"{output.parent} has {free / 2**20:.0f} MiB free; the output needs {out_bytes / 2**20:.0f} MiB")


def _check_written(tmp: Path, writer: StreamingWriter) -> None:
    """Before the rename (bad-inputs item 21): the bytes on disk are the header and data written (CRCs),
    and the strict reader of packed files accepts the header and manifest, so no file that ``verify``
    would refuse ever appears at the output path."""
    from ..formats.packed_file import read_packed

    verify_written(tmp, writer.header_bytes, writer.crc32)
    read_packed(tmp)


def pack_tensor(plan: TensorPlan, weight: torch.Tensor):
    """Prune one tensor by its plan and pack it, with its encoding's packer (patterns.registry).

    Balanced: one ranking, packed directly (from_offsets; the same bytes as from_dense of the
    masked weight, tests/test_format.py checks it), at a third of the time and memory. Other
    patterns: mask -> dense-with-zeros -> from_dense.
    """
    name = plan.source.name
    check_finite(weight, name)
    if plan.transposed:  # a GPT-2 Conv1D weight [in, out]: its output units are the columns
        weight = weight.t().contiguous()
    matrix = weight.reshape(weight.shape[0], -1)
    packed = ENCODINGS[plan.entry["pattern"]].pack(weight, matrix, plan)
    if packed.manifest() != plan.entry:  # the plan fixed the file layout; packing must agree
        raise AssertionError(f"tensor {name!r}: packed manifest differs from the plan")
    return packed


# --------------------------------------------------------------------------- packers
# One per encoding, named by patterns.registry (Encoding.pack): (weight, its [R, K] matrix view,
# plan) -> the packed tensor, whose manifest() must equal plan.entry.


def pack_balanced(weight: torch.Tensor, matrix: torch.Tensor, plan: TensorPlan) -> BalancedTensor:
    g = geometry_for(matrix.shape[0], matrix.shape[1], plan.pattern)
    packed = BalancedTensor.from_offsets(weight, plan.pattern, balanced_offsets(matrix, g, dtype=g.index_dtype))
    return packed.with_encoding(plan.entry["index_encoding"])


def _masked(weight: torch.Tensor, matrix: torch.Tensor, plan: TensorPlan) -> torch.Tensor:
    """The dense-with-zeros weight (its own shape) under the plan's one-shot mask."""
    mask = one_shot_mask(matrix, plan.pattern, keep_override=plan.keep)
    return torch.where(mask, matrix, torch.zeros((), dtype=matrix.dtype)).reshape(weight.shape)


def pack_csr(weight: torch.Tensor, matrix: torch.Tensor, plan: TensorPlan) -> CsrTensor:
    return CsrTensor.from_dense(_masked(weight, matrix, plan), plan.keep, plan.pattern.sparsity)


def pack_bsr(weight: torch.Tensor, matrix: torch.Tensor, plan: TensorPlan) -> BsrTensor:
    return BsrTensor.from_dense(_masked(weight, matrix, plan), plan.pattern.block_shape, plan.keep,
                                plan.pattern.sparsity)


def _write_supplied(writer: StreamingWriter, plans: list[TensorPlan], pruned_weights: PrunedWeights) -> set[str]:
    """Pack and write every tensor ``pruned_weights`` yields; the names written.

    The dense-with-zeros weight holds at most its plan's count of non-zeros per unit, so the plan's
    packer stores exactly its entries; packing is checked to be lossless (the packed tensor's dense form
    equals the weight), since a packer given too many non-zeros would drop some silently.
    """
    by_name = {p.source.name: p for p in plans}
    written: set[str] = set()
    for name, weight in pruned_weights(by_name):
        plan = by_name.get(name)
        if plan is None or not plan.pruned or name in written or tuple(weight.shape) != plan.source.shape:
            raise AssertionError(f"pruned weight {name!r} is not a planned target, comes twice or has another shape")
        packed = pack_tensor(plan, weight)
        if not torch.equal(packed.to_dense(name), weight.t() if plan.transposed else weight):
            raise AssertionError(f"tensor {name!r}: the pruned weight does not fit its pattern (packing lost entries)")
        for o, tensor in zip(plan.outputs, packed.parts().values()):
            writer.write(o.name, tensor)
        written.add(name)
    return written


def prune_checkpoint(ckpt: Checkpoint, output: Path, options: PruneOptions, *, force: bool = False,
                     progress: Progress | None = None, pruned_weights: PrunedWeights | None = None,
                     hf: hf_record.HfFiles | None = None, transposed: frozenset[str] | None = None) -> PruneReport:
    """Prune ``ckpt`` by ``options`` into the packed file ``output`` (atomic; see AtomicOutput).

    ``pruned_weights`` supplies some targets already pruned (``PrunedWeights``); every other target is
    pruned by magnitude here.

    Raises the project's errors only; on any error no file appears at ``output``. A source with a
    config.json beside its weights (an HF folder) has its config and tokenizer files recorded in the
    packed file (formats.hf_record), and its GPT-2 Conv1D weights pruned as [out, in] (llm.gpt2); a
    torchvision ResNet has its batch norms folded into its convs first (models.bnfold, with a note);
    ``hf`` gives that record for a checkpoint with no folder behind it (a fine-tuned model in memory);
    ``transposed`` the Conv1D weights when the caller knows them (plan_checkpoint recognises them otherwise).
    """
    output = Path(output)
    if hf is None:
        hf = hf_record.read_beside(ckpt.files)
    if hf is not None:  # a Llama-family record the LLM commands would refuse is refused before it is written
        check_recorded(hf.config, f"{hf.paths[0]}" if hf.paths else "recorded config.json")
    ckpt, fold_note = fold_batch_norms(ckpt)  # a torchvision ResNet: BN folded into its convs first
    check_not_an_input(output, [*ckpt.files, *(hf.paths if hf else ())])
    # Opening the output first makes a missing or unwritable folder fail before any work.
    with AtomicOutput(output, force=force) as out:
        if transposed is None:
            transposed = conv1d_weights(ckpt.tensors, recognition_type(hf.config if hf else None))
        plans = plan_checkpoint(ckpt, options, transposed)
        short = check_shortfalls(plans, options)
        preflight(plans, output)
        sha = ckpt.sha256()
        version = spec.file_version([p.entry for p in plans])  # v1 unless a tensor needs v2
        manifest = {
            "tensors": [{"name": p.source.name, **spec.entry_for_version(p.entry, version)} for p in plans],
            "aliases": dict(ckpt.aliases),
            "options": options.to_dict(),
            "source": {"name": Path(ckpt.display).name, "sha256": sha},
        }
        if any(p.transposed for p in plans):  # only then: files without it keep their bytes
            manifest["transposed"] = [p.source.name for p in plans if p.transposed]
        metadata = {"format": spec.FORMAT_NAME, "format_version": version,
                    "tool_version": __version__, "manifest": spec.dumps(manifest), **(hf.metadata() if hf else {})}
        writer = StreamingWriter(out.file, [o for p in plans for o in p.outputs], metadata)
        report = PruneReport(ckpt.display, str(output), sha, aliases=dict(ckpt.aliases),
                             criterion=options.criterion.value)
        report.sparsity_requested, report.sparsity_achieved, report.sparsity_achieved_all = sparsity_totals(plans)
        report.notes += [f"warning: {shortfall_line(p)}" for p in short]
        report.notes += [f"warning: {w}" for w in unmatched_globs([t.name for t in ckpt.tensors], options)]
        report.notes += [f"warning: {n}" for n in (hf.notes if hf else ())]
        report.notes += [fold_note] if fold_note else []
        supplied = _write_supplied(writer, plans, pruned_weights) if pruned_weights is not None else set()
        total = sum(p.source.nbytes for p in plans)
        done = 0
        for plan in plans:
            name = plan.source.name
            if plan.pruned:
                if name not in supplied:
                    packed = pack_tensor(plan, ckpt.load(name))
                    for o, tensor in zip(plan.outputs, packed.parts().values()):
                        writer.write(o.name, tensor)
                achieved = float(plan.entry["sparsity_achieved"])
                action = "pruned"
            else:
                if plan.requested is not None:  # a target its geometry passes through dense: still no NaN/Inf
                    check_finite(ckpt.load(name), name)
                writer.write(name, ckpt.raw(name))
                achieved, action = None, "passed"
            report.tensors.append(TensorReport(name, action, plan.reason, plan.source.shape, plan.source.dtype,
                                               achieved, plan.source.nbytes, plan.packed_bytes, plan.requested,
                                               is_shortfall(plan)))
            done += plan.source.nbytes
            if progress:
                progress(done, total, name)
        writer.finish()
        out.commit(lambda tmp: _check_written(tmp, writer))
    if options.schedule.steps > 1:
        report.notes.append(
            f"note: schedule of {options.schedule.steps} steps: without fine-tuning between steps, iterative pruning "
            "reaches the one-shot mask, so this run pruned in one shot (to train between steps, use "
            "balprune.prune.iterative.iterative_prune with a hook)"
        )
    return report
