"""The privacy journal: an fsynced, append-only record of every step that touched the data.

A line is written *before* a step reads its batch. After a crash, the steps between the last
checkpoint and the crash are redone, and the journal still holds the lost ones, so the reported ε
composes every step that touched the data — never fewer. The journal holds numbers only.
"""

from __future__ import annotations

import json
import os
from pathlib import Path


class PrivacyJournal:
    def __init__(self, path: Path):
        self.path = path

    def record(self, step: int, sample_rate: float, noise_multiplier: float | None) -> None:
        """Append one step durably (fsync): called before the step samples its batch."""
        line = json.dumps({"step": step, "q": sample_rate, "sigma": noise_multiplier}) + "\n"
        with open(self.path, "a") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())

    def segments(self, sample_rate: float, noise_multiplier: float) -> list[tuple[float, float, int]]:
        """The journal as (q, σ, count) runs of identical consecutive steps.

        A torn last line (the process died while writing it) counts as a step at the run's
        current (q, σ): when in doubt, account the step.
        """
        segs: list[tuple[float, float, int]] = []
        for q, sigma in self._steps(sample_rate, noise_multiplier):
            if segs and segs[-1][:2] == (q, sigma):
                segs[-1] = (q, sigma, segs[-1][2] + 1)
            else:
                segs.append((q, sigma, 1))
        return segs

    def count(self) -> int:
        return len(self._steps(0.0, 0.0))

    def _steps(self, sample_rate: float, noise_multiplier: float) -> list[tuple[float, float]]:
        if not self.path.is_file():
            return []
        steps = []
        for raw in self.path.read_text().splitlines():
            try:
                entry = json.loads(raw)
                steps.append((entry["q"], entry["sigma"]))
            except (ValueError, KeyError):
                steps.append((sample_rate, noise_multiplier))
        return steps
