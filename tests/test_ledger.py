"""The privacy budget ledger: round trip, composition over runs, refusals, concurrent writers."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import multiprocessing
import sqlite3

import pytest

from dpft.errors import BudgetExceededError, ConfigError, DpftError
from dpft.hashing import sha256_file
from dpft.ledger import BudgetLedger, RunEntry
from dpft.privacy.accounting import Segment, epsilon_of

DELTA = 1e-5


def dp_entry(run_id: str, segments, epsilon: float | None = 1.0, delta: float = DELTA):
    segments = tuple(Segment(*s) for s in segments)
    return RunEntry(run_id, f"runs/{run_id}", "2025-01-01T00:00:00+00:00", True, epsilon, delta, "pld", segments)


def plain_entry(run_id: str) -> RunEntry:
    return RunEntry(run_id, f"runs/{run_id}", "2025-01-01T00:00:00+00:00", False, None, None, None, ())


def composed(segments) -> float:
    return epsilon_of(segments, DELTA)


def test_round_trip(tmp_path):
    ledger = BudgetLedger(tmp_path / "ledger.sqlite")
    first = dp_entry("a", [(0.01, 1.0, 100), (0.02, 1.2, 5)], epsilon=0.8)
    ledger.record_run("fp1", first)
    ledger.record_run("fp2", plain_entry("b"))
    assert ledger.history("fp1") == [first]
    assert [e.run_id for e in BudgetLedger(tmp_path / "ledger.sqlite").history()] == ["a", "b"]
    # A resumed run re-records its whole history under the same id: one entry, the latest.
    resumed = dp_entry("a", [(0.01, 1.0, 300)], epsilon=1.1)
    ledger.record_run("fp1", resumed)
    assert ledger.history("fp1") == [resumed]


def test_path_from_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("DPFT_LEDGER", str(tmp_path / "env" / "l.sqlite"))
    BudgetLedger().record_run("fp", plain_entry("x"))
    assert (tmp_path / "env" / "l.sqlite").exists()


def test_total_is_the_composition_of_all_segments(tmp_path):
    ledger = BudgetLedger(tmp_path / "l.sqlite")
    runs = [[(0.01, 1.0, 200)], [(0.02, 0.9, 50), (0.01, 1.0, 10)]]
    for i, segments in enumerate(runs):
        ledger.record_run("fp", dp_entry(f"r{i}", segments))
    expected = composed(runs[0] + runs[1])
    spend = ledger.spend("fp", DELTA)
    assert spend.method == "composed" and spend.epsilon == pytest.approx(expected, rel=1e-9)
    # Tighter than adding each run's ε: that is the point of keeping segments.
    assert expected < composed(runs[0]) + composed(runs[1])
    assert ledger.spend("other", DELTA).epsilon == 0.0


def test_total_is_not_the_last_run_nor_the_current_rate(tmp_path):
    # Mutations of the composition: only the last run's segments, or every step at the last
    # (q, σ), must not pass for the total.
    ledger = BudgetLedger(tmp_path / "l.sqlite")
    runs = [[(0.05, 0.8, 400)], [(0.01, 2.0, 100)]]
    for i, segments in enumerate(runs):
        ledger.record_run("fp", dp_entry(f"r{i}", segments))
    total = ledger.spend("fp", DELTA).epsilon
    assert total == pytest.approx(composed(runs[0] + runs[1]), rel=1e-12)
    assert total > 1.5 * composed(runs[1])
    assert total > 1.5 * composed([(0.01, 2.0, 500)])


def unit_entry(run_id: str, unit: str | None, cap: int | None = None) -> RunEntry:
    return dataclasses.replace(dp_entry(run_id, [(0.01, 1.0, 10)]), privacy_unit=unit, max_records_per_user=cap)


def test_entries_keep_their_privacy_unit(tmp_path):
    ledger = BudgetLedger(tmp_path / "l.sqlite")
    ledger.record_run("fp", unit_entry("a", "user", 8))
    ledger.record_run("fp", unit_entry("b", "record"))
    assert [(e.privacy_unit, e.max_records_per_user) for e in ledger.history("fp")] == [("user", 8), ("record", None)]


def test_a_run_of_another_privacy_unit_is_refused_under_a_dataset_budget(tmp_path):
    """A record-level ε and a user-level ε composed as one total understate the user-level spend."""
    ledger = BudgetLedger(tmp_path / "l.sqlite")
    ledger.record_run("fp", unit_entry("a1b2c3d4e5", "record"))
    planned = [(0.01, 1.0, 10)]
    with pytest.raises(
        BudgetExceededError, match=r"privacy unit 'user': run a1b2c3d4 on this dataset is 'record'-level"
    ):
        ledger.check_budget("fp", planned, DELTA, 100.0, privacy_unit="user")
    ledger.check_budget("fp", planned, DELTA, 100.0, privacy_unit="record")  # the same unit composes
    ledger.check_budget("other", planned, DELTA, 100.0, privacy_unit="user")  # another dataset
    ledger.record_run("fp2", unit_entry("old", None))  # unknown (an older entry): not a conflict
    ledger.check_budget("fp2", planned, DELTA, 100.0, privacy_unit="user")


def test_a_ledger_from_before_the_unit_columns_is_upgraded(tmp_path):
    path = tmp_path / "old.sqlite"
    with contextlib.closing(sqlite3.connect(path)) as db:
        db.executescript(OLD_SCHEMA)
        db.execute(
            "INSERT INTO runs (fingerprint, run_id, output, created, dp, epsilon, delta, accountant, segments) "
            "VALUES ('fp', 'old', 'runs/old', '2024-01-01', 1, 0.5, 1e-5, 'pld', '[[0.01, 1.0, 10]]')"
        )
        db.commit()
    ledger = BudgetLedger(path)
    [old] = ledger.history("fp")
    assert (old.privacy_unit, old.max_records_per_user) == (None, None) and old.segments == (Segment(0.01, 1.0, 10),)
    ledger.record_run("fp", unit_entry("new", "user", 4))
    assert [e.privacy_unit for e in BudgetLedger(path).history("fp")] == [None, "user"]


OLD_SCHEMA = """
CREATE TABLE runs (
    id INTEGER PRIMARY KEY AUTOINCREMENT, fingerprint TEXT NOT NULL, run_id TEXT NOT NULL, output TEXT NOT NULL,
    created TEXT NOT NULL, dp INTEGER NOT NULL, epsilon REAL, delta REAL, accountant TEXT, segments TEXT NOT NULL,
    UNIQUE (fingerprint, run_id)
);
"""


def test_invalid_entries_are_refused_as_user_errors(tmp_path):
    ledger = BudgetLedger(tmp_path / "l.sqlite")
    with pytest.raises(ConfigError, match="segments or its"):
        ledger.record_run("fp", dp_entry("a", [], epsilon=None))
    with pytest.raises(ConfigError, match="--sample-rate"):
        ledger.record_run("fp", dp_entry("b", [(1.5, 1.0, 10)]))
    with pytest.raises(ConfigError, match="--steps"):
        ledger.record_run("fp", dp_entry("c", [(0.1, 1.0, -1)]))
    with pytest.raises(DpftError, match="epsilon"):
        ledger.record_run("fp", dp_entry("d", [], epsilon=math.nan))
    assert ledger.history("fp") == []


def test_runs_without_segments_use_basic_composition(tmp_path):
    ledger = BudgetLedger(tmp_path / "l.sqlite")
    ledger.record_run("fp", dp_entry("a", [(0.01, 1.0, 200)]))
    ledger.record_run("fp", dp_entry("b", [], epsilon=0.5, delta=1e-6))
    spend = ledger.spend("fp", DELTA)
    assert spend.method == "basic"
    assert spend.epsilon == pytest.approx(composed([(0.01, 1.0, 200)]) + 0.5)
    assert spend.delta == pytest.approx(DELTA + 1e-6)


def test_non_private_run_exposes_the_dataset(tmp_path):
    ledger = BudgetLedger(tmp_path / "l.sqlite")
    ledger.record_run("fp", dp_entry("a", [(0.01, 1.0, 10)]))
    ledger.record_run("fp", plain_entry("b"))
    assert ledger.spend("fp", DELTA).epsilon == math.inf
    with pytest.raises(BudgetExceededError, match="--no-dp"):
        ledger.check_budget("fp", [(0.01, 1.0, 1)], DELTA, dataset_budget=100.0)


def test_spend_and_the_hard_stop_compose_alike(tmp_path):
    """`spend` and `cap` (the hard stop's snapshot) share one rule: they cannot drift apart."""
    ledger = BudgetLedger(tmp_path / "l.sqlite")
    planned = [Segment(0.02, 1.0, 30)]
    ledger.record_run("fp", dp_entry("a", [(0.01, 1.0, 200)]))
    extras = (None, dp_entry("b", [], epsilon=0.5, delta=1e-6), plain_entry("c"))
    for extra, method in zip(extras, ("composed", "basic", "exposed"), strict=True):
        if extra is not None:
            ledger.record_run("fp", extra)
        spend = ledger.spend("fp", DELTA, planned)
        assert spend.method == method and ledger.cap("fp", 1.0).epsilon(planned, DELTA) == spend.epsilon
    # A run recorded without segments at ε = ∞: the cap stops at once, spend still composes (and checks δ).
    ledger.record_run("fp2", dp_entry("d", [], epsilon=math.inf))
    assert ledger.cap("fp2", 1.0).epsilon(planned, 2.0) == math.inf == ledger.spend("fp2", DELTA, planned).epsilon
    with pytest.raises(ConfigError, match="--delta"):
        ledger.spend("fp2", 2.0, planned)


def test_check_budget(tmp_path):
    ledger = BudgetLedger(tmp_path / "l.sqlite")
    ledger.record_run("fp", dp_entry("a", [(0.01, 1.0, 1000)]))
    planned = [(0.01, 1.0, 1000)]
    total = composed([(0.01, 1.0, 2000)])
    assert ledger.check_budget("fp", planned, DELTA, dataset_budget=total + 0.01) == pytest.approx(total)
    with pytest.raises(BudgetExceededError, match="--dataset-budget"):
        ledger.check_budget("fp", planned, DELTA, dataset_budget=total - 0.01)
    assert len(ledger.history("fp")) == 1  # checking records nothing


def test_no_training_text_is_stored(tmp_path):
    secret = "Alice's SSN is 078-05-1120"
    data = tmp_path / "data" / "train.jsonl"
    data.parent.mkdir()
    data.write_text(json.dumps({"prompt": secret, "completion": "ok"}) + "\n")
    ledger = BudgetLedger(tmp_path / "ledger" / "l.sqlite")
    ledger.record_run(sha256_file(data), dp_entry("a", [(0.01, 1.0, 10)]))
    stored = b"".join(p.read_bytes() for p in (tmp_path / "ledger").iterdir())
    assert secret.encode() not in stored and b"078-05-1120" not in stored


def test_sha256_file(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_bytes(b'{"text": "a"}\n')
    other = tmp_path / "other.jsonl"
    other.write_bytes(b'{"text": "b"}\n')
    assert sha256_file(path) == hashlib.sha256(b'{"text": "a"}\n').hexdigest()
    assert sha256_file(path) != sha256_file(other)
    big = tmp_path / "big.bin"  # several read chunks
    big.write_bytes(bytes(range(256)) * 20_000)
    assert sha256_file(big) == hashlib.sha256(big.read_bytes()).hexdigest()


def write_many(path: str, worker: int, count: int) -> None:
    ledger = BudgetLedger(path)
    for i in range(count):
        ledger.record_run("fp", dp_entry(f"w{worker}-{i}", [(0.01, 1.0, i + 1)]))


def test_concurrent_writers_lose_nothing(tmp_path):
    path = str(tmp_path / "l.sqlite")
    context = multiprocessing.get_context("fork")
    workers = [context.Process(target=write_many, args=(path, w, 20)) for w in range(8)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=120)
    assert [w.exitcode for w in workers] == [0] * 8
    run_ids = [e.run_id for e in BudgetLedger(path).history("fp")]
    assert sorted(run_ids) == sorted(f"w{w}-{i}" for w in range(8) for i in range(20))
