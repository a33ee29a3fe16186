"""The expected batch when the user gives none: from the number of privacy units and the compute budget.

The compute budget is `--epochs` (passes over the units, i.e. unit gradients computed); the batch
decides how that budget is split into steps. Under DP, with AdamW, a linearly decaying rate of 1e-2
and LoRA (the demo's settings), measured at 1600 patients and ε = 8 (`benchmarks/dp_settings.py`,
docs/dp-utility.md), the same budget gave 88.0% in 32 steps of 256 patients, 89.0% in 63 of 128 and
86.3% in 125 of 64; twice the budget spent on twice the steps (250 of 64) gave 60.7%. Adam divides
by its noise-dominated second moment, so each step moves every coordinate by about the rate however
small the noise: fewer, larger (less noisy) steps win. So the batch is the largest that still gives
DP_TARGET_STEPS steps (the best measured), never below MIN_DP_BATCH. Without DP the old default,
64 records, stays. The rule reads N and the budget only, never the data: N is public already
(privacy.json's num_units, needed to state q).
"""

from __future__ import annotations

import math

DP_TARGET_STEPS = 64
MIN_DP_BATCH = 32
NON_PRIVATE_BATCH = 64


def auto_batch_size(num_units: int, epochs: float, max_steps: int | None, dp: bool) -> int:
    """The expected batch B for a run that was given none.

    Args:
        num_units: N, the privacy units (records, or users under --privacy-unit user).
        epochs: the compute budget, in passes over the units.
        max_steps: the planned steps, if the user fixed them (the budget is then split into those).
        dp: whether the run is private.

    Returns:
        B in [1, N].
    """
    if not dp:
        return max(1, min(NON_PRIVATE_BATCH, num_units))
    steps = max_steps or DP_TARGET_STEPS
    batch = max(MIN_DP_BATCH, math.floor(epochs * num_units / steps))
    return max(1, min(batch, num_units))
