"""The dataset's privacy budget ledger, seen from a training run.

Before anything is written, a run is checked against `--dataset-budget`; once its directory
exists it is recorded with its *planned* spend (so a run that crashes and is never resumed still
counts, conservatively). A resume re-records it, before any step, as its journal (the lost steps
included) plus the steps still planned (`reaccount`, for `dpft train` and the Trainer alike). At
the end its entry is replaced by the steps that actually touched the data (the privacy journal).

The budget is also a hard stop (`cap`): the other runs on the dataset, read once at setup, are
composed with the journal plus one step before every step, so steps redone after a crash never
take the dataset past `--dataset-budget`.
"""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from dpft.errors import BudgetExceededError
from dpft.hashing import sha256_file
from dpft.ledger import BudgetLedger, RunEntry
from dpft.privacy.accounting import DatasetCap, Segment, epsilon_of, merge_segments
from dpft.privacy.step import Budget
from dpft.training.config import TrainConfig
from dpft.training.journal import check_covers


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

    def cap(self, c: TrainConfig, root: Path | None) -> DatasetCap | None:
        """--dataset-budget for the hard stop: the ledger's other runs on this dataset, as they are now.

        Args:
            c: The run's configuration.
            root: A resumed run's directory (its own entry is not counted); None for a new run.
        """
        if c.dataset_budget is None or c.no_dp:
            return None
        return self.ledger.cap(self.fingerprint, c.dataset_budget, exclude_run=existing_run_id(root))

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


def reaccount(
    journal: Path,
    spent: list[Segment],
    steps_done: int,
    budget: Budget,
    step: Segment,
    planned_steps: int,
    record: Callable[[list[Segment]], None] | None,
) -> None:
    """A resume, before any step reads data (`dpft train --resume` and the Trainer's): refuse a journal
    that misses checkpointed steps or is already over the dataset budget; then make the ledger entry
    the journal (the lost steps included) plus the steps still planned.

    Args:
        journal: The privacy journal file (named in the refusal).
        spent: Its segments, as rank 0 reads them.
        steps_done: The checkpoint's step (0 without one).
        budget: δ, the accountant and the hard stop's dataset cap (the other runs, read once).
        step: One step of the run's mechanism.
        planned_steps: The steps planned when the run was created.
        record: Replaces the run's ledger entry; None where this process does not write (not rank 0).

    Raises:
        ConfigError: The journal holds fewer steps than the checkpoint (ε would be undercounted).
        BudgetExceededError: The other runs and this journal already pass the dataset budget.
    """
    check_covers(journal, spent, steps_done)
    if budget.dataset is not None:
        budget.dataset.check_spent(spent, budget.delta, budget.accountant)
    if record is not None:  # conservative until the end, as at the start; the hard stop keeps the rest in budget
        left = step._replace(steps=max(0, planned_steps - steps_done))
        record([*spent, left])


def existing_run_id(root: Path | None) -> str | None:
    """The run's id if it has one already (never creates it: a refused run writes nothing)."""
    path = None if root is None else root / "run-id"
    return path.read_text().strip() if path is not None and path.is_file() else None


def run_id(root: Path) -> str:
    """A run's stable id, created with the run directory and kept across resumes."""
    path = root / "run-id"
    if not path.is_file():
        path.write_text(uuid.uuid4().hex)
    return path.read_text().strip()
