"""`dpft demo`: the leak of a plain fine-tune, and DP closing it, in one report."""

from __future__ import annotations

import typer

from dpft.cli.errors import handles_errors
from dpft.demo import DemoOptions
from dpft.models.precision import DTYPE_HELP

_D = DemoOptions()


def demo(
    output: str = typer.Option(_D.output, "--output", help="Folder for data, both runs, audits and report.html."),
    model: str = typer.Option(_D.model, "--model", help="Model id or path; default: the embedded SmolLM2-135M."),
    patients: int = typer.Option(_D.patients, "--patients", help="Synthetic patients (train and holdout)."),
    epochs: float = typer.Option(_D.epochs, "--epochs", help="Training epochs of the non-private model."),
    dp_epochs: float = typer.Option(_D.dp_epochs, "--dp-epochs", help="Training epochs of the DP model."),
    loss_on: str = typer.Option(_D.loss_on, "--loss-on", help="'all' (the record text is a target) or 'completion'."),
    epsilon: float = typer.Option(_D.epsilon, "--epsilon", help="Target ε of the DP model (patient-level)."),
    seed: int = typer.Option(
        _D.seed,
        "--seed",
        help="Seed of the synthetic data, the adapters and the audit samples (DP sampling and noise use OS entropy).",
    ),
    dtype: str = typer.Option(_D.dtype, "--dtype", help=DTYPE_HELP),
    one_run_canaries: int = typer.Option(
        _D.one_run_canaries,
        "--one-run-canaries",
        help="Canaries of the one-run audit; fewer save training time but cap its ε bound (100: about 2.3).",
    ),
    dp_records_per_patient: int = typer.Option(
        _D.dp_records_per_patient,
        "--dp-records-per-patient",
        min=1,
        help="Records each patient gives the DP run (one clipped gradient); fewer save time, cost utility.",
    ),
) -> None:
    """Synthetic records → non-private and DP fine-tunes of the embedded model → audit both → report."""
    from dpft.demo import run_demo

    run_demo(
        DemoOptions(
            output=output,
            model=model,
            patients=patients,
            epochs=epochs,
            dp_epochs=dp_epochs,
            loss_on=loss_on,
            epsilon=epsilon,
            seed=seed,
            dtype=dtype,
            one_run_canaries=one_run_canaries,
            dp_records_per_patient=dp_records_per_patient,
        )
    )


def register(app: typer.Typer) -> None:
    app.command("demo")(handles_errors(demo))
