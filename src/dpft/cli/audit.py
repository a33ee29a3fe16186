"""`dpft evaluate` and `dpft audit`: task utility and leakage of any model, trained by dpft or not."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from dpft.cli.errors import handles_errors
from dpft.models.precision import DTYPE_HELP

FIELD_SYNTAX = 'key: "value", or JSON "key": value'
FieldOption = Annotated[
    list[str] | None,
    typer.Option("--field", help=f"A field of the answers scored alone ({FIELD_SYNTAX}); repeatable."),
]
SecretFieldOption = Annotated[
    list[str] | None,
    typer.Option(
        "--secret-field",
        help=f"A field whose value is secret ({FIELD_SYNTAX}; JSON numbers and unquoted values too), "
        "looked for in each record's completion, text or last assistant turn; repeatable.",
    ),
]


def evaluate(
    run: str | None = typer.Option(None, "--run", help="dpft run directory."),
    model: str | None = typer.Option(None, "--model", help="Or any model id/path."),
    data: str = typer.Option(..., "--data", help="Held-out records (prompt/completion, text or chat)."),
    field: FieldOption = None,
    batch_size: int = typer.Option(16, "--batch-size", help="Prompts per batch."),
    dtype: str = typer.Option("auto", "--dtype", help=DTYPE_HELP),
    json_out: bool = typer.Option(False, "--json", help="Machine-readable output."),
) -> None:
    """Task utility on held-out records: loss, perplexity, exact match of answers (whole and per --field)."""
    from dpft.audit.api import evaluate as run_evaluate

    result = run_evaluate(data, run=run, model=model, fields=tuple(field or ()), batch_size=batch_size, dtype=dtype)
    if json_out:
        print(json.dumps(result))
        return
    matches = ", ".join(f"{k} {_pct(v)}" for k, v in result["exact_match"].items())
    valid = f"  valid format {_pct(result['valid_format'])}" if result["fields"] else ""
    print(
        f"records {result['records']}  loss {result['loss']:.3f}  perplexity {result['perplexity']:.2f}  "
        f"exact match ({result['answers']} answers): {matches}{valid}  ({result['dtype']})"
    )


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.1%}"


def audit(
    run: str | None = typer.Option(None, "--run", help="dpft run directory."),
    model: str | None = typer.Option(None, "--model", help="Or any model id/path (trained elsewhere)."),
    members: str = typer.Option(..., "--members", help="Training records (members)."),
    non_members: str = typer.Option(..., "--non-members", help="Held-out records of the same kind."),
    canaries: str | None = typer.Option(
        None, "--canaries", help="canaries.jsonl from `dpft data canaries` (or `dpft data synth-medical`)."
    ),
    manifest: str | None = typer.Option(
        None, "--manifest", help="The data's manifest.json; a synth-medical one adds the medical scenario's sections."
    ),
    secret_field: SecretFieldOption = None,
    secret_pattern: str | None = typer.Option(
        None,
        "--secret-pattern",
        help="A regular expression over each record's target; its first group (or the match) is a secret.",
    ),
    reference: str | None = typer.Option(
        None, "--reference", help="Reference model for calibrated MIA (default: the run's base model)."
    ),
    output: str = typer.Option(..., "--output", help="Folder for audit.json and report.html."),
    max_records: int | None = typer.Option(None, "--max-records", help="Cap on members and non-members scored."),
    batch_size: int = typer.Option(16, "--batch-size", help="Sequences per forward pass."),
    seed: int = typer.Option(0, "--seed", help="Seed of subsampling, candidates and bootstraps."),
    n_boot: int = typer.Option(200, "--n-boot", help="Bootstrap resamples of every confidence interval."),
    dtype: str = typer.Option("auto", "--dtype", help=DTYPE_HELP),
    exposure_candidates: int = typer.Option(
        2000, "--exposure-candidates", min=2, help="Random secrets scored per exposure canary (cost grows with it)."
    ),
    one_run_alternatives: int = typer.Option(
        8,
        "--one-run-alternatives",
        min=0,
        help="Random secrets scored per one-run canary for the 'alternatives' score (0: not computed).",
    ),
    json_out: bool = typer.Option(False, "--json", help="Print audit.json."),
) -> None:
    """Measure what a model leaks on any data: membership inference, verbatim and secret extraction,
    canary exposure, one-run ε bound (and a scenario's own attacks when its manifest is given)."""
    from pathlib import Path

    from dpft.audit.api import audit as run_audit
    from dpft.audit.api import run_privacy

    result = run_audit(
        members,
        non_members,
        output,
        run=run,
        model=model,
        canaries=canaries,
        manifest=manifest,
        reference=reference,
        secret_fields=tuple(secret_field or ()),
        secret_pattern=secret_pattern,
        max_records=max_records,
        batch_size=batch_size,
        seed=seed,
        n_boot=n_boot,
        dtype=dtype,
        exposure_candidates=exposure_candidates,
        one_run_alternatives=one_run_alternatives,
    )
    if json_out:
        print(json.dumps(result))
        return
    from dpft.cli.summary import print_summary

    name = Path(run).name if run else str(model)
    print_summary({name: {"audit": result, "privacy": run_privacy(run), "dtype": result["dtype"]}})
    print(f"→ {Path(output) / 'audit.json'}, {Path(output) / 'report.html'}")


def register(app: typer.Typer) -> None:
    app.command("evaluate")(handles_errors(evaluate))
    app.command("audit")(handles_errors(audit))
