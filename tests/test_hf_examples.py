"""The Trainer / TRL example scripts run end to end on the tiny model (a smoke test)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).parent.parent / "examples"


def load(name: str):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def small_data(path: Path) -> Path:
    lines = (EXAMPLES / "medical" / "train.jsonl").read_text().splitlines()[:40]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.usefixtures("one_torch_thread")
def test_hf_trainer_example(tmp_path, tiny_model_dir):
    args = ["--model", tiny_model_dir, "--data", str(small_data(tmp_path / "d.jsonl")), "--output", str(tmp_path / "run"),
            "--max-steps", "2", "--batch-size", "8", "--micro-batch-size", "4", "--delta", "1e-3", "--unsafe-seed", "1"]  # fmt: skip
    report = load("hf_trainer").main(args)
    assert report["steps"] == 2 and report["epsilon"] <= 8.0
    assert json.loads((tmp_path / "run" / "privacy.json").read_text()) == report


@pytest.mark.usefixtures("one_torch_thread")
def test_trl_sft_example(tmp_path, tiny_model_dir):
    pytest.importorskip("trl")
    args = ["--model", tiny_model_dir, "--data", str(EXAMPLES / "chat.jsonl"), "--output", str(tmp_path / "run"),
            "--max-steps", "2", "--batch-size", "4", "--micro-batch-size", "4", "--delta", "1e-2", "--unsafe-seed", "1"]  # fmt: skip
    report = load("trl_sft").main(args)
    assert report["steps"] == 2 and report["sampling"] == "poisson" and report["trainer"] == "DPSFTTrainer"
