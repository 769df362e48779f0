"""The sparsity patterns as frozen, validated values, and the rounding rule they all share.

One class per pattern kind (``PatternKind``): balanced (N:M is balanced with block length M),
unstructured, block and vector. ``keep_count`` is the documented rounding of a sparsity to a kept
count. What each kind is built from, planned, packed and run with is registered in
balprune.patterns.registry. Validation raises ConfigError (never ``assert``); the value parsers
come from balprune.values, so this module never imports balprune.config.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass
from fractions import Fraction
from typing import Union

from ..errors import ConfigError
from ..values import parse_block_shape, parse_positive_int, parse_sparsity


def keep_count(sparsity: float, length: int) -> int:
    """Entries kept out of ``length`` at ``sparsity``: the documented rounding rule.

    k = floor((1 - s) * length + 1/2), computed exactly from the shortest decimal form of ``s``
    (so 0.9 means nine tenths, not the binary float nearest to it), clamped to [1, length].
    Halves round up. Every pattern uses this rule: per block (balanced), per tensor
    (unstructured), per tile count (block).
    """
    exact = (1 - Fraction(repr(float(sparsity)))) * length + Fraction(1, 2)
    return max(1, min(length, math.floor(exact)))


class PatternKind(str, enum.Enum):
    BALANCED = "balanced"
    UNSTRUCTURED = "unstructured"
    BLOCK = "block"
    VECTOR = "vector"


class UnstructuredScope(str, enum.Enum):
    TENSOR = "tensor"
    GLOBAL = "global"


@dataclass(frozen=True)
class BalancedPattern:
    """Balanced sparsity: each row split into blocks; every block keeps the same k entries.

    Exactly one of ``blocks`` (B per row; block length L = ceil(K / B)) and ``block_size``
    (L directly; B = ceil(K / L)) is set. N:M is ``block_size=M, sparsity=1 - N/M``.
    """

    sparsity: float
    blocks: int | None = 32
    block_size: int | None = None

    def __post_init__(self) -> None:
        parse_sparsity(self.sparsity, what="sparsity", error=ConfigError)
        if (self.blocks is None) == (self.block_size is None):
            raise ConfigError("balanced pattern: set exactly one of blocks and block_size")
        for name in ("blocks", "block_size"):
            v = getattr(self, name)
            if v is not None:
                parse_positive_int(v, what=name, error=ConfigError)

    @property
    def kind(self) -> PatternKind:
        return PatternKind.BALANCED

    @property
    def ranks_globally(self) -> bool:
        """Whether one ranking spans every tensor (then a layer meets its request only in total)."""
        return False

    def option_values(self) -> dict[str, object]:
        """This pattern's own option keys and values, as recorded in a manifest (``pattern_to_dict``)."""
        return {"blocks": self.blocks} if self.blocks is not None else {"block_size": self.block_size}


@dataclass(frozen=True)
class UnstructuredPattern:
    """Unstructured magnitude pruning, per tensor or with one global threshold."""

    sparsity: float
    scope: UnstructuredScope = UnstructuredScope.TENSOR

    def __post_init__(self) -> None:
        parse_sparsity(self.sparsity, what="sparsity", error=ConfigError)

    @property
    def kind(self) -> PatternKind:
        return PatternKind.UNSTRUCTURED

    @property
    def ranks_globally(self) -> bool:
        return self.scope is UnstructuredScope.GLOBAL

    def option_values(self) -> dict[str, object]:
        return {"scope": self.scope.value}


@dataclass(frozen=True)
class BlockPattern:
    """Block sparsity: bh x bw tiles kept or dropped whole, ranked by tile L2 norm."""

    sparsity: float
    block_shape: tuple[int, int] = (8, 8)

    def __post_init__(self) -> None:
        parse_sparsity(self.sparsity, what="sparsity", error=ConfigError)
        parse_block_shape(self.block_shape, what="block_shape", error=ConfigError)

    @property
    def kind(self) -> PatternKind:
        return PatternKind.BLOCK

    @property
    def ranks_globally(self) -> bool:
        return False

    def option_values(self) -> dict[str, object]:
        return {"block_shape": list(self.block_shape)}


@dataclass(frozen=True)
class VectorPattern:
    """Vector sparsity: 1-D vectors of ``length`` consecutive weights of a row, kept or dropped whole.

    The coarse-grained baseline of the paper's accuracy figures (after Mao et al. 2017): a row
    [K] is cut into ceil(K / length) vectors, ranked by their L2 norm across the whole matrix.
    It is block sparsity with 1 x ``length`` tiles, and is packed as such (BSR, FORMAT.md).
    """

    sparsity: float
    length: int = 8

    def __post_init__(self) -> None:
        parse_sparsity(self.sparsity, what="sparsity", error=ConfigError)
        parse_positive_int(self.length, what="vector_length", error=ConfigError)

    @property
    def kind(self) -> PatternKind:
        return PatternKind.VECTOR

    @property
    def ranks_globally(self) -> bool:
        return False

    def option_values(self) -> dict[str, object]:
        return {"vector_length": self.length}

    @property
    def block_shape(self) -> tuple[int, int]:
        """The tile shape that packs this pattern: (1, length)."""
        return (1, self.length)


Pattern = Union[BalancedPattern, UnstructuredPattern, BlockPattern, VectorPattern]


def pattern_to_dict(p: Pattern) -> dict[str, object]:
    """A JSON-ready description of a pattern (recorded in the packed file's manifest)."""
    return {"pattern": p.kind.value, "sparsity": p.sparsity, **p.option_values()}
