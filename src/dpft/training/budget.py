"""The dataset's privacy budget ledger, seen from a training run.

Before anything is written, a run is checked against `--dataset-budget`; once its directory
exists it is recorded with its *planned* spend (so a run that crashes and is never resumed still
counts, conservatively). At the end its entry is replaced by the steps that actually touched the
data (the privacy journal).
"""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from dpft.errors import BudgetExceededError
from dpft.hashing import sha256_file
from dpft.ledger import BudgetLedger, RunEntry
from dpft.privacy.accounting import Segment, epsilon_of, merge_segments
from dpft.training.config import TrainConfig


@dataclass(frozen=True)
class DatasetBudget:
    ledger: BudgetLedger
    fingerprint: str

    @classmethod
    def open(cls, c: TrainConfig) -> DatasetBudget:
        return cls(BudgetLedger(c.ledger), sha256_file(c.data))

    def check(self, c: TrainConfig, planned: Sequence[Segment]) -> None:
        """Refuse a run whose planned segments would bring the dataset past --dataset-budget.

        Raises:
            BudgetExceededError: If the ledger's composed total would pass --dataset-budget, or
                another run on the dataset used another privacy unit.
        """
        if c.dataset_budget is None:
            return
        if c.no_dp:
            raise BudgetExceededError("--no-dp with --dataset-budget: a non-private run spends an unbounded budget")
        self.ledger.check_budget(self.fingerprint, planned, c.delta, c.dataset_budget, c.accountant, c.privacy_unit)

    def record(self, c: TrainConfig, root: Path, segments: Sequence[Segment]) -> None:
        """Record (or replace) this run's entry: numbers, ids and paths only.

        Args:
            c: The run's configuration.
            root: The run directory.
            segments: The run's privacy journal (or, before training, its planned segments).
        """
        dp = not c.no_dp
        journal = merge_segments(segments) if dp else ()
        entry = RunEntry(
            run_id=run_id(root),
            output=str(root.resolve()),
            created=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            dp=dp,
            epsilon=epsilon_of(journal, c.delta, c.accountant) if dp else None,
            delta=c.delta if dp else None,
            accountant=c.accountant if dp else None,
            segments=journal,
            privacy_unit=c.privacy_unit,
            max_records_per_user=c.max_records_per_user if c.privacy_unit == "user" else None,
        )
        self.ledger.record_run(self.fingerprint, entry)


def run_id(root: Path) -> str:
    """A run's stable id, created with the run directory and kept across resumes."""
    path = root / "run-id"
    if not path.is_file():
        path.write_text(uuid.uuid4().hex)
    return path.read_text().strip()
