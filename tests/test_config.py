"""Configuration: every problem reported at once, in flag names; YAML round-trip."""

from __future__ import annotations

import pytest

from dpft.errors import ConfigError
from dpft.training.config import TrainConfig


def test_all_problems_reported_at_once():
    cfg = TrainConfig(data="", output="", epsilon=-1, delta=1.5, batch_size=0, accountant="moments", max_grad_norm=0)
    with pytest.raises(ConfigError) as err:
        cfg.validate()
    msg = str(err.value)
    for flag in ("--data", "--output", "--epsilon", "--delta", "--batch-size", "--accountant", "--max-grad-norm"):
        assert flag in msg
    assert "\n" not in msg


def test_no_privacy_setting_is_refused():
    with pytest.raises(ConfigError, match="--noise-multiplier"):
        TrainConfig(data="d", output="o", epsilon=None).validate()


def test_yaml_round_trip_and_unknown_keys(tmp_path):
    cfg = TrainConfig(data="d.jsonl", output="out", epsilon=3.0, lora_targets="all-linear")
    cfg.save(tmp_path / "c.yaml")
    assert TrainConfig.load(tmp_path / "c.yaml") == cfg
    (tmp_path / "bad.yaml").write_text("data: d.jsonl\nepsilom: 3\n")
    with pytest.raises(ConfigError, match="epsilom"):
        TrainConfig.load(tmp_path / "bad.yaml")
