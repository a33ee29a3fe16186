"""A self-contained HTML report comparing one or more audited models.

No external assets: CSS is inline and plots are PNGs embedded as base64. Every value that
comes from results is HTML-escaped. The sections are generic (any data); a scenario adds its
own (e.g. the medical scenario's targeted extraction and generations) through `extra`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

from matplotlib.figure import Figure

from dpft.audit.html import e as _e
from dpft.audit.html import fmt as _fmt
from dpft.audit.html import get as _get
from dpft.audit.html import pair as _pair
from dpft.audit.html import png as _png
from dpft.audit.html import section as _section
from dpft.audit.html import table as _table

SECTION_IDS = ("summary", "training", "utility", "verbatim", "secrets", "exposure", "mia", "epsilon")
_CSS = """body{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}
table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:.3em .6em}
th{background:#f3f3f3}pre{white-space:pre-wrap;background:#f7f7f7;padding:.6em}
.gen{display:flex;gap:1em}.gen>div{flex:1}"""


def write_report(path, sections: dict, extra: Sequence[Callable[[dict], str]] = ()) -> None:
    """Write the HTML report.

    Args:
        path: output file.
        sections: {"title": optional str, "notes": optional list of str (plain-text paragraphs
            under the title, e.g. the training setting), "models": {name: {"audit": run_audit output,
            "utility": evaluate_utility output, "metrics": list of metrics.jsonl rows
            (with "step" and "loss" and/or "epsilon"), "privacy": privacy.json content, "dtype": the
            compute dtype the model ran in, e.g. "fp32"}}};
            any part may be missing and its cells then read "n/a".
        extra: scenario sections, each a function of the models returning HTML (built with
            `dpft.audit.html`), placed after the generic sections.

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
        _verbatim(models),
        _secrets(models),
        _exposure(models),
        _mia(models),
        _epsilon(models),
        *(render(models) for render in extra),
    ]
    page = (
        f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{_e(title)}</title>"
        f"<style>{_CSS}</style></head><body><h1>{_e(title)}</h1>{notes}{''.join(body)}</body></html>"
    )
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(page, encoding="utf-8")


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
            _get(m, "audit", "verbatim", "exact", "advantage"),
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
                "verbatim extraction advantage",
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
    fields = list(dict.fromkeys(f for m in models.values() for f in _get(m, "utility", "fields") or []))
    rows = [
        [
            name,
            *[_get(m, "utility", "exact_match", f) for f in fields],
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
        _table(["model", *fields, "full answer", "valid format", "loss", "perplexity", "records"], rows),
        ratio,
    )


def _verbatim(models: dict) -> str:
    rows = []
    for name, m in models.items():
        v = _get(m, "audit", "verbatim") or {}
        for metric in ("exact", "lcs", "token_overlap"):
            r = v.get(metric) or {}
            rows.append([name, metric, r.get("member"), r.get("non_member"), r.get("advantage"), r.get("advantage_ci")])
    note = (
        "<p>Greedy continuation of each record's prompt (text records: its first half) against the true "
        "continuation: exact reproduction, longest common substring (share of the continuation), shared "
        "words. Non-members show what knowing the data's form alone gives.</p>"
    )
    header = ["model", "measure", "members", "non-members (baseline)", "advantage", "95% CI"]
    return _section("verbatim", "Verbatim extraction", note, _table(header, rows))


def _secrets(models: dict) -> str:
    rows = []
    for name, m in models.items():
        for secret, r in (_get(m, "audit", "secrets") or {}).items():
            x, rank = r.get("extraction") or {}, r.get("rank") or {}
            rows.append(
                [
                    name,
                    secret,
                    _pair(x, "member", "non_member"),
                    x.get("advantage_ci"),
                    _pair(rank, "member_mean_rank", "non_member_mean_rank"),
                    _pair(rank, "member_top1", "non_member_top1"),
                    rank.get("top1_advantage_ci"),
                    rank.get("candidates"),
                ]
            )
    if not rows:
        return _section("secrets", "Targeted secrets", "<p>No secret named (--secret-field, --secret-pattern).</p>")
    header = [
        "model",
        "secret",
        "extracted (m / non-m)",
        "advantage 95% CI",
        "mean rank (m / non-m)",
        "top-1 (m / non-m)",
        "top-1 advantage 95% CI",
        "candidates",
    ]
    note = (
        "<p>Prompted with the record up to the secret: how often greedy decoding outputs it, and its rank "
        "among other records' secrets by likelihood (1 = most likely).</p>"
    )
    return _section("secrets", "Targeted secrets", note, _table(header, rows))


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
            missing |= {
                f"TPR @ {float(level):.1%} FPR: {why}" for level, why in r.get("tpr_at_fpr_missing", {}).items()
            }
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
        *(f"<p>Not reported: {_e(m)}.</p>" for m in sorted(missing)),
    )


def _epsilon(models: dict) -> str:
    rows = []
    for name, m in models.items():
        o = _get(m, "audit", "one_run") or {}
        cal = o.get("calibration") or {}
        theory, bound = _theoretical(m), o.get("epsilon_lower_bound")
        rows.append(
            [
                name,
                theory,
                bound,
                bound / theory if bound is not None and theory else None,
                o.get("score"),
                f"{_fmt(o.get('k_plus'))} in / {_fmt(o.get('k_minus'))} out" if o else None,
                o.get("correct"),
                o.get("m"),
                cal.get("canaries"),
                o.get("delta"),
            ]
        )
    note = (
        "<p>Empirical lower bound from one training run (Steinke, Nasr &amp; Jagielski 2023), 95% confidence: "
        "a DP guarantee below it would be refuted. Each one-run canary was trained on with probability ½. "
        "On the calibration canaries alone, the audit chooses the score (log-probability of the secret after "
        "its prefix, minus the base model's, divided by its zlib length, or minus that of random alternative "
        "secrets) and how many canaries to guess in (highest scores) and out (lowest); it then makes those "
        "guesses once on the other canaries, which alone count as m. A memorised canary stands out while an "
        "absent one does not, so guessing only 'in' is often the strongest test.</p>"
    )
    header = [
        "model",
        "ε (guarantee)",
        "ε lower bound",
        "bound / guarantee",
        "score (calibration)",
        "guesses",
        "correct",
        "audited canaries (m)",
        "calibration canaries",
        "δ",
    ]
    return _section("epsilon", "Empirical ε vs guarantee", note, _table(header, rows))
