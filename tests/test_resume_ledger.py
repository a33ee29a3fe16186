"""`dpft train --resume` and the privacy accounting it resumes: the journal must cover the checkpoint.

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
from dpft.errors import ConfigError
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
