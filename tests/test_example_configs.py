"""Every shipped recipe in examples/configs is a valid `dpft train --config` file."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from dpft.training.config import TrainConfig

CONFIGS = sorted((Path(__file__).parent.parent / "examples" / "configs").glob("*.yaml"))


def test_the_recipes_are_shipped():
    assert {p.stem for p in CONFIGS} >= {"lora-record", "lora-user", "full"}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_config_loads_and_validates(path, tmp_path):
    config = replace(TrainConfig.load(path), data="examples/medical/train.jsonl", output=str(tmp_path / "run"))
    config.validate()
    assert config.unsafe_seed is None and not config.no_dp and config.epsilon is not None
    if config.privacy_unit == "user":
        assert config.micro_batch_size >= config.max_records_per_user  # a user fits in one micro-batch
