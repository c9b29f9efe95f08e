"""Did the attack converge within its budget? Judged from the run's own loss history.

The attack keeps its best iterate, so what matters is how much the best loss so far still fell
in the last part of the run: a run that was still improving when the budget ran out would have
found more with a larger one. `tail_improvement` is that relative drop over the last
TAIL_FRACTION of the iterations. bench/convergence.py measured where it separates runs that were
still gaining from runs that had settled (bench/results/convergence-cpu.json).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

TAIL_FRACTION = 0.25
# Above this relative drop of the best loss over the run's last quarter, the run had not
# converged (bench/results/convergence-cpu.json: runs above it ended more than 1 dB below the
# same attack with a budget several times larger).
UNCONVERGED_ABOVE = 0.05
MIN_ITERATIONS = 8  # fewer: too short to have a tail to judge


def tail_improvement(loss_history: Sequence[float], fraction: float = TAIL_FRACTION) -> float | None:
    """Relative drop of the best loss so far over the last `fraction` of the run, or None when
    the run is too short or its losses are not finite."""
    values = [v for v in loss_history if math.isfinite(v)]
    if len(values) < MIN_ITERATIONS:
        return None
    start = min(len(values) - 1, max(1, math.floor(len(values) * (1 - fraction))))
    before = min(values[:start])
    after = min(before, min(values[start:]))
    if before == 0:
        return 0.0
    return (before - after) / abs(before)


def convergence(loss_history: Sequence[float], threshold: float = UNCONVERGED_ABOVE) -> dict[str, Any]:
    """The manifest's `attack.convergence`: the measurement, the rule and the verdict."""
    tail = tail_improvement(loss_history)
    return {
        "tail_improvement": tail,
        "tail_fraction": TAIL_FRACTION,
        "threshold": threshold,
        "converged": None if tail is None else tail <= threshold,
        "rule": f"the best loss fell by at most {threshold:g} (relative) over the last "
        f"{TAIL_FRACTION:.0%} of the iterations",
    }
