"""`dpft data`: synthetic records and a check of a data file."""

from __future__ import annotations

import json

import typer

from dpft.cli.errors import handles_errors
from dpft.data.canaries import DEFAULT_DESIGN, DESIGNS, ONE_RUN_CANARIES

DESIGN_HELP = (
    f"Design of the one-run canaries: {', '.join(DESIGNS)}. rare-prefix: a made-up two-word prefix, then "
    "four random ordinary words (about ten tokens; in prompt/completion data the words alone are the "
    "completion); random-words: 'The access code of <name> is <four random words>.'; name-digits: the same "
    "sentence with six digits. Exposure canaries are always name-digits."
)

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
        ONE_RUN_CANARIES, "--one-run-canaries", help="Canaries inserted with probability ½ (one-run audit)."
    ),
    canary_design: str = typer.Option(DEFAULT_DESIGN, "--canary-design", help=DESIGN_HELP),
) -> None:
    """The seed's task: medical records → {last_name, condition}; split by patient; canaries."""
    from dpft.scenarios.medical.synth import synth_medical

    counts = _int_list(records_per_patient, "--records-per-patient")
    manifest = synth_medical(
        output,
        patients=patients,
        seed=seed,
        holdout_fraction=holdout_fraction,
        records_per_patient=counts,
        canaries_per_repetition=canaries_per_repetition,
        one_run_canaries=one_run_canaries,
        canary_design=canary_design,
    )
    splits = manifest["splits"]
    print(f"{splits['train']['records']} training and {splits['holdout']['records']} held-out records → {output}")


@data_app.command("canaries")
@handles_errors
def canaries_cmd(
    like: str = typer.Option(..., "--like", help="Your training file: the canaries take its records' format."),
    output: str = typer.Option(..., "--output", help="Folder for canaries.jsonl, the canary rows and manifest.json."),
    seed: int | None = typer.Option(
        None, "--seed", help="Reproducible canaries (whoever knows the seed knows the secrets); default: OS entropy."
    ),
    canary_repetitions: str = typer.Option(
        "1,2,4,8,16", "--canary-repetitions", help="Comma-separated insertion counts of exposure canaries."
    ),
    canaries_per_repetition: int = typer.Option(
        5, "--canaries-per-repetition", help="Exposure canaries per insertion count (never-inserted ones included)."
    ),
    one_run_canaries: int = typer.Option(
        ONE_RUN_CANARIES, "--one-run-canaries", help="Canaries inserted with probability ½ (one-run audit)."
    ),
    canary_design: str = typer.Option(DEFAULT_DESIGN, "--canary-design", help=DESIGN_HELP),
) -> None:
    """Exposure and one-run canaries shaped like your records, to mix into training and audit."""
    from pathlib import Path

    from dpft.data.canaries import make_canaries

    manifest = make_canaries(
        like,
        output,
        seed=seed,
        canary_repetitions=_int_list(canary_repetitions, "--canary-repetitions"),
        canaries_per_repetition=canaries_per_repetition,
        one_run_canaries=one_run_canaries,
        canary_design=canary_design,
    )
    out = Path(output)
    print(
        f"{manifest['records']['canary_rows']} canary rows ({manifest['format']}) → {out / 'canary-records.jsonl'}; "
        f"train on {out / 'train-with-canaries.jsonl'}, then audit with --canaries {out / 'canaries.jsonl'}"
    )


def _int_list(text: str, flag: str) -> tuple[int, ...]:
    from dpft.errors import ConfigError

    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise ConfigError([f"{flag} must be comma-separated integers, e.g. 1,2,4 (got {text!r})"]) from None


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
