"""The dataset budget ledger, through training runs and the CLI."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

import dpft
from dpft.cli.main import app
from dpft.errors import BudgetExceededError
from dpft.privacy.accounting import Segment, epsilon_of
from test_train_e2e import base_options, write_records


def test_second_run_refused_and_ledger_composes(tmp_path, tiny_model_dir):
    data = str(write_records(tmp_path / "d.jsonl"))
    first = dpft.train(data, str(tmp_path / "a"), **base_options(tiny_model_dir, epsilon=2.0, dataset_budget=2.5))
    with pytest.raises(BudgetExceededError, match="--dataset-budget"):
        dpft.train(data, str(tmp_path / "b"), **base_options(tiny_model_dir, epsilon=2.0, dataset_budget=2.5))
    assert not (tmp_path / "b").exists()  # refused before anything was written
    res = CliRunner().invoke(app, ["ledger", "show", "--data", data, "--delta", "1e-3", "--json"])
    assert res.exit_code == 0, res.output
    shown = json.loads(res.stdout)
    assert len(shown["runs"]) == 1 and shown["runs"][0]["epsilon"] == pytest.approx(first["epsilon"])
    journal = [Segment(first["sample_rate"], first["noise_multiplier"], first["steps"])]
    assert shown["total_epsilon"] == pytest.approx(epsilon_of(journal, 1e-3))


def test_non_private_run_exposes_the_dataset(tmp_path, tiny_model_dir):
    data = str(write_records(tmp_path / "d.jsonl"))
    dpft.train(data, str(tmp_path / "plain"), **base_options(tiny_model_dir, no_dp=True, max_steps=1))
    with pytest.raises(BudgetExceededError, match="non-private"):
        dpft.train(data, str(tmp_path / "dp"), **base_options(tiny_model_dir, dataset_budget=100.0))
    res = CliRunner().invoke(app, ["ledger", "show", "--data", data, "--json"])
    assert json.loads(res.stdout)["exposed"] is True


def test_a_user_level_run_is_refused_after_a_record_level_one(tmp_path, tiny_model_dir):
    data = str(write_records(tmp_path / "d.jsonl"))
    dpft.train(data, str(tmp_path / "a"), **base_options(tiny_model_dir, max_steps=1, dataset_budget=50.0))
    user = dict(privacy_unit="user", batch_size=4, delta=1e-2, max_steps=1)
    with pytest.raises(BudgetExceededError, match=r"privacy unit 'user': run \w+ on this dataset is 'record'-level"):
        dpft.train(data, str(tmp_path / "b"), **base_options(tiny_model_dir, dataset_budget=50.0, **user))
    assert not (tmp_path / "b").exists()  # refused before anything was written
    # Without a dataset budget nothing is composed, so nothing is refused; the ledger shows each unit.
    dpft.train(data, str(tmp_path / "c"), **base_options(tiny_model_dir, max_records_per_user=3, **user))
    shown = CliRunner().invoke(app, ["ledger", "show", "--data", data])
    assert shown.exit_code == 0, shown.output
    assert [line.split("  ")[3] for line in shown.stdout.splitlines()[:2]] == ["per record", "per user (≤ 3 records)"]
    runs = json.loads(CliRunner().invoke(app, ["ledger", "show", "--data", data, "--json"]).stdout)["runs"]
    assert [(r["privacy_unit"], r["max_records_per_user"]) for r in runs] == [("record", None), ("user", 3)]
