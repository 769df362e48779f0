"""Where older code (benchmarks/ scripts) finds the timer: the timing function lives in runtime.measure.

Nothing is defined here: ``Timer``, ``Timing``, ``copies_for`` and ``SPIN_CYCLES`` are
runtime.measure's, the one owner of timing, graph capture, gates and the relative error.
"""

from __future__ import annotations

from ..runtime.measure import SPIN_CYCLES, Timer, Timing, copies_for

__all__ = ["SPIN_CYCLES", "Timer", "Timing", "copies_for"]
