"""The privacy journal: an fsynced, append-only record of every step that touched the data.

A line is written *before* a step reads its batch. After a crash, the steps between the last
checkpoint and the crash are redone, and the journal still holds the lost ones, so the reported ε
composes every step that touched the data — never fewer. It is the single source of ε: the step's
hard stop, privacy.json and the ledger all compose `segments()`. It holds (q, σ) per step only.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from dpft.errors import ConfigError
from dpft.privacy.accounting import Segment


class PrivacyJournal:
    """The journal file of a run (satisfies `dpft.privacy.step.Journal`).

    Args:
        path: The journal file (created on the first record).
        current: The run's own (q, σ) step: a torn last line (the process died while writing it)
            counts as one such step. When in doubt, account the step.
    """

    def __init__(self, path: Path, current: Segment):
        self.path, self._current = path, Segment(current.sample_rate, current.noise_multiplier, 1)

    def record(self, segment: Segment) -> None:
        """Append `segment.steps` steps durably (fsync): called before the step samples its batch."""
        line = json.dumps({"q": segment.sample_rate, "sigma": segment.noise_multiplier}) + "\n"
        with open(self.path, "a") as f:
            f.write(line * segment.steps)
            f.flush()
            os.fsync(f.fileno())

    def segments(self) -> list[Segment]:
        """The journal as runs of identical consecutive steps, in order."""
        segs: list[Segment] = []
        for q, sigma in self._steps():
            if segs and (segs[-1].sample_rate, segs[-1].noise_multiplier) == (q, sigma):
                segs[-1] = segs[-1]._replace(steps=segs[-1].steps + 1)
            else:
                segs.append(Segment(q, sigma, 1))
        return segs

    def count(self) -> int:
        """Steps that touched the data."""
        return sum(s.steps for s in self.segments())

    def _steps(self) -> list[tuple[float, float]]:
        if not self.path.is_file():
            return []
        steps = []
        for raw in self.path.read_text().splitlines():
            try:
                entry = json.loads(raw)
                steps.append((float(entry["q"]), float(entry["sigma"])))
            except (ValueError, KeyError, TypeError):
                steps.append((self._current.sample_rate, self._current.noise_multiplier))
        return steps


def check_covers(path: Path, segments: list[Segment], checkpoint_step: int) -> None:
    """Refuse to resume from a checkpoint whose steps the journal does not all hold.

    Every step up to the checkpoint touched the data and was journalled first, so a journal with
    fewer steps was lost or restored from an older copy: ε would be undercounted.

    Raises:
        ConfigError: The journal's step count is below the checkpoint's step.
    """
    steps = sum(s.steps for s in segments)
    if steps < checkpoint_step:
        raise ConfigError(
            [f"{path}: the privacy journal holds {steps} steps but the checkpoint is at step {checkpoint_step}, so "
             "ε would be undercounted; restore the run's complete journal.jsonl before resuming"]
        )  # fmt: skip
