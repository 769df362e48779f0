"""The one registry of sparsity patterns and packed encodings: adding one touches this table.

Two tables, each looked up by the name the rest of the code already holds:

``PATTERNS`` (by ``PatternKind``): what a pattern *is*, one ``PatternSpec`` per kind (N:M is the
balanced kind with block length M, spelled ``nm``): its class, its own option keys (with their
command-line spelling and TOML types), how it is built from loose option values (balprune.config
calls ``build``), the encoding it packs as, and the planner (prune.plan) that decides a tensor's
manifest entry and output parts from its shape alone.

``ENCODINGS`` (by a manifest entry's ``pattern``: balanced, unstructured, block): what a packed
tensor *is*, one ``Encoding`` per packed layout: its packed class, its packer (prune.engine), the
GPU operator that runs it (runtime.load) with the options that operator takes, and what
``balprune bench`` times for it (bench.peers). Block and vector share the ``block`` encoding
(BSR; a vector is a 1 x V tile).

Functions and classes of higher layers (prune, formats, runtime) are named by ``Ref``s and
imported on first use: this module imports only the pattern classes and the value parsers, so
``import balprune.runtime`` stays free of CuPy and no import runs back up.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, replace
from fractions import Fraction

from ..values import parse_block_shape, parse_nm, parse_positive_int, parse_sparsity
from .kinds import (
    BalancedPattern,
    BlockPattern,
    Pattern,
    PatternKind,
    UnstructuredPattern,
    UnstructuredScope,
    VectorPattern,
)


@dataclass(frozen=True)
class Ref:
    """A function or class named ``"module:attribute[.attribute]"``, imported when first used (``get`` / call)."""

    path: str

    def get(self):
        module, _, attrs = self.path.partition(":")
        obj = importlib.import_module(module)
        for attr in attrs.split("."):
            obj = getattr(obj, attr)
        return obj

    def __call__(self, *args, **kwargs):
        return self.get()(*args, **kwargs)


@dataclass(frozen=True)
class PatternOption:
    """An option key only one pattern takes: its key (TOML, manifest), CLI spelling and TOML types."""

    key: str
    cli: str
    toml: tuple[type, ...]


#: build(sparsity, values, base, error) -> Pattern: ``sparsity`` as typed (None: not given),
#: ``values`` the pattern's own option keys (None: not given), ``base`` the pattern whose values
#: fill the gaps (a layer rule's default), ``error`` the exception class a bad value raises.
Builder = Callable[[object, dict[str, object], "Pattern | None", type], Pattern]


@dataclass(frozen=True)
class PatternSpec:
    """One pattern kind (see the module docstring)."""

    kind: PatternKind
    cls: type
    options: tuple[PatternOption, ...]
    build: Builder
    #: the ``ENCODINGS`` key it packs as (a manifest entry's ``pattern``)
    encoding: str
    #: plan(src, rows, cols, pattern, keep_override) -> (manifest entry, keep count or None) | reason
    #: to pass the tensor through dense; InvalidInputError for an impossible request (prune.plan)
    plan: Ref


@dataclass(frozen=True)
class BenchAlternative:
    """Another own path of an encoding's layers, timed by bench beside its subject kernel: the
    runtime's path is the fastest of them and dense."""

    kernel: str
    #: convert(packed) -> the tensor the alternative operator runs, or None when it has none
    convert: Callable[[object], object]
    #: the operator, built like ``Encoding.operator``
    operator: Ref
    note: str


@dataclass(frozen=True)
class Encoding:
    """One packed encoding (see the module docstring)."""

    name: str
    #: the formats class (from_parts / part_specs / manifest / to_dense ...)
    packed_class: Ref
    #: pack(weight, matrix, plan) -> packed tensor whose manifest() is plan.entry (prune.engine)
    pack: Ref
    #: builds the runtime operator of a packed tensor: ``operator(packed, device=, name=, validate=,
    #: **options)``; None: runtime.load falls back to DenseLinear
    operator: Ref | None
    #: the manifest dtypes its operator runs; others fall back to DenseLinear
    operator_dtypes: tuple[str, ...]
    #: the load() options its operator takes (None: every option but ``operator_drops``)
    operator_options: tuple[str, ...] | None
    operator_drops: tuple[str, ...]
    #: the ``kernel`` bench times as balprune's own path for this encoding
    bench_subject: str
    #: the note bench gives balprune's own candidate for a packed tensor
    bench_note: Callable[[object], str]
    #: block-sparse and 2:4 library peers bench times beside it: None (none), "self" (the layer is
    #: BSR: the peers run on it), "built" (a PEER_TILE block-sparse copy at the same sparsity, timed
    #: with balprune's bsr kernel too)
    bench_block_peer: str | None
    #: own paths besides the subject kernel and dense
    bench_alternatives: tuple[BenchAlternative, ...] = ()

    def operator_kwargs(self, options: dict) -> dict:
        """The subset of runtime.load's ``options`` this encoding's operator takes."""
        if self.operator_options is not None:
            return {k: v for k, v in options.items() if k in self.operator_options}
        return {k: v for k, v in options.items() if k not in self.operator_drops}


# --------------------------------------------------------------------------- builders


def _sparsity(sparsity: object, base: Pattern | None, error) -> float:
    if sparsity is None:
        if base is None:
            raise error("sparsity: required")
        return base.sparsity
    return parse_sparsity(sparsity, what="sparsity", error=error)


def _build_balanced(sparsity, values, base, error) -> BalancedPattern:
    blocks, block_size, nm = values.get("blocks"), values.get("block_size"), values.get("nm")
    if nm is not None:
        if sparsity is not None or blocks is not None or block_size is not None:
            raise error("nm: N:M sets sparsity and block size itself; drop sparsity/blocks/block-size")
        n, m = parse_nm(nm, error=error)
        return BalancedPattern(sparsity=float(Fraction(m - n, m)), blocks=None, block_size=m)
    s = _sparsity(sparsity, base, error)
    if blocks is not None and block_size is not None:
        raise error("blocks and block-size are exclusive: give one")
    if blocks is not None:
        return BalancedPattern(s, blocks=parse_positive_int(blocks, what="blocks", error=error))
    if block_size is not None:
        return BalancedPattern(s, blocks=None, block_size=parse_positive_int(block_size, what="block-size", error=error))
    if isinstance(base, BalancedPattern):
        return replace(base, sparsity=s)
    return BalancedPattern(s)


def _build_unstructured(sparsity, values, base, error) -> UnstructuredPattern:
    s = _sparsity(sparsity, base, error)
    scope = values.get("scope")
    if scope is not None:
        try:
            sc = UnstructuredScope(scope)
        except ValueError:
            raise error(f"scope: expected tensor or global, got {scope!r}") from None
    else:
        sc = base.scope if isinstance(base, UnstructuredPattern) else UnstructuredScope.TENSOR
    return UnstructuredPattern(s, scope=sc)


def _build_block(sparsity, values, base, error) -> BlockPattern:
    s = _sparsity(sparsity, base, error)
    if values.get("block_shape") is not None:
        shape = parse_block_shape(values["block_shape"], error=error)
    else:
        shape = base.block_shape if isinstance(base, BlockPattern) else (8, 8)
    return BlockPattern(s, block_shape=shape)


def _build_vector(sparsity, values, base, error) -> VectorPattern:
    s = _sparsity(sparsity, base, error)
    if values.get("vector_length") is not None:
        length = parse_positive_int(values["vector_length"], what="vector-length", error=error)
    else:
        length = base.length if isinstance(base, VectorPattern) else 8
    return VectorPattern(s, length=length)


# --------------------------------------------------------------------------- the tables

#: One record per pattern kind. Their order is the order option keys are checked in (which
#: misplaced key an error names first): blocks, block_size, nm, block_shape, vector_length, scope.
PATTERNS: dict[PatternKind, PatternSpec] = {spec.kind: spec for spec in (
    PatternSpec(PatternKind.BALANCED, BalancedPattern,
                (PatternOption("blocks", "--blocks", (int,)), PatternOption("block_size", "--block-size", (int,)),
                 PatternOption("nm", "--nm", (str,))),
                _build_balanced, "balanced", Ref("balprune.prune.plan:plan_balanced")),
    PatternSpec(PatternKind.BLOCK, BlockPattern, (PatternOption("block_shape", "--block-shape", (str,)),),
                _build_block, "block", Ref("balprune.prune.plan:plan_tiles")),
    # vector: 1 x V tiles, planned and packed as BSR
    PatternSpec(PatternKind.VECTOR, VectorPattern, (PatternOption("vector_length", "--vector-length", (int,)),),
                _build_vector, "block", Ref("balprune.prune.plan:plan_tiles")),
    PatternSpec(PatternKind.UNSTRUCTURED, UnstructuredPattern, (PatternOption("scope", "--scope", (str,)),),
                _build_unstructured, "unstructured", Ref("balprune.prune.plan:plan_unstructured")),
)}

#: The dtypes balprune's own kernels run (the others fall back to DenseLinear).
KERNEL_DTYPES = ("F32", "F16", "BF16")

#: One record per packed encoding, keyed by a manifest entry's ``pattern``.
ENCODINGS: dict[str, Encoding] = {enc.name: enc for enc in (
    Encoding("balanced", Ref("balprune.formats.balanced:BalancedTensor"), Ref("balprune.prune.engine:pack_balanced"),
             Ref("balprune.runtime.balanced:operator_for"), KERNEL_DTYPES,
             operator_options=None, operator_drops=("team_lanes",),
             bench_subject="balanced", bench_note=lambda packed: f"{packed.encoding} indices",
             bench_block_peer="built",
             # a bitmask-stored layer also runs the offsets kernel on its exact in-memory conversion
             bench_alternatives=(BenchAlternative(
                 "balanced_offsets",
                 lambda packed: packed.with_encoding("offsets") if packed.encoding == "bitmask" else None,
                 Ref("balprune.runtime.balanced:BalancedLinear.from_tensor"),
                 "offsets indices, converted in memory"),
                 # the bitmask kernel's mask walks (runtime.bitmask.WALKS; the subject runs the default, the delta walk)
                 BenchAlternative(
                 "balanced_walk5", Ref("balprune.runtime.bitmask:bitmask_alternative"),
                 Ref("balprune.runtime.bitmask:walk5_from_tensor"), "bitmask indices, the kernel's mask walk 5"),
                 BenchAlternative(
                 "balanced_walk6", Ref("balprune.runtime.bitmask:bitmask_alternative"),
                 Ref("balprune.runtime.bitmask:walk6_from_tensor"), "bitmask indices, the kernel's mask walk 6"),
                 # 2:4 in fp16/bf16 on the sparse tensor cores (kernels/NOTES.md v16; tests/gpu/test_nm24_gpu.py
                 # checks it against float64 on the device)
                 BenchAlternative(
                 "balanced_nm24", Ref("balprune.runtime.nm24:nm24_alternative"),
                 Ref("balprune.runtime.nm24:Nm24Linear.from_tensor"), "2:4 on the sparse tensor cores"),
                 )),
    Encoding("unstructured", Ref("balprune.formats.csr:CsrTensor"), Ref("balprune.prune.engine:pack_csr"),
             None, (), operator_options=None, operator_drops=(),
             bench_subject="csr", bench_note=lambda packed: "", bench_block_peer=None),
    Encoding("block", Ref("balprune.formats.bsr:BsrTensor"), Ref("balprune.prune.engine:pack_bsr"),
             Ref("balprune.runtime.bsr:BsrLinear.from_tensor"), KERNEL_DTYPES,
             operator_options=("threads", "defines", "team_lanes"), operator_drops=(),
             bench_subject="bsr", bench_note=lambda packed: "", bench_block_peer="self"),
)}


#: A model runtime's path for the bitmask kernel of a bitmask-stored balanced layer: runtime.model runs
#: such a layer on the offsets kernel ("balanced", the exact in-memory conversion) and times the bitmask
#: kernel on the stored form beside it (runtime.model.stages.sparse_alternatives); bench reports it as
#: one of the layer's own paths.
MODEL_BITMASK_PATH = "balanced_bitmask"
#: A model runtime's path for the direct balanced convolution of a conv layer (runtime.conv, timed by the
#: VGG runtime beside im2col + the balanced SpMM, "balanced", and cuDNN).
MODEL_CONV_PATH = "balanced_conv"

def pattern_spec(pattern: Pattern | PatternKind) -> PatternSpec:
    """The record of a pattern (or a pattern kind)."""
    return PATTERNS[pattern if isinstance(pattern, PatternKind) else pattern.kind]


#: Each pattern-specific option key and the one pattern it applies to, in checking order.
PATTERN_KEY_OWNER: dict[str, PatternKind] = {o.key: spec.kind for spec in PATTERNS.values() for o in spec.options}

#: How the command line spells each pattern-specific key.
CLI_SPELLING: dict[str, str] = {o.key: o.cli for spec in PATTERNS.values() for o in spec.options}

#: The TOML types of each pattern-specific key.
OPTION_TOML_TYPES: dict[str, tuple[type, ...]] = {o.key: o.toml for spec in PATTERNS.values() for o in spec.options}
