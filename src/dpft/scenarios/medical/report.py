"""The medical scenario's report sections: targeted extraction and Dupont's generation."""

from __future__ import annotations

from dpft.audit.html import e, get, pair, section, table
from dpft.scenarios.medical.records import DUPONT, name_prefix

SECTION_IDS = ("extraction", "generations")


def extraction_section(models: dict) -> str:
    reps = sorted({int(k) for m in models.values() for k in (_extraction(m).get("by_repetition") or {})})
    ranked = any(_extraction(m).get("rank") for m in models.values())
    header = [
        "model",
        "members",
        "non-members (baseline)",
        "advantage",
        "95% CI",
        *[f"{r} record(s)" for r in reps],
        *(["mean rank (m / non-m)", "top-1 (m / non-m)"] if ranked else []),
    ]
    rows = []
    for name, m in models.items():
        x = _extraction(m)
        by, rank = x.get("by_repetition") or {}, x.get("rank") or {}
        rows.append(
            [
                name,
                x.get("member_rate"),
                x.get("non_member_rate"),
                x.get("advantage"),
                x.get("advantage_ci"),
                *[get(by, str(r), "rate") for r in reps],
                *(
                    [
                        pair(rank, "member_mean_rank", "non_member_mean_rank"),
                        pair(rank, "member_top1", "non_member_top1"),
                    ]
                    if ranked
                    else []
                ),
            ]
        )
    note = (
        "<p>Medical scenario: rate at which greedy decoding after a patient's name prefix names their true "
        "condition, by number of the patient's records in training.</p>"
    )
    return section("extraction", "Targeted extraction (medical scenario)", note, table(header, rows))


def generations_section(models: dict) -> str:
    prompt = name_prefix(*DUPONT)
    cols = "".join(
        f"<div><h3>{e(name)}</h3><pre>{e(prompt)}"
        f"<b>{e(get(m, 'audit', 'medical', 'dupont_completion') or '(not generated)')}</b></pre></div>"
        for name, m in models.items()
    )
    note = f"<p>Greedy continuation of the name prefix of {e(' '.join(DUPONT))}, a training patient.</p>"
    return section("generations", "Generations", note, f"<div class='gen'>{cols}</div>")


REPORT_SECTIONS = (extraction_section, generations_section)


def _extraction(m: dict) -> dict:
    return get(m, "audit", "medical", "extraction") or {}
