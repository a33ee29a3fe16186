"""HTML building blocks of the audit report, shared with scenario sections.

Every value that comes from results goes through `e` (HTML-escaped) or `fmt`.
"""

from __future__ import annotations

import base64
import html
import io

from matplotlib.figure import Figure


def e(x) -> str:
    """HTML-escaped text of x."""
    return html.escape(str(x))


def fmt(x) -> str:
    """A result value for a table cell: 3 significant digits, [lo, hi] for an interval, n/a for None."""
    if x is None:
        return "n/a"
    if isinstance(x, float):
        return f"{x:.3g}"
    if isinstance(x, list) and len(x) == 2:
        return f"[{fmt(x[0])}, {fmt(x[1])}]"
    return e(x)


def get(d: dict | None, *keys):
    """d[k1][k2]... or None when any level is missing."""
    for k in keys:
        if not isinstance(d, dict) or d.get(k) is None:
            return None
        d = d[k]
    return d


def pair(d: dict, a: str, b: str) -> str:
    """'d[a] / d[b]', formatted."""
    return f"{fmt(d.get(a))} / {fmt(d.get(b))}"


def section(sid: str, title: str, *parts: str) -> str:
    return f"<section id='{sid}'><h2>{e(title)}</h2>{''.join(parts)}</section>"


def table(header: list[str], rows: list[list]) -> str:
    head = "".join(f"<th>{e(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{fmt(c)}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def png(fig: Figure, alt: str) -> str:
    """The figure as an inline base64 PNG image."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    data = base64.b64encode(buf.getvalue()).decode("ascii")
    return f"<img alt='{e(alt)}' src='data:image/png;base64,{data}'>"
