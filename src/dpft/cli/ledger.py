"""`dpft ledger show`: every run that touched a dataset, and the budget composed over them."""

from __future__ import annotations

import json
import math

import typer

from dpft.cli.errors import handles_errors

ledger_app = typer.Typer(no_args_is_help=True, help="The privacy budget ledger of datasets.")


@ledger_app.command("show")
@handles_errors
def show(
    data: str | None = typer.Option(None, "--data", help="Only the runs on this data file (by content fingerprint)."),
    delta: float = typer.Option(1e-5, "--delta", help="δ at which the total ε is composed."),
    ledger: str | None = typer.Option(None, "--ledger", help="Ledger file (default $DPFT_LEDGER or ~/.cache/dpft)."),
    json_out: bool = typer.Option(False, "--json", help="Machine-readable output."),
) -> None:
    """List the runs recorded for a dataset (or all), with the composed total ε."""
    from dpft.hashing import sha256_file
    from dpft.ledger import BudgetLedger

    book = BudgetLedger(ledger)
    fingerprint = sha256_file(data) if data else None
    runs = [e.__dict__ for e in book.history(fingerprint)]
    out: dict = {"ledger": str(book.path), "runs": runs}
    if fingerprint:
        spend = book.spend(fingerprint, delta)
        out |= {
            "fingerprint": fingerprint,
            "total_epsilon": None if math.isinf(spend.epsilon) else spend.epsilon,
            "exposed": spend.method == "exposed",
            "delta": spend.delta,
            "composition": spend.method,
        }
    if json_out:
        print(json.dumps(out))
        return
    for r in runs:
        guarantee = f"ε = {r['epsilon']:.3g}, δ = {r['delta']:g}" if r["dp"] else "NON-PRIVATE (data exposed)"
        print(f"{r['created']}  {r['run_id'][:8]}  {guarantee}  {_unit(r)}  {r['output']}")
    if fingerprint:
        total = "∞ (exposed by a non-private run)" if out["exposed"] else f"{spend.epsilon:.3g}"
        print(f"total on this dataset: ε = {total} at δ = {spend.delta:g} ({spend.method} composition)")


def _unit(run: dict) -> str:
    """The privacy unit as a column: "per record", "per user (≤ k records)", or unknown (an older entry)."""
    if run["privacy_unit"] is None:
        return "unit unknown"
    cap = run["max_records_per_user"]
    return f"per {run['privacy_unit']}" + (f" (≤ {cap} records)" if cap is not None else "")


def register(app: typer.Typer) -> None:
    app.add_typer(ledger_app, name="ledger")
