"""Resume refuses changed data, changed settings and extra flags; what ships holds no private number."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

import dpft
from dpft.errors import ConfigError, DpftError
from dpft.ledger import BudgetLedger
from dpft.training import recipe
from helpers import public_files, write_records
from test_train_e2e import Crash, base_options


def crashed_run(tmp_path: Path, tiny_model_dir: str, monkeypatch, **extra) -> tuple[Path, Path]:
    """A run killed after its second step, before any checkpoint."""
    data, run = write_records(tmp_path / "d.jsonl", n=20), tmp_path / "run"
    real, calls = recipe._train_step, {"n": 0}

    def crashing(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise Crash
        return real(*args, **kwargs)

    monkeypatch.setattr(recipe, "_train_step", crashing)
    with pytest.raises(Crash):
        dpft.train(str(data), str(run), **base_options(tiny_model_dir, batch_size=4, delta=1e-3, **extra))
    monkeypatch.setattr(recipe, "_train_step", real)
    return data, run


def test_resume_refuses_changed_data(tmp_path, tiny_model_dir, monkeypatch):
    """Bug caught: a resume with 60 records instead of 20 spent more than its target ε (3.81 vs 3.0)."""
    data, run = crashed_run(tmp_path, tiny_model_dir, monkeypatch)
    write_records(data, n=60)
    with pytest.raises(DpftError, match="changed since the run was created"):
        dpft.train("", "", resume=str(run), quiet=True)
    assert not (run / "privacy.json").exists()


def test_resume_refuses_an_edited_config(tmp_path, tiny_model_dir, monkeypatch):
    _, run = crashed_run(tmp_path, tiny_model_dir, monkeypatch, noise_multiplier=2.0, epsilon=None)
    saved = yaml.safe_load((run / "config.yaml").read_text())
    (run / "config.yaml").write_text(yaml.safe_dump({**saved, "noise_multiplier": 0.5}))
    with pytest.raises(DpftError, match="changed since the run was created"):
        dpft.train("", "", resume=str(run), quiet=True)


def test_resume_refuses_other_settings(tmp_path, tiny_model_dir, monkeypatch):
    _, run = crashed_run(tmp_path, tiny_model_dir, monkeypatch)
    with pytest.raises(ConfigError, match="--lr"):
        dpft.train("", "", resume=str(run), quiet=True, lr=0.5)


def test_resume_finishes_and_accounts_the_lost_steps(tmp_path, tiny_model_dir, monkeypatch):
    _, run = crashed_run(tmp_path, tiny_model_dir, monkeypatch, noise_multiplier=1.0, epsilon=None)
    report = dpft.train("", "", resume=str(run), quiet=True)
    assert report["steps"] == 2 + 6 and report["segments"] == [[report["sample_rate"], report["noise_multiplier"], 8]]


def test_target_below_one_step_is_refused_before_anything_is_written(tmp_path, tiny_model_dir, monkeypatch):
    data, run = write_records(tmp_path / "d.jsonl", n=20), tmp_path / "run"
    with pytest.raises(ConfigError, match="single step"):
        dpft.train(str(data), str(run), **base_options(tiny_model_dir, noise_multiplier=0.3, epsilon=0.01))
    assert not run.exists()
    assert BudgetLedger().history() == []


def test_shipped_files_hold_no_private_numbers(tmp_path, tiny_model_dir):
    data, run = write_records(tmp_path / "d.jsonl"), tmp_path / "run"
    dpft.train(str(data), str(run), **base_options(tiny_model_dir))
    rows = [json.loads(r) for r in (run / "metrics.jsonl").read_text().splitlines()]
    assert all(set(r) == {"step", "epsilon", "lr"} for r in rows)
    privacy = json.loads((run / "privacy.json").read_text())
    private_keys = {"data", "sampling_check", "loss", "batch_size", "examples", "seconds", "records", "seed"}
    assert not private_keys & set(privacy)
    log = [json.loads(r) for r in (run / "private" / "train-log.jsonl").read_text().splitlines()]
    assert {"loss", "batch_size", "examples", "seconds"} <= set(log[0])
    shipped = [f.read_bytes() for f in public_files(run)]
    for loss in filter(None, (r["loss"] for r in log)):  # no loss in any shipped file, the model card included
        assert not any(json.dumps(loss).encode() in blob for blob in shipped), loss
    stats = json.loads((run / "private" / "data.json").read_text())
    assert stats["records"] == 40 and "p_value" in stats["sampling_check"]
    assert "keep" in (run / "private" / "README.txt").read_text().lower()
