"""The pruning schedule (GraduallyIncrease of Algorithm 1): the sparsity of every step.

``Schedule.sparsities(target)`` is the one place the steps' sparsities are computed; the
iterative pass (prune.iterative) and fine-tuning walk them. balprune.config builds a Schedule
from a recipe's [schedule] table or the command line.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass

from ..errors import ConfigError
from ..values import parse_positive_int, parse_sparsity


class ScheduleKind(str, enum.Enum):
    CUBIC = "cubic"
    LINEAR = "linear"
    LIST = "list"


@dataclass(frozen=True)
class Schedule:
    """GraduallyIncrease of Algorithm 1: the sparsities of the steps, ending at the target.

    cubic: s_t = s_f * (1 - (1 - t/n)^3) (Zhu & Gupta 2017), t = 1..n; linear: s_t = s_f * t/n;
    list: the given values, which must be non-decreasing and end at the target.
    """

    kind: ScheduleKind = ScheduleKind.CUBIC
    steps: int = 1
    values: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        parse_positive_int(self.steps, what="schedule steps", error=ConfigError)
        if self.kind is ScheduleKind.LIST:
            if not self.values:
                raise ConfigError("schedule kind 'list' needs values")
            for v in self.values:
                parse_sparsity(v, what="schedule value", error=ConfigError)
            if any(b < a for a, b in zip(self.values, self.values[1:])):
                raise ConfigError("schedule values must be non-decreasing")

    def sparsities(self, target: float) -> list[float]:
        if self.kind is ScheduleKind.LIST:
            if not math.isclose(self.values[-1], target):
                raise ConfigError(f"schedule values end at {self.values[-1]}, target sparsity is {target}")
            return list(self.values[:-1]) + [target]
        n = self.steps
        if self.kind is ScheduleKind.LINEAR:
            out = [target * t / n for t in range(1, n + 1)]
        else:
            out = [target * (1 - (1 - t / n) ** 3) for t in range(1, n + 1)]
        out[-1] = target
        return [round(s, 12) for s in out]
