"""The batch chosen when none is given: from N and the budget under DP, recorded, and kept on resume."""

from __future__ import annotations

import json

import pytest
import yaml

import dpft
from dpft.training.auto_batch import DP_TARGET_STEPS, MIN_DP_BATCH, NON_PRIVATE_BATCH, auto_batch_size
from helpers import write_records


def test_dp_batch_spends_the_budget_in_the_target_steps():
    n = 40 * DP_TARGET_STEPS  # 5 epochs: a batch of 200 gives the target steps exactly
    assert auto_batch_size(n, 5.0, None, dp=True) == 200
    assert auto_batch_size(n, 10.0, None, dp=True) == 400  # twice the budget: twice the batch, same steps
    # steps fixed by the user: the budget is split into them
    assert auto_batch_size(n, 5.0, DP_TARGET_STEPS // 2, dp=True) == 400


def test_dp_batch_has_a_floor_and_never_exceeds_the_units():
    assert auto_batch_size(1000, 1.0, None, dp=True) == MIN_DP_BATCH
    assert auto_batch_size(MIN_DP_BATCH // 2, 3.0, None, dp=True) == MIN_DP_BATCH // 2
    assert auto_batch_size(1, 3.0, None, dp=True) == 1


def test_non_private_batch_is_the_old_default():
    assert auto_batch_size(10_000, 3.0, None, dp=False) == NON_PRIVATE_BATCH
    assert auto_batch_size(10, 3.0, None, dp=False) == 10


def test_a_run_without_batch_records_the_chosen_one(tmp_path, tiny_model_dir, capsys):
    data = write_records(tmp_path / "d.jsonl", n=40)
    opts = dict(model=tiny_model_dir, micro_batch_size=8, epochs=0.5, lr=1e-2, max_length=64, quiet=True)
    opts |= dict(epsilon=8.0, delta=1e-3, checkpoint_every=0)
    privacy = dpft.train(str(data), str(tmp_path / "run"), **opts)
    chosen = auto_batch_size(40, 0.5, None, dp=True)
    assert privacy["expected_batch_size"] == chosen and privacy["sample_rate"] == pytest.approx(chosen / 40)
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["batch_size"] == chosen
    assert json.loads((tmp_path / "run" / "privacy.json").read_text())["steps"] == 1
    assert f"batch: {chosen} units per step (auto" in capsys.readouterr().err
