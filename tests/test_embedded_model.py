"""The embedded SmolLM2-135M-Instruct: conversion sanity, then a few real DP steps and a generation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import dpft
from dpft.generate import generate_text
from dpft.models import load_base_model, load_run_model

pytestmark = pytest.mark.slow
EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "medical"


def test_converted_model_answers_sensibly():
    loaded = load_base_model()
    answer = generate_text(loaded.model, loaded.tokenizer, chat="What is the capital of France?", max_new_tokens=12)
    assert "Paris" in answer


def test_few_dp_steps_then_generate(tmp_path):
    report = dpft.train(
        str(EXAMPLES / "train.jsonl"),
        str(tmp_path / "run"),
        epsilon=8.0,
        max_steps=2,
        batch_size=4,
        micro_batch_size=4,
        max_length=64,
        quiet=True,
    )
    assert report["dp"] and 0 < report["epsilon"] <= 8.0 and report["steps"] == 2
    privacy = json.loads((tmp_path / "run" / "privacy.json").read_text())
    assert privacy["accountant"] == "pld" and privacy["sampling"] == "poisson"
    trained = load_run_model(tmp_path / "run")
    text = generate_text(
        trained.model, trained.tokenizer, prompt='{medical_record: "François Dupont', max_new_tokens=16
    )
    assert text.strip() and "\ufffd" not in text  # real text, no broken bytes
