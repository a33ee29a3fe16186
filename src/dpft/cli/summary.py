"""Terminal summary table of one or more models' audits (numbers only)."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table


def _fmt(x: Any, pct: bool = False) -> str:
    if x is None:
        return "n/a"
    return f"{x:.1%}" if pct else f"{x:.3g}"


def _get(d: dict | None, *keys: str) -> Any:
    for k in keys:
        if not isinstance(d, dict):
            return None
        d = d.get(k)
    return d


def print_summary(models: dict[str, dict]) -> None:
    """One column per model: guarantee, utility, extraction, MIA, exposure, empirical ε, dtype."""
    table = Table(title="dpft: what each model leaks")
    table.add_column("metric")
    for name in models:
        table.add_column(name, justify="right")
    rows = [
        ("ε (theory)", lambda m: _fmt(_get(m, "privacy", "epsilon")) if _get(m, "privacy", "dp") else "∞ (no DP)"),
        ("full-answer exact match", lambda m: _fmt(_get(m, "utility", "exact_match", "full"), pct=True)),
        ("extraction: members", lambda m: _fmt(_get(m, "audit", "extraction", "member_rate"), pct=True)),
        ("extraction: non-members", lambda m: _fmt(_get(m, "audit", "extraction", "non_member_rate"), pct=True)),
        ("extraction advantage [95% CI]", _advantage),
        ("MIA AUC (loss)", lambda m: _fmt(_get(m, "audit", "mia", "loss", "auc"))),
        ("MIA AUC (reference)", lambda m: _fmt(_get(m, "audit", "mia", "reference", "auc"))),
        ("canary exposure, 8 reps", lambda m: _fmt(_exposure(m, "8"))),
        ("canary exposure, 16 reps", lambda m: _fmt(_exposure(m, "16"))),
        ("canary exposure, never inserted", lambda m: _fmt(_exposure(m, "0"))),
        ("empirical ε lower bound", lambda m: _fmt(_get(m, "audit", "one_run", "epsilon_lower_bound"))),
        ("compute dtype (what ran)", lambda m: _get(m, "dtype") or "n/a"),
    ]
    for label, cell in rows:
        table.add_row(label, *(cell(m) for m in models.values()))
    Console().print(table)


def _advantage(m: dict) -> str:
    adv, ci = _get(m, "audit", "extraction", "advantage"), _get(m, "audit", "extraction", "advantage_ci")
    return _fmt(adv) + (f" [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else "")


def _exposure(m: dict, reps: str) -> Any:
    by_rep = _get(m, "audit", "exposure", "by_repetition")
    if not isinstance(by_rep, dict):
        return None
    entry = by_rep.get(reps)
    return entry.get("mean_exposure") if isinstance(entry, dict) else entry
