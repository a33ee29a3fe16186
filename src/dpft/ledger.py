"""The privacy budget ledger: every run that touched a dataset, and the ε they spent together.

A SQLite file (``~/.cache/dpft/ledger.sqlite``, or ``$DPFT_LEDGER``, or an explicit path) keyed
by a dataset fingerprint, the sha256 of the training file (`dpft.hashing.sha256_file`). Each
entry holds numbers, ids and paths only, never training text. DP entries keep their privacy
journal as `Segment` s, so the total over all runs is `epsilon_of` all their segments at the δ
asked for (valid whatever δ each run reported). Entries without segments can only be
added by basic composition (ε and δ summed), and a non-private run exposes the dataset (ε = ∞).

Each entry also holds its privacy unit (and, per user, the records cap): a record-level ε and a
user-level ε do not compose into one user-level total, so a run under a dataset budget is refused
if another run on the dataset used the other unit. Entries written before the unit was kept have
none (unknown): they are composed as before, and shown as unknown.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import sqlite3
from collections.abc import Iterator, Sequence
from pathlib import Path

from dpft.errors import BudgetExceededError, ConfigError
from dpft.privacy.accounting import DatasetCap, Segment, merge_segments

_SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    fingerprint TEXT NOT NULL,
    run_id TEXT NOT NULL,
    output TEXT NOT NULL,
    created TEXT NOT NULL,
    dp INTEGER NOT NULL,
    epsilon REAL,
    delta REAL,
    accountant TEXT,
    segments TEXT NOT NULL,
    privacy_unit TEXT,
    max_records_per_user INTEGER,
    UNIQUE (fingerprint, run_id)
);
"""
_ADDED_COLUMNS = (("privacy_unit", "TEXT"), ("max_records_per_user", "INTEGER"))  # missing from older ledgers
_COLUMNS = "run_id, output, created, dp, epsilon, delta, accountant, segments, privacy_unit, max_records_per_user"
_BUSY_TIMEOUT_MS = 60_000


@dataclasses.dataclass(frozen=True)
class RunEntry:
    """One run on a dataset. `segments` is the run's privacy journal (empty if not DP).

    `privacy_unit` is "record" or "user" (None: unknown, an entry from before it was kept);
    `max_records_per_user` the user-level cap (None otherwise).
    """

    run_id: str
    output: str
    created: str
    dp: bool
    epsilon: float | None
    delta: float | None
    accountant: str | None
    segments: tuple[Segment, ...]
    privacy_unit: str | None = None
    max_records_per_user: int | None = None


@dataclasses.dataclass(frozen=True)
class Spend:
    """The budget spent on a dataset at δ, and how the runs were combined.

    `method` is "none" (no run), "composed" (all DP runs' segments composed exactly),
    "basic" (some runs without segments: ε and δ summed, `delta` is then the total δ) or
    "exposed" (a non-private run: ε = ∞).
    """

    epsilon: float
    delta: float
    method: str


@dataclasses.dataclass(frozen=True)
class _Runs:
    """A dataset's DP entries as they compose: the one rule behind `spend` and the hard stop's `cap`.

    The runs' journals (`segments`, merged) compose exactly, with each other and with a run's own;
    the runs recorded without segments (`bare`) add their ε and δ (basic composition).
    """

    segments: tuple[Segment, ...]
    bare: tuple[RunEntry, ...]

    @classmethod
    def of(cls, entries: Sequence[RunEntry]) -> _Runs | None:
        """The entries split by the rule; None once a non-private run exposed the dataset (ε = ∞)."""
        if any(not e.dp for e in entries):
            return None
        return cls(merge_segments(s for e in entries for s in e.segments), tuple(e for e in entries if not e.segments))

    def cap(self, limit: float) -> DatasetCap:
        """The runs as the hard stop composes them (it compares ε alone, so the bare runs' δ is not kept)."""
        return DatasetCap(limit, self.segments, sum(e.epsilon for e in self.bare))


def default_path() -> Path:
    """$DPFT_LEDGER if set, else ~/.cache/dpft/ledger.sqlite."""
    return Path(os.environ.get("DPFT_LEDGER") or Path.home() / ".cache" / "dpft" / "ledger.sqlite")


class BudgetLedger:
    """The ledger file. Safe for concurrent processes (WAL journal, busy timeout, and
    `BEGIN IMMEDIATE` writes). WAL needs a local filesystem, not a network share.

    Args:
        path: The SQLite file; default `default_path()`. Its folder is created.
    """

    def __init__(self, path: str | os.PathLike | None = None):
        self.path = Path(path) if path is not None else default_path()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._connect() as db:
            db.execute("PRAGMA journal_mode=WAL")
            db.executescript(_SCHEMA)
            _add_missing_columns(db)

    @contextlib.contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        db = sqlite3.connect(self.path, timeout=_BUSY_TIMEOUT_MS / 1000, isolation_level=None)
        try:
            db.execute(f"PRAGMA busy_timeout={_BUSY_TIMEOUT_MS}")
            yield db
        finally:
            db.close()

    def record_run(self, fingerprint: str, entry: RunEntry) -> None:
        """Record a run, or replace the entry of the same run id (a resumed run's history
        includes every earlier step, so the latest entry is the whole run).

        Raises:
            ConfigError: If the entry's segments are invalid, or a DP entry has neither
                segments nor (ε, δ); nothing is recorded then.
        """
        _check_entry(entry)
        segments = json.dumps([[float(q), float(s), int(n)] for q, s, n in entry.segments])
        row = (
            fingerprint,
            entry.run_id,
            entry.output,
            entry.created,
            int(entry.dp),
            entry.epsilon,
            entry.delta,
            entry.accountant,
            segments,
            entry.privacy_unit,
            entry.max_records_per_user,
        )
        with self._connect() as db:
            db.execute("BEGIN IMMEDIATE")  # take the write lock now, not at the first write
            try:
                db.execute("DELETE FROM runs WHERE fingerprint = ? AND run_id = ?", (fingerprint, entry.run_id))
                marks = ", ".join("?" * len(row))
                db.execute(f"INSERT INTO runs (fingerprint, {_COLUMNS}) VALUES ({marks})", row)
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise

    def history(self, fingerprint: str | None = None) -> list[RunEntry]:
        """The runs on one dataset (or on all datasets), oldest first."""
        query = f"SELECT {_COLUMNS} FROM runs"
        params: tuple[str, ...] = ()
        if fingerprint is not None:
            query, params = query + " WHERE fingerprint = ?", (fingerprint,)
        with self._connect() as db:
            rows = db.execute(query + " ORDER BY id", params).fetchall()
        return [
            RunEntry(
                run_id,
                output,
                created,
                bool(dp),
                epsilon,
                delta,
                accountant,
                tuple(Segment(q, s, n) for q, s, n in json.loads(segments)),
                unit,
                cap,
            )
            for run_id, output, created, dp, epsilon, delta, accountant, segments, unit, cap in rows
        ]

    def spend(
        self,
        fingerprint: str,
        delta: float,
        planned: Sequence[Segment] = (),
        accountant: str = "pld",
    ) -> Spend:
        """The budget spent on a dataset (plus a planned run's segments), and the method used.

        Args:
            fingerprint: The dataset fingerprint.
            delta: The δ at which the segments are composed.
            planned: Segments of a run about to start, counted as if already recorded.
            accountant: "pld" or "rdp", for the composition.

        Returns:
            A `Spend`.

        Raises:
            ConfigError: On an invalid δ or accountant.
        """
        runs = _Runs.of(self.history(fingerprint))
        if runs is None:
            return Spend(math.inf, delta, "exposed")
        epsilon = runs.cap(math.inf).composed(planned, delta, accountant)
        if runs.bare:
            return Spend(epsilon, delta + sum(e.delta for e in runs.bare), "basic")
        return Spend(epsilon, delta, "composed" if runs.segments or merge_segments(planned) else "none")

    def check_budget(
        self,
        fingerprint: str,
        planned: Sequence[Segment],
        delta: float,
        dataset_budget: float,
        accountant: str = "pld",
        privacy_unit: str | None = None,
    ) -> float:
        """ε of the dataset's history plus a planned run; refuse a run that exceeds the budget.

        Args:
            fingerprint: The dataset fingerprint.
            planned: The planned run's (q, σ, count) segments.
            delta: The δ at which ε is composed.
            dataset_budget: The largest total ε allowed on this dataset (--dataset-budget).
            accountant: "pld" or "rdp".
            privacy_unit: The planned run's unit ("record" or "user"); None: not checked.

        Returns:
            The would-be total ε.

        Raises:
            BudgetExceededError: If the total would exceed `dataset_budget`, or another run on the
                dataset used another privacy unit.
            ConfigError: On invalid segments, δ or accountant.
        """
        if privacy_unit is not None:
            self.check_unit(fingerprint, privacy_unit)
        before = self.spend(fingerprint, delta, accountant=accountant)
        after = self.spend(fingerprint, delta, planned, accountant)
        if after.method == "exposed":
            raise BudgetExceededError(
                "a non-private run (--no-dp) already used this dataset, so no privacy budget "
                "is left for it; see `dpft account` for its runs"
            )
        if after.epsilon > dataset_budget:
            raise BudgetExceededError(
                f"this run would bring the total ε on this dataset to {after.epsilon:.3g} "
                f"(already spent: {before.epsilon:.3g}, {after.method} composition at "
                f"δ = {after.delta:g}), over --dataset-budget {dataset_budget:g}"
            )
        return after.epsilon

    def cap(self, fingerprint: str, limit: float, exclude_run: str | None = None) -> DatasetCap:
        """The dataset budget as a run's hard stop sees it: every other run on the dataset, as it is now.

        Args:
            fingerprint: The dataset fingerprint.
            limit: --dataset-budget.
            exclude_run: The run's own id (a resumed run's entry is not "another run").
        """
        runs = _Runs.of([e for e in self.history(fingerprint) if e.run_id != exclude_run])
        return DatasetCap(limit, (), math.inf) if runs is None else runs.cap(limit)

    def check_unit(self, fingerprint: str, privacy_unit: str) -> None:
        """Refuse a run whose privacy unit differs from another run's on the dataset (unknown units pass).

        A record-level ε says nothing per user until multiplied by the records a user has, so one
        total over runs of both units would understate the user-level spend.

        Raises:
            BudgetExceededError: Naming both units and the other run.
        """
        for e in self.history(fingerprint):
            if e.privacy_unit is not None and e.privacy_unit != privacy_unit:
                raise BudgetExceededError(
                    f"privacy unit {privacy_unit!r}: run {e.run_id[:8]} on this dataset is {e.privacy_unit!r}-level, "
                    f"and the ledger cannot compose the two into one total under a dataset budget; train with "
                    f"privacy unit {e.privacy_unit!r}"
                )


def _add_missing_columns(db: sqlite3.Connection) -> None:
    """Bring a ledger written by an older dpft up to the schema (its entries' units stay NULL: unknown)."""
    db.execute("BEGIN IMMEDIATE")  # two processes opening an old ledger add each column once
    try:
        have = {row[1] for row in db.execute("PRAGMA table_info(runs)")}
        for name, kind in _ADDED_COLUMNS:
            if name not in have:
                db.execute(f"ALTER TABLE runs ADD COLUMN {name} {kind}")
        db.execute("COMMIT")
    except BaseException:
        db.execute("ROLLBACK")
        raise


def _check_entry(entry: RunEntry) -> None:
    """Refuse an entry the ledger could not compose later."""
    merge_segments(entry.segments)  # raises ConfigError naming the bad q, σ or steps
    problems = []
    if entry.dp and not entry.segments and (entry.epsilon is None or entry.delta is None):
        problems.append(f"run {entry.run_id}: a DP run needs its privacy journal segments or its (epsilon, delta)")
    if entry.epsilon is not None and not entry.epsilon >= 0:
        problems.append(f"run {entry.run_id}: epsilon must be >= 0, got {entry.epsilon}")
    if entry.delta is not None and not 0 <= entry.delta < 1:
        problems.append(f"run {entry.run_id}: --delta must be in [0, 1), got {entry.delta}")
    if entry.privacy_unit not in (None, "record", "user"):
        problems.append(f"run {entry.run_id}: --privacy-unit must be record or user, got {entry.privacy_unit!r}")
    if problems:
        raise ConfigError(problems)
