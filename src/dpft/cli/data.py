"""`dpft data`: synthetic records and a check of a data file."""

from __future__ import annotations

import json

import typer

from dpft.cli.errors import handles_errors

data_app = typer.Typer(no_args_is_help=True, help="Generate synthetic records, or check a data file.")


@data_app.command("synth-medical")
@handles_errors
def synth_medical_cmd(
    output: str = typer.Option(..., "--output", help="Folder for train/holdout/canaries JSONL and manifest.json."),
    patients: int = typer.Option(2000, "--patients", help="Number of patients (François Dupont included)."),
    seed: int = typer.Option(0, "--seed", help="Same seed, same files."),
    holdout_fraction: float = typer.Option(
        0.2, "--holdout-fraction", help="Share of patients held out (whole patients)."
    ),
    records_per_patient: str = typer.Option(
        "1,2,4,8", "--records-per-patient", help="Comma-separated record counts; each patient draws one."
    ),
    canaries_per_repetition: int = typer.Option(
        5, "--canaries-per-repetition", help="Exposure canaries per repetition count (1, 2, 4, 8, 16, never)."
    ),
    one_run_canaries: int = typer.Option(
        200, "--one-run-canaries", help="Canaries inserted with probability ½ (one-run audit)."
    ),
) -> None:
    """The seed's task: medical records → {last_name, condition}; split by patient; canaries."""
    from dpft.data import synth_medical
    from dpft.errors import ConfigError

    try:
        counts = tuple(int(x) for x in records_per_patient.split(",") if x.strip())
    except ValueError:
        raise ConfigError(
            [f"--records-per-patient must be comma-separated integers, e.g. 1,2,4 (got {records_per_patient!r})"]
        ) from None
    manifest = synth_medical(
        output,
        patients=patients,
        seed=seed,
        holdout_fraction=holdout_fraction,
        records_per_patient=counts,
        canaries_per_repetition=canaries_per_repetition,
        one_run_canaries=one_run_canaries,
    )
    splits = manifest["splits"]
    print(f"{splits['train']['records']} training and {splits['holdout']['records']} held-out records → {output}")


@data_app.command("check")
@handles_errors
def check_cmd(
    data: str = typer.Argument(..., help="A .jsonl, .csv or .parquet file."),
    json_out: bool = typer.Option(False, "--json", help="Machine-readable output."),
) -> None:
    """Validate a data file (file:line:field errors) and count its records by format and user."""
    from collections import Counter

    from dpft.data import count_duplicates, read_records

    records = read_records(data)
    kinds = Counter(r.kind for r in records)
    users = {r.fields["user_id"] for r in records if "user_id" in r.fields}
    out = {
        "records": len(records),
        "formats": dict(kinds),
        "users": len(users) or None,
        "duplicates": count_duplicates(records),
    }
    print(json.dumps(out) if json_out else ", ".join(f"{k}: {v}" for k, v in out.items()))


def register(app: typer.Typer) -> None:
    app.add_typer(data_app, name="data")
