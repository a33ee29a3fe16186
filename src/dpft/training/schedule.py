"""Learning-rate schedules, as a function of the step alone (a resumed run needs no extra state).

DP-SGD's last iterates carry the most recent noise; decaying the rate towards the end averages
it out, which is why DP fine-tuning recipes (Li et al. 2022) decay linearly.
"""

from __future__ import annotations

import math

SCHEDULES = ("constant", "linear", "cosine")


def lr_at(step: int, total_steps: int, peak: float, schedule: str = "constant", warmup_steps: int = 0) -> float:
    """The learning rate of 0-based `step` out of `total_steps`.

    Args:
        step: the step about to be taken, from 0.
        total_steps: the planned number of steps.
        peak: the rate after warmup.
        schedule: "constant", "linear" (to 0 at the last step) or "cosine" (to 0).
        warmup_steps: steps of linear warmup from peak / (warmup_steps + 1) up to peak.

    Returns:
        The learning rate, > 0 for every step before total_steps.
    """
    if step < warmup_steps:
        return peak * (step + 1) / (warmup_steps + 1)
    if schedule == "constant":
        return peak
    span = max(1, total_steps - warmup_steps)
    remaining = max(0.0, 1.0 - (step - warmup_steps) / span)  # 1 at the first step after warmup
    if schedule == "linear":
        return peak * remaining
    return peak * 0.5 * (1.0 + math.cos(math.pi * (1.0 - remaining)))
