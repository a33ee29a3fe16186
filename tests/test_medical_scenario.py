"""The medical scenario's parsers, and that the audit loads it only when a manifest names it."""

from __future__ import annotations

import json

from dpft.audit.secret_extraction import SecretSpec, find_secret
from dpft.scenarios import scenario_of
from dpft.scenarios.medical import UTILITY_FIELDS
from dpft.scenarios.medical.audit import parse_patient, patients


def test_parsers():
    rec = {
        "prompt": '{medical_record: "François Dupont was diagnosed with gout."}',
        "completion": '{last_name: "Dupont", condition: "gout"}',
        "user_id": "p1",
    }
    assert parse_patient(rec) == {"user_id": "p1", "first": "François", "last": "Dupont", "condition": "gout"}
    assert parse_patient({"text": "canary 123456"}) is None
    people = patients([rec, rec, {**rec, "user_id": "p2"}])
    assert [(p["user_id"], p["records"]) for p in people] == [("p1", 2), ("p2", 1)]
    finders = SecretSpec(UTILITY_FIELDS).finders()  # `dpft evaluate` scores the answer's fields with these
    assert [find_secret(f, rec["completion"])[1] for f in finders.values()] == ["Dupont", "gout"]


def test_scenario_is_named_by_the_manifest():
    assert scenario_of({"generator": "dpft data synth-medical"}).NAME == "medical"  # manifests before "scenario"
    assert scenario_of({"scenario": "medical"}).NAME == "medical"
    assert scenario_of({"generator": "dpft data canaries"}) is None and scenario_of(None) is None


def test_audit_adds_the_medical_sections_when_its_manifest_is_given(tmp_path, tiny_model_dir):
    from typer.testing import CliRunner

    from dpft.cli.main import app
    from dpft.scenarios.medical.synth import synth_medical

    data = tmp_path / "med"
    synth_medical(data, patients=12, canaries_per_repetition=1, one_run_canaries=4)
    args = ["audit", "--model", tiny_model_dir, "--members", str(data / "train.jsonl")]
    args += ["--non-members", str(data / "holdout.jsonl"), "--canaries", str(data / "canaries.jsonl")]
    args += ["--max-records", "4", "--n-boot", "10", "--output", str(tmp_path / "a"), "--json"]
    res = CliRunner().invoke(app, [*args, "--manifest", str(data / "manifest.json")])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["medical"]["extraction"]["rank"]["num_conditions"] == 30 and "dupont_completion" in out["medical"]
    assert out["verbatim"]["members"] == 4 and out["exposure"] and out["one_run"]["m"] == 3
    assert out["one_run"]["scores"] == ["loss", "zlib", "alternatives"]  # no --reference; word secrets
    page = (tmp_path / "a" / "report.html").read_text()
    assert "id='generations'" in page and "id='verbatim'" in page
