"""The dataset budget ledger for Trainer runs: the same entries `dpft train` records.

A Trainer's `train_dataset` is an in-memory dataset, not a file, so its fingerprint is the sha256
of its rows as canonical JSON (one line per row, keys sorted, in row order): the same rows give
the same fingerprint whatever their column order or dataset object. It is not the fingerprint
`dpft train` gives the file they were read from (that is the file's bytes), so a dataset trained
on both ways is two entries of the ledger.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dpft.errors import ConfigError
from dpft.hf.data import _as_dataset
from dpft.ledger import BudgetLedger, RunEntry
from dpft.privacy.accounting import DatasetCap, Segment, epsilon_of, merge_segments
from dpft.training.budget import existing_run_id, run_id


def dataset_fingerprint(dataset: Any) -> str:
    """sha256 over the dataset's rows as canonical JSON (sorted keys, compact, one row per line).

    Args:
        dataset: A `datasets.Dataset` (any format: rows are read as plain Python values) or an
            iterable of mappings (fingerprinted as the `Dataset` built from it).

    Raises:
        ConfigError: A value that has no canonical JSON form (never quoted: it is private).
    """
    if hasattr(dataset, "with_format"):
        dataset = dataset.with_format(None)  # python values, not tensors or arrays
    elif not hasattr(dataset, "column_names"):
        dataset = _as_dataset(dataset)  # rows as DPTrainer reads them: absent fields are None
    digest = hashlib.sha256()
    for i, row in enumerate(dataset):
        try:
            line = json.dumps(dict(row), sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=_plain)
        except (TypeError, ValueError) as err:
            raise ConfigError([f"train_dataset row {i}: a value cannot be fingerprinted as JSON ({err})"]) from None
        digest.update(line.encode("utf-8"))
        digest.update(b"\n")
    return digest.hexdigest()


def _plain(value: Any) -> Any:
    if hasattr(value, "tolist"):  # numpy arrays and scalars, tensors
        return value.tolist()
    if isinstance(value, bytes):
        return {"bytes": value.hex()}
    if hasattr(value, "isoformat"):
        return value.isoformat()
    raise TypeError(f"a value of type {type(value).__name__}")


@dataclass(frozen=True)
class TrainerBudget:
    """The ledger and the training set's fingerprint (computed once, when the trainer is built)."""

    ledger: BudgetLedger
    fingerprint: str
    delta: float
    accountant: str
    privacy_unit: str = "record"
    max_records_per_user: int | None = None  # user level only

    def check(self, planned: Sequence[Segment], dataset_budget: float | None) -> None:
        """Refuse a run whose planned segments would bring the dataset past `dataset_budget`.

        Raises:
            BudgetExceededError: If the composed total would pass the budget, or another run on the
                dataset used another privacy unit.
        """
        if dataset_budget is not None:
            self.ledger.check_budget(
                self.fingerprint, planned, self.delta, dataset_budget, self.accountant, self.privacy_unit
            )

    def cap(self, dataset_budget: float | None, root: Path | None) -> DatasetCap | None:
        """`dataset_budget` for the hard stop: the ledger's other runs on this dataset, as they are now.

        Args:
            dataset_budget: PrivacyArguments.dataset_budget (None: no cap).
            root: A resumed run's output_dir (its own entry is not counted); None for a new run.
        """
        if dataset_budget is None:
            return None
        return self.ledger.cap(self.fingerprint, dataset_budget, exclude_run=existing_run_id(root))

    def record(self, root: Path, segments: Sequence[Segment]) -> None:
        """Record (or replace) the run's entry: its planned segments, then its journal's."""
        journal = merge_segments(segments)
        entry = RunEntry(
            run_id=run_id(root),
            output=str(root.resolve()),
            created=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            dp=True,
            epsilon=epsilon_of(journal, self.delta, self.accountant),
            delta=self.delta,
            accountant=self.accountant,
            segments=journal,
            privacy_unit=self.privacy_unit,
            max_records_per_user=self.max_records_per_user,
        )
        self.ledger.record_run(self.fingerprint, entry)
