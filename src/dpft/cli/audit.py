"""`dpft evaluate` and `dpft audit`: task utility and leakage of any model, trained by dpft or not."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from dpft.cli.errors import handles_errors


def load_target(run: str | None, model: str | None):
    """The audited model: a dpft run directory (--run) or any HF model id/path (--model)."""
    from dpft.errors import ConfigError
    from dpft.models import load_base_model, load_run_model

    if (run is None) == (model is None):
        raise ConfigError(["give exactly one of --run (a dpft run directory) or --model (any model id or path)"])
    return load_run_model(run) if run else load_base_model(model)


def read_dicts(path: str | None) -> list[dict] | None:
    """Records as plain dicts, validated by the data layer (file:line errors)."""
    if path is None:
        return None
    from dpft.data import read_records

    return [r.fields for r in read_records(path)]


def read_canaries(path: str | None) -> list[dict] | None:
    from dpft.errors import DataError

    if path is None:
        return None
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError as err:
        raise DataError(path, None, None, f"cannot read ({err.strerror})") from None
    out = []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            raise DataError(path, i, None, "malformed JSON") from None
        missing = [k for k in ("prefix", "secret", "kind") if k not in row]
        if missing:
            raise DataError(path, i, missing[0], "missing canary field")
        out.append(row)
    return out


def run_privacy(run: str | None) -> dict | None:
    if run is None or not (Path(run) / "privacy.json").is_file():
        return None
    return json.loads((Path(run) / "privacy.json").read_text())


def evaluate(
    run: str | None = typer.Option(None, "--run", help="dpft run directory."),
    model: str | None = typer.Option(None, "--model", help="Or any model id/path."),
    data: str = typer.Option(..., "--data", help="Held-out prompt/completion records."),
    batch_size: int = typer.Option(16, "--batch-size", help="Prompts per batch."),
    json_out: bool = typer.Option(False, "--json", help="Machine-readable output."),
) -> None:
    """Task utility on held-out records: per-field and full exact match, valid format, loss."""
    from dpft.audit import evaluate_utility

    target = load_target(run, model)
    result = evaluate_utility(target.model, target.tokenizer, read_dicts(data), batch_size=batch_size)
    if json_out:
        print(json.dumps(result))
        return
    em = result["exact_match"]
    print(
        f"records {result['records']}  exact match: full {em['full']:.1%}, last_name {em['last_name']:.1%}, "
        f"condition {em['condition']:.1%}  valid format {result['valid_format']:.1%}  "
        f"loss {result['loss']:.3f}  perplexity {result['perplexity']:.2f}"
    )


def audit(
    run: str | None = typer.Option(None, "--run", help="dpft run directory."),
    model: str | None = typer.Option(None, "--model", help="Or any model id/path (trained elsewhere)."),
    members: str = typer.Option(..., "--members", help="Training records (members)."),
    non_members: str = typer.Option(..., "--non-members", help="Held-out records of the same kind."),
    canaries: str | None = typer.Option(None, "--canaries", help="canaries.jsonl from `dpft data synth-medical`."),
    manifest: str | None = typer.Option(None, "--manifest", help="manifest.json (the list of conditions)."),
    reference: str | None = typer.Option(
        None, "--reference", help="Reference model for calibrated MIA (default: the run's base model)."
    ),
    output: str = typer.Option(..., "--output", help="Folder for audit.json and report.html."),
    max_records: int | None = typer.Option(None, "--max-records", help="Cap on members and non-members scored."),
    batch_size: int = typer.Option(16, "--batch-size", help="Sequences per forward pass."),
    seed: int = typer.Option(0, "--seed", help="Seed of subsampling, candidates and bootstraps."),
    json_out: bool = typer.Option(False, "--json", help="Print audit.json."),
) -> None:
    """Measure what a model leaks: extraction, canary exposure, membership inference, one-run ε bound."""
    from dpft.audit import run_audit, write_report
    from dpft.models import load_base_model

    target = load_target(run, model)
    privacy = run_privacy(run)
    ref_name = reference or (_base_model_of(run) if run else None)
    ref = load_base_model(ref_name).model if ref_name else None
    conditions = _conditions(manifest)
    result = run_audit(
        target.model,
        target.tokenizer,
        read_dicts(members),
        read_dicts(non_members),
        read_canaries(canaries),
        conditions,
        ref,
        batch_size=batch_size,
        max_records=max_records,
        seed=seed,
        theoretical_epsilon=privacy.get("epsilon") if privacy else None,
        delta=privacy.get("delta") if privacy else None,
    )
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    (out / "audit.json").write_text(json.dumps(result, indent=2))
    name = Path(run).name if run else str(model)
    write_report(
        out / "report.html", {"title": f"dpft audit: {name}", "models": {name: {"audit": result, "privacy": privacy}}}
    )
    if json_out:
        print(json.dumps(result))
    else:
        from dpft.cli.summary import print_summary

        print_summary({name: {"audit": result, "privacy": privacy}})
        print(f"→ {out / 'audit.json'}, {out / 'report.html'}")


def _base_model_of(run: str) -> str | None:
    meta = Path(run) / "model" / "dpft-model.json"
    return json.loads(meta.read_text())["base_model"] if meta.is_file() else None


def _conditions(manifest: str | None) -> list[str] | None:
    if manifest is None:
        return None
    return [c["name"] for c in json.loads(Path(manifest).read_text())["conditions"]]


def register(app: typer.Typer) -> None:
    app.command("evaluate")(handles_errors(evaluate))
    app.command("audit")(handles_errors(audit))
