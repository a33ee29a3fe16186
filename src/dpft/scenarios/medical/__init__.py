"""The medical scenario: synthetic patient records, their conditions, and François Dupont.

`synth.py` writes the data (`dpft data synth-medical`), `records.py` names the record format,
`audit.py` adds the name-prefix → condition attack, `report.py` its report sections. The
generic audit never imports this package; `dpft.scenarios.scenario_of` loads it when a
synth-medical manifest is given.
"""

from __future__ import annotations

from collections.abc import Sequence

from dpft.scenarios.medical.audit import medical_audit
from dpft.scenarios.medical.records import ANSWER_FIELDS
from dpft.scenarios.medical.report import REPORT_SECTIONS

NAME = "medical"
UTILITY_FIELDS = ANSWER_FIELDS


def audit(model, tokenizer, members: Sequence[dict], non_members: Sequence[dict], manifest: dict, **options) -> dict:
    """The scenario's sections of audit.json (`medical_audit`), with the manifest's condition list."""
    conditions = [c["name"] for c in manifest.get("conditions") or [] if isinstance(c, dict) and "name" in c]
    return medical_audit(model, tokenizer, members, non_members, conditions or None, **options)


__all__ = ["NAME", "REPORT_SECTIONS", "UTILITY_FIELDS", "audit", "medical_audit"]
