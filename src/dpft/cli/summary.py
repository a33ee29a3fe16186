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
        *_medical_rows(models),
        *_verbatim_rows(models),
        *_secret_rows(models),
        ("MIA AUC (loss)", lambda m: _fmt(_get(m, "audit", "mia", "loss", "auc"))),
        ("MIA AUC (reference)", lambda m: _fmt(_get(m, "audit", "mia", "reference", "auc"))),
        ("canary exposure, 8 reps", lambda m: _fmt(_exposure(m, "8"))),
        ("canary exposure, 16 reps", lambda m: _fmt(_exposure(m, "16"))),
        ("canary exposure, never inserted", lambda m: _fmt(_exposure(m, "0"))),
        ("empirical ε lower bound", _one_run_bound),
        ("compute dtype (what ran)", lambda m: _get(m, "dtype") or "n/a"),
    ]
    for label, cell in rows:
        table.add_row(label, *(cell(m) for m in models.values()))
    Console().print(table)


def _with_ci(d: dict, key: str) -> str:
    ci = d.get(f"{key}_ci")
    return _fmt(d.get(key)) + (f" [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else "")


def _verbatim_rows(models: dict[str, dict]) -> list:
    """Verbatim extraction, when it ran (the demo skips it: its name-prefix attack is the targeted one)."""
    if not any(_get(m, "audit", "verbatim") for m in models.values()):
        return []
    return [
        ("verbatim exact: members", lambda m: _fmt(_get(m, "audit", "verbatim", "exact", "member"), pct=True)),
        ("verbatim exact: non-members", lambda m: _fmt(_get(m, "audit", "verbatim", "exact", "non_member"), pct=True)),
        ("verbatim advantage [95% CI]", lambda m: _with_ci(_get(m, "audit", "verbatim", "exact") or {}, "advantage")),
    ]


def _medical_rows(models: dict[str, dict]) -> list:
    """The medical scenario's name-prefix extraction, when it ran (audit.json holds it under "medical")."""
    if not any(_get(m, "audit", "medical") for m in models.values()):
        return []
    return [
        (
            "name → condition: members",
            lambda m: _fmt(_get(m, "audit", "medical", "extraction", "member_rate"), pct=True),
        ),
        (
            "name → condition: non-members",
            lambda m: _fmt(_get(m, "audit", "medical", "extraction", "non_member_rate"), pct=True),
        ),
        (
            "name → condition advantage [95% CI]",
            lambda m: _with_ci(_get(m, "audit", "medical", "extraction") or {}, "advantage"),
        ),
    ]


def _secret_rows(models: dict[str, dict]) -> list:
    names = list(dict.fromkeys(k for m in models.values() for k in _get(m, "audit", "secrets") or {}))
    rows = []
    for n in names:
        rows += [
            (
                f"secret {n}: extracted, advantage [95% CI]",
                lambda m, n=n: _with_ci(_get(m, "audit", "secrets", n, "extraction") or {}, "advantage"),
            ),
            (f"secret {n}: top-1 rank (m / non-m)", lambda m, n=n: _pair(_get(m, "audit", "secrets", n, "rank") or {})),
        ]
    return rows


def _pair(rank: dict) -> str:
    return f"{_fmt(rank.get('member_top1'), pct=True)} / {_fmt(rank.get('non_member_top1'), pct=True)}"


def _one_run_bound(m: dict) -> str:
    """The one-run bound, with its share of the guarantee and the score the calibration chose."""
    o = _get(m, "audit", "one_run")
    if not isinstance(o, dict):
        return "n/a"
    fraction = o.get("fraction_of_guarantee")
    share = f", {fraction:.0%} of ε" if fraction is not None else ""
    return f"{_fmt(o.get('epsilon_lower_bound'))} ({o.get('score')}, m={o.get('m')}{share})"


def _exposure(m: dict, reps: str) -> Any:
    by_rep = _get(m, "audit", "exposure", "by_repetition")
    if not isinstance(by_rep, dict):
        return None
    entry = by_rep.get(reps)
    return entry.get("mean_exposure") if isinstance(entry, dict) else entry
