"""The privacy budget ledger: round trip, composition over runs, refusals, concurrent writers."""

from __future__ import annotations

import math
import multiprocessing

import pytest

from dpft.errors import BudgetExceededError
from dpft.ledger import BudgetLedger, RunEntry, fingerprint_file, fingerprint_records
from dpft.privacy.accounting import PrivacyAccountant

DELTA = 1e-5


def dp_entry(run_id: str, segments, epsilon: float | None = 1.0, delta: float = DELTA):
    return RunEntry(run_id, f"runs/{run_id}", "2025-01-01T00:00:00+00:00", True, epsilon, delta, "pld", segments)


def plain_entry(run_id: str) -> RunEntry:
    return RunEntry(run_id, f"runs/{run_id}", "2025-01-01T00:00:00+00:00", False, None, None, None, [])


def composed(segments) -> float:
    accountant = PrivacyAccountant()
    for q, sigma, count in segments:
        accountant.step(q, sigma, count)
    return accountant.epsilon(DELTA)


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
    assert ledger.spent("other", DELTA) == 0.0


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
    assert ledger.spent("fp", DELTA) == math.inf
    with pytest.raises(BudgetExceededError, match="--no-dp"):
        ledger.check_budget("fp", [(0.01, 1.0, 1)], DELTA, dataset_budget=100.0)


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
    records = [{"prompt": secret, "completion": "ok"}]
    fp = fingerprint_records(records)
    ledger = BudgetLedger(tmp_path / "l.sqlite")
    ledger.record_run(fp, dp_entry("a", [(0.01, 1.0, 10)]))
    stored = b"".join(p.read_bytes() for p in tmp_path.iterdir())
    assert secret.encode() not in stored and b"078-05-1120" not in stored


def test_fingerprints(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_bytes(b'{"text": "a"}\n')
    other = tmp_path / "other.jsonl"
    other.write_bytes(b'{"text": "b"}\n')
    assert fingerprint_file(path) != fingerprint_file(other)
    assert len(fingerprint_file(path)) == 64
    assert fingerprint_records([{"a": 1, "b": 2}]) == fingerprint_records([{"b": 2, "a": 1}])
    assert fingerprint_records([{"a": 1}]) != fingerprint_records([{"a": 2}])


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
