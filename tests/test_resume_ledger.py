"""`dpft train --resume` and the privacy accounting it resumes: the journal must cover the checkpoint,
and the steps redone after a crash stop at --dataset-budget (the ledger's other runs composed with them).

A crashed run is simulated in-process: `_train_step` raises right after a step's noisy update (the
step touched the data and was journalled), as tests/test_train_e2e.py does.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

import dpft
from dpft.cli.main import app
from dpft.errors import BudgetExceededError, ConfigError
from dpft.hashing import sha256_file
from dpft.ledger import BudgetLedger
from dpft.privacy.accounting import compute_epsilon
from dpft.training import recipe
from helpers import write_records
from test_train_e2e import Crash, base_options


@contextlib.contextmanager
def crash_after(steps: int) -> Iterator[None]:
    """The run inside raises `Crash` right after its `steps`-th step (update done, no metrics row yet)."""
    real, calls = recipe._train_step, {"n": 0}

    def step(*args, **kwargs):
        real(*args, **kwargs)
        calls["n"] += 1
        if calls["n"] == steps:
            raise Crash

    recipe._train_step = step
    try:
        with pytest.raises(Crash):
            yield
    finally:
        recipe._train_step = real


def lines(path: Path) -> list[str]:
    return path.read_text().splitlines(keepends=True) if path.is_file() else []


def checkpoint_step(run: Path) -> int:
    return int((run / "private" / "checkpoints" / "latest").read_text().split("-")[1])


def test_resume_refuses_a_journal_shorter_than_the_checkpoint(tmp_path, tiny_model_dir):
    """A journal lost, or restored from an older copy, would undercount ε: refused, nothing rewritten."""
    data, run = write_records(tmp_path / "d.jsonl"), tmp_path / "run"
    with crash_after(5):
        dpft.train(str(data), str(run), **base_options(tiny_model_dir, checkpoint_every=3))
    journal, metrics = run / "private" / "journal.jsonl", run / "metrics.jsonl"
    assert len(lines(journal)) == 5 and checkpoint_step(run) == 3
    rows = metrics.read_text()
    for kept in (2, 0):  # an older copy of the journal, then none at all
        if kept:
            journal.write_text("".join(lines(journal)[:kept]))
        else:
            journal.unlink()
        with pytest.raises(ConfigError, match=f"journal holds {kept} steps but the checkpoint is at step 3"):
            dpft.train("", "", resume=str(run), quiet=True)
        res = CliRunner().invoke(app, ["train", "--resume", str(run), "--quiet"])
        assert res.exit_code == 2, res.output
        assert "dpft: error:" in res.stderr and "restore the run's complete journal.jsonl" in res.stderr
        assert len(lines(journal)) == kept and metrics.read_text() == rows  # refused before any rewrite
        assert not (run / "privacy.json").exists()


# ---- --dataset-budget across a crash: the redone steps must not take the dataset past it ----

Q, SIGMA, DELTA = 8 / 40, 1.0, 1e-3  # σ given, no target ε: only the dataset budget can stop the run


def between(steps: int) -> float:
    """A dataset budget that `steps` steps at (Q, σ) fit and one more does not."""
    return (compute_epsilon(Q, SIGMA, steps, DELTA) + compute_epsilon(Q, SIGMA, steps + 1, DELTA)) / 2


def options(tiny_model_dir: str, **extra) -> dict:
    return base_options(tiny_model_dir, epsilon=None, noise_multiplier=SIGMA, delta=DELTA, **extra)


def entry_steps(run: Path) -> int:
    [entry] = [e for e in BudgetLedger().history() if e.output == str(run.resolve())]
    return sum(s.steps for s in entry.segments)


def test_steps_redone_after_crashes_stop_at_the_dataset_budget(tmp_path, tiny_model_dir, monkeypatch):
    """2 steps of another run, then 6 planned (8 ≤ budget < 10): two crashes leave 7 journalled steps, 3 of
    them lost, and the resume would redo 3 more (2 + 10 = 12 steps on the dataset). It stops instead."""
    data, run = str(write_records(tmp_path / "d.jsonl")), tmp_path / "run"
    dpft.train(data, str(tmp_path / "other"), **options(tiny_model_dir, max_steps=2))
    budget = between(2 + 7)
    planned = options(tiny_model_dir, max_steps=6, checkpoint_every=3, dataset_budget=budget)
    with crash_after(5):  # journal 5, checkpoint at step 3
        dpft.train(data, str(run), **planned)
    with crash_after(2):  # redoes steps 4 and 5: journal 7 (> the 6 planned), checkpoint still at 3
        dpft.train("", "", resume=str(run), quiet=True)
    journal = run / "private" / "journal.jsonl"
    assert len(lines(journal)) == 7 and checkpoint_step(run) == 3
    real_setup, at_start = recipe.setup, {}

    def setup(config):  # the ledger right after the resume's setup, before any step reads data
        built = real_setup(config)
        at_start["steps"] = entry_steps(run)
        return built

    monkeypatch.setattr(recipe, "setup", setup)
    report = dpft.train("", "", resume=str(run), quiet=True)
    assert at_start["steps"] >= 7  # the journal, not the 6 planned (it was 7 + 3 still planned)
    assert report["steps"] == len(lines(journal)) == 7  # no step fits: 2 + 7 + 1 > the budget
    assert "--dataset-budget" in report["stop_reason"] and report["stop_reason"].startswith("stopped at the")
    spent = BudgetLedger().spend(sha256_file(data), DELTA)
    assert spent.epsilon == pytest.approx(compute_epsilon(Q, SIGMA, 2 + 7, DELTA)) and spent.epsilon <= budget
    assert entry_steps(run) == 7  # the journal's steps, once the run is done


def test_resume_refuses_a_journal_already_over_the_dataset_budget(tmp_path, tiny_model_dir):
    """A run without --dataset-budget (never checked) spent the rest meanwhile: finishing would publish
    a model over the budget, so the resume is refused before anything is rewritten."""
    data, run = str(write_records(tmp_path / "d.jsonl")), tmp_path / "run"
    with crash_after(2):
        dpft.train(data, str(run), **options(tiny_model_dir, max_steps=4, dataset_budget=between(5)))
    dpft.train(data, str(tmp_path / "late"), **options(tiny_model_dir, max_steps=4))  # 4 + 2 > 5 steps
    metrics = (run / "metrics.jsonl").read_text()
    with pytest.raises(BudgetExceededError, match="journal already brings the total ε on this dataset to"):
        dpft.train("", "", resume=str(run), quiet=True)
    res = CliRunner().invoke(app, ["train", "--resume", str(run), "--quiet"])
    assert res.exit_code == 2 and "over --dataset-budget" in res.stderr, res.output
    assert (run / "metrics.jsonl").read_text() == metrics and not (run / "privacy.json").exists()
    assert entry_steps(run) == 4  # still the planned spend: the refused resume recorded nothing
