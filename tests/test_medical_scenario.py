"""The medical scenario's parsers, and that the audit loads it only when a manifest names it."""

from __future__ import annotations

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
