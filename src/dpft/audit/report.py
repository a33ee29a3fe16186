"""A self-contained HTML report comparing one or more audited models.

No external assets: CSS is inline and plots are PNGs embedded as base64. Every value that
comes from results is HTML-escaped. The only section with model text is `generations`.
"""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path

from matplotlib.figure import Figure

SECTION_IDS = ("summary", "training", "utility", "extraction", "exposure", "mia", "epsilon", "generations")
_DUPONT_PREFIX = '{medical_record: "François Dupont'
_CSS = """body{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}
table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:.3em .6em}
th{background:#f3f3f3}pre{white-space:pre-wrap;background:#f7f7f7;padding:.6em}
.gen{display:flex;gap:1em}.gen>div{flex:1}"""


def write_report(path, sections: dict) -> None:
    """Write the HTML report.

    Args:
        path: output file.
        sections: {"title": optional str, "notes": optional list of str (plain-text paragraphs
            under the title, e.g. the training setting), "models": {name: {"audit": run_audit output,
            "utility": evaluate_utility output, "metrics": list of metrics.jsonl rows
            (with "step" and "loss" and/or "epsilon"), "privacy": privacy.json content, "dtype": the
            compute dtype the model ran in, e.g. "fp32"}}};
            any part may be missing and its cells then read "n/a".

    Returns:
        None; the file is written (parent folders created).
    """
    models = sections.get("models", {})
    title = sections.get("title", "dpft audit report")
    notes = "".join(f"<p class='note'>{_e(n)}</p>" for n in sections.get("notes", []))
    body = [
        _summary(models),
        _training(models),
        _utility(models),
        _extraction(models),
        _exposure(models),
        _mia(models),
        _epsilon(models),
        _generations(models),
    ]
    page = (
        f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{_e(title)}</title>"
        f"<style>{_CSS}</style></head><body><h1>{_e(title)}</h1>{notes}{''.join(body)}</body></html>"
    )
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(page, encoding="utf-8")


def _e(x) -> str:
    return html.escape(str(x))


def _fmt(x) -> str:
    if x is None:
        return "n/a"
    if isinstance(x, float):
        return f"{x:.3g}"
    if isinstance(x, list) and len(x) == 2:
        return f"[{_fmt(x[0])}, {_fmt(x[1])}]"
    return _e(x)


def _get(d: dict | None, *keys):
    """d[k1][k2]... or None when any level is missing."""
    for k in keys:
        if not isinstance(d, dict) or d.get(k) is None:
            return None
        d = d[k]
    return d


def _section(sid: str, title: str, *parts: str) -> str:
    return f"<section id='{sid}'><h2>{_e(title)}</h2>{''.join(parts)}</section>"


def _table(header: list[str], rows: list[list]) -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{_fmt(c)}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _png(fig: Figure, alt: str) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    data = base64.b64encode(buf.getvalue()).decode("ascii")
    return f"<img alt='{_e(alt)}' src='data:image/png;base64,{data}'>"


def _theoretical(m: dict):
    eps = _get(m, "privacy", "epsilon")
    return eps if eps is not None else _get(m, "audit", "theoretical_epsilon")


def _summary(models: dict) -> str:
    rows = [
        [
            name,
            _theoretical(m),
            _get(m, "audit", "one_run", "epsilon_lower_bound"),
            _get(m, "utility", "exact_match", "full"),
            _get(m, "audit", "extraction", "advantage"),
            _get(m, "audit", "mia", "loss", "auc"),
            _get(m, "dtype"),
        ]
        for name, m in models.items()
    ]
    return _section(
        "summary",
        "Summary",
        _table(
            [
                "model",
                "ε (guarantee)",
                "ε lower bound (audit)",
                "task exact match",
                "extraction advantage",
                "MIA AUC (loss)",
                "compute dtype",
            ],
            rows,
        ),
    )


def _training(models: dict) -> str:
    fig = Figure(figsize=(10, 3.5), layout="constrained")
    ax_loss, ax_eps = fig.subplots(1, 2)
    plotted = False
    for name, m in models.items():
        rows = m.get("metrics") or []
        for ax, key in ((ax_loss, "loss"), (ax_eps, "epsilon")):
            pts = [(r["step"], r[key]) for r in rows if r.get(key) is not None and "step" in r]
            if pts:
                ax.plot(*zip(*pts, strict=True), label=name)
                plotted = True
    for ax, label in ((ax_loss, "training loss"), (ax_eps, "ε spent")):
        ax.set_xlabel("step")
        ax.set_ylabel(label)
        if ax.lines:
            ax.legend()
    body = _png(fig, "training loss and epsilon") if plotted else "<p>No training metrics.</p>"
    return _section("training", "Training", body)


def _utility(models: dict) -> str:
    rows = [
        [
            name,
            _get(m, "utility", "exact_match", "last_name"),
            _get(m, "utility", "exact_match", "condition"),
            _get(m, "utility", "exact_match", "full"),
            _get(m, "utility", "valid_format"),
            _get(m, "utility", "loss"),
            _get(m, "utility", "perplexity"),
            _get(m, "utility", "records"),
        ]
        for name, m in models.items()
    ]
    full = {name: _get(m, "utility", "exact_match", "full") for name, m in models.items()}
    ratio = (
        f"<p>Full-answer exact match, DP / non-private: {_fmt(full['dp'] / full['non-private'])}</p>"
        if full.get("dp") is not None and full.get("non-private")
        else ""
    )
    return _section(
        "utility",
        "Task utility (held-out records)",
        _table(
            ["model", "last name", "condition", "full answer", "valid format", "loss", "perplexity", "records"], rows
        ),
        ratio,
    )


def _extraction(models: dict) -> str:
    reps = sorted({int(k) for m in models.values() for k in (_get(m, "audit", "extraction", "by_repetition") or {})})
    ranked = any(_get(m, "audit", "extraction", "rank") for m in models.values())
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
        x = _get(m, "audit", "extraction") or {}
        by = x.get("by_repetition") or {}
        rank = x.get("rank") or {}
        rows.append(
            [
                name,
                x.get("member_rate"),
                x.get("non_member_rate"),
                x.get("advantage"),
                x.get("advantage_ci"),
                *[_get(by, str(r), "rate") for r in reps],
                *(
                    [_pair(rank, "member_mean_rank", "non_member_mean_rank"), _pair(rank, "member_top1", "non_member_top1")]
                    if ranked
                    else []
                ),
            ]
        )
    note = (
        "<p>Rate at which greedy decoding after a patient's name prefix names their true "
        "condition, by number of the patient's records in training.</p>"
    )
    return _section("extraction", "Targeted extraction", note, _table(header, rows))


def _pair(d: dict, a: str, b: str) -> str:
    return f"{_fmt(d.get(a))} / {_fmt(d.get(b))}"


def _exposure(models: dict) -> str:
    fig = Figure(figsize=(6, 3.5), layout="constrained")
    ax = fig.subplots()
    rows = []
    for name, m in models.items():
        by = _get(m, "audit", "exposure", "by_repetition") or {}
        pts = sorted((int(k), v["mean_exposure"]) for k, v in by.items())
        rows += [[name, k, by[str(k)]["canaries"], v] for k, v in pts]
        if pts:
            ax.plot(*zip(*pts, strict=True), marker="o", label=name)
    if not rows:
        return _section("exposure", "Canary exposure", "<p>No exposure canaries.</p>")
    ax.set_xlabel("insertions of the canary")
    ax.set_ylabel("mean exposure (bits)")
    ax.legend()
    return _section(
        "exposure",
        "Canary exposure",
        _png(fig, "exposure by repetition"),
        _table(["model", "insertions", "canaries", "mean exposure (bits)"], rows),
    )


def _mia(models: dict) -> str:
    fig = Figure(figsize=(4 * max(len(models), 1), 3.8), layout="constrained")
    axes = fig.subplots(1, max(len(models), 1), squeeze=False)[0]
    rows, missing = [], set()
    for ax, (name, m) in zip(axes, models.items(), strict=False):
        for score, r in (_get(m, "audit", "mia") or {}).items():
            ax.plot(r["roc"]["fpr"], r["roc"]["tpr"], label=f"{score} (AUC {r['auc']:.2f})")
            rows.append([name, score, r["auc"], r["auc_ci"], r["tpr_at_fpr"].get("0.01"), r["tpr_at_fpr"].get("0.001")])
            missing |= {f"TPR @ {float(level):.1%} FPR: {why}" for level, why in r.get("tpr_at_fpr_missing", {}).items()}
        ax.plot([1e-4, 1], [1e-4, 1], "k:", linewidth=0.8)
        ax.set(
            xscale="log",
            yscale="log",
            xlim=(1e-3, 1),
            ylim=(1e-3, 1.05),
            title=name,
            xlabel="false positive rate",
            ylabel="true positive rate",
        )
        if len(ax.lines) > 1:
            ax.legend(fontsize=7)
    if not rows:
        return _section("mia", "Membership inference", "<p>Not measured.</p>")
    return _section(
        "mia",
        "Membership inference",
        _png(fig, "ROC curves"),
        _table(["model", "score", "AUC", "AUC 95% CI", "TPR @ 1% FPR", "TPR @ 0.1% FPR"], rows),
        *(f"<p>Not reported: {html.escape(m)}.</p>" for m in sorted(missing)),
    )


def _epsilon(models: dict) -> str:
    rows = []
    for name, m in models.items():
        o = _get(m, "audit", "one_run") or {}
        rows.append(
            [
                name,
                _theoretical(m),
                o.get("epsilon_lower_bound"),
                o.get("m"),
                o.get("guesses"),
                o.get("correct"),
                o.get("delta"),
                o.get("correction"),
            ]
        )
    note = (
        "<p>Empirical lower bound from one training run (Steinke, Nasr &amp; Jagielski "
        "2023), 95% confidence: a DP guarantee below it would be refuted.</p>"
    )
    return _section(
        "epsilon",
        "Empirical ε vs guarantee",
        note,
        _table(
            ["model", "ε (guarantee)", "ε lower bound", "canaries", "guesses", "correct", "δ", "multiple testing"], rows
        ),
    )


def _generations(models: dict) -> str:
    cols = "".join(
        f"<div><h3>{_e(name)}</h3><pre>{_e(_DUPONT_PREFIX)}"
        f"<b>{_e(_get(m, 'audit', 'dupont_completion') or '(not generated)')}</b></pre></div>"
        for name, m in models.items()
    )
    note = "<p>Greedy continuation of the name prefix of François Dupont, a training patient.</p>"
    return _section("generations", "Generations", note, f"<div class='gen'>{cols}</div>")
