"""The demo end to end on a tiny model: data → two runs → assessments → one report."""

from __future__ import annotations

import json

import pytest

from dpft.demo import DemoOptions, dp_batch, run_demo
from dpft.errors import DpftError

SECTIONS = ("summary", "training", "utility", "extraction", "exposure", "mia", "epsilon", "generations")


def test_demo_on_a_tiny_model(tmp_path, tiny_model_dir, capsys):
    opts = DemoOptions(
        output=str(tmp_path / "demo"),
        model=tiny_model_dir,
        patients=16,
        epochs=1,
        dp_epochs=1,
        lora_layers=1,
        batch_size=6,
        dp_batch_size=6,
        audit_records=8,
        exposure_candidates=40,
        one_run_canaries=20,
        quiet=True,
    )
    models = run_demo(opts)
    assert set(models) == {"non-private", "dp"}
    assert models["non-private"]["privacy"]["dp"] is False
    dp = models["dp"]["privacy"]
    assert dp["dp"] is True and dp["privacy_unit"] == "user" and 0 < dp["epsilon"] <= 8.0
    assert dp["randomness"] == "os-entropy"  # the demo's DP model: secret sampling and noise
    assert dp["max_records_per_user"] == opts.dp_records_per_patient  # the records each patient gives
    page = (tmp_path / "demo" / "report.html").read_text()
    for section in SECTIONS:
        assert f"id='{section}'" in page or f'id="{section}"' in page
    assert "loss on ALL tokens" in page
    for name in ("non-private", "dp"):
        audit = json.loads((tmp_path / "demo" / "runs" / name / "assessment.json").read_text())["audit"]
        assert audit["theoretical_epsilon"] == models[name]["privacy"]["epsilon"]
        one_run = audit["one_run"]  # 20 canaries: 5 choose the score and split, 15 are tested once
        assert (one_run["canaries"], one_run["m"], one_run["calibration"]["canaries"]) == (20, 15, 5)
        assert one_run["scores"] == ["reference", "loss", "zlib"]  # the demo skips the alternatives' cost
    assert models["dp"]["audit"]["one_run"]["fraction_of_guarantee"] <= 1.0
    assert "bound / guarantee" in page and "20 one-run canaries (rare-prefix)" in page
    assert "what each model leaks" in capsys.readouterr().out
    # A re-run reuses every finished piece; other settings in the same folder are refused.
    assert run_demo(opts)["dp"]["privacy"] == dp
    with pytest.raises(DpftError, match="other settings"):
        run_demo(DemoOptions(**{**opts.__dict__, "epochs": 2}))


def test_the_dp_batch_follows_the_number_of_people():
    """Unset, the DP batch keeps the expected steps as one-run canaries (one person each) are added."""
    assert dp_batch(DemoOptions(), 372) == 64  # the demo before its 1000 canaries
    assert dp_batch(DemoOptions(), 743) == 128  # 300 patients' 240 members, canary owners
    assert dp_batch(DemoOptions(), 992) == 171  # 600 patients' 480 members, canary owners
    assert dp_batch(DemoOptions(dp_epochs=2.5), 743) == 64
    assert dp_batch(DemoOptions(dp_batch_size=7), 743) == 7


def test_the_demo_refuses_no_records_per_patient_before_it_starts(tmp_path):
    from typer.testing import CliRunner

    from dpft.cli.main import app

    out = tmp_path / "demo"
    res = CliRunner().invoke(app, ["demo", "--output", str(out), "--dp-records-per-patient", "0"])
    assert res.exit_code == 2 and "--dp-records-per-patient" in res.output and "Traceback" not in res.output
    assert not out.exists()  # refused before the data or the first fine-tune
