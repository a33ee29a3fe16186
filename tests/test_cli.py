"""The CLI: user mistakes are one line on stderr with exit code 2, never a traceback."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from dpft.cli.main import app
from dpft.privacy.accounting import compute_epsilon

runner = CliRunner()


def test_account_epsilon_json():
    res = runner.invoke(
        app,
        [
            "account",
            "--sample-rate",
            "0.01",
            "--noise-multiplier",
            "4",
            "--steps",
            "10000",
            "--delta",
            "1e-5",
            "--json",
        ],
    )
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert out["epsilon"] == pytest.approx(compute_epsilon(0.01, 4, 10000, 1e-5))
    assert out["epsilon"] == pytest.approx(0.947, rel=0.01)


def test_account_target_epsilon_json():
    res = runner.invoke(
        app,
        ["account", "--sample-rate", "0.04", "--steps", "2000", "--delta", "1e-5", "--target-epsilon", "8", "--json"],
    )
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert out["epsilon"] <= 8.0 and out["epsilon"] == pytest.approx(8.0, rel=0.02)


def test_account_needs_exactly_one_of_sigma_or_target():
    res = runner.invoke(app, ["account", "--sample-rate", "0.01", "--steps", "10"])
    assert res.exit_code == 2 and "--target-epsilon" in res.stderr


def test_train_bad_options_one_line_exit_2(tmp_path):
    res = runner.invoke(
        app,
        [
            "train",
            "--data",
            str(tmp_path / "missing.jsonl"),
            "--output",
            str(tmp_path / "o"),
            "--epsilon",
            "-1",
            "--delta",
            "2",
        ],
    )
    assert res.exit_code == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "--epsilon" in lines[0] and "--delta" in lines[0]
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_missing_data_file_real_process(tmp_path):
    """A real process: exit code 2, one line naming the file, no traceback."""
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "dpft.cli.main",
            "train",
            "--data",
            str(tmp_path / "nope.jsonl"),
            "--output",
            str(tmp_path / "o"),
            "--quiet",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert "nope.jsonl" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_yaml_config_with_flag_override(tmp_path):
    (tmp_path / "c.yaml").write_text("data: d.jsonl\noutput: o\nepsilon: -5\n")
    res = runner.invoke(app, ["train", "--config", str(tmp_path / "c.yaml"), "--delta", "3"])
    assert res.exit_code == 2
    assert "--epsilon" in res.stderr and "--delta" in res.stderr  # YAML value and flag both checked


def test_synth_medical_takes_record_counts_and_canaries(tmp_path):
    out = tmp_path / "med"
    args = ["data", "synth-medical", "--output", str(out), "--patients", "20", "--one-run-canaries", "4"]
    res = runner.invoke(app, [*args, "--records-per-patient", "1,2", "--canaries-per-repetition", "1"])
    assert res.exit_code == 0, res.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["options"]["records_per_patient"] == [1, 2]
    assert manifest["options"]["canaries_per_repetition"] == 1
    bad = runner.invoke(app, [*args, "--records-per-patient", "1,x"])
    assert bad.exit_code == 2 and "--records-per-patient" in bad.output and "Traceback" not in bad.output
