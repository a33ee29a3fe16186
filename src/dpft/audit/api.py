"""Audit or evaluate a model named by a run directory or a model id/path, reading data files.

Shared by `dpft audit` / `dpft evaluate` and the Python API (`dpft.audit`, `dpft.evaluate`).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from dpft.errors import ConfigError, DataError
from dpft.models.precision import announce, autocast, dtype_name, resolve_dtype
from dpft.run_layout import RunPaths


def load_target(run: str | None, model: str | None):
    """The audited model: a dpft run directory (`run`) or any HF model id/path (`model`)."""
    from dpft.models import load_base_model, load_run_model

    if (run is None) == (model is None):
        raise ConfigError(["give exactly one of --run (a dpft run directory) or --model (any model id or path)"])
    return load_run_model(run) if run else load_base_model(model)


def read_dicts(path: str) -> list[dict]:
    """Records as plain dicts, validated by the data layer (file:line errors)."""
    from dpft.data import read_records

    return [r.fields for r in read_records(path)]


def read_canaries(path: str) -> list[dict]:
    """canaries.jsonl rows, each checked for the fields the audit needs."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(path, None, None, f"cannot read ({type(err).__name__})") from None
    out = []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            raise DataError(path, i, None, "malformed JSON") from None
        if not isinstance(row, dict):
            raise DataError(path, i, None, "is not a JSON object")
        missing = [k for k in ("prefix", "secret", "kind") if k not in row]
        if missing:
            raise DataError(path, i, missing[0], "missing canary field")
        out.append(row)
    return out


def run_privacy(run: str | None) -> dict | None:
    if run is None or not RunPaths(Path(run)).privacy.is_file():
        return None
    return json.loads(RunPaths(Path(run)).privacy.read_text())


def evaluate(
    data: str,
    run: str | None = None,
    model: str | None = None,
    fields: tuple[str, ...] = (),
    batch_size: int = 16,
    dtype: str = "auto",
) -> dict:
    """Task utility of a model on held-out records (`audit.utility`); `dtype` names the compute dtype that ran."""
    from dpft.audit.secret_extraction import SecretSpec
    from dpft.audit.utility import evaluate_utility

    SecretSpec(tuple(fields)).finders("--field")  # a bad --field stops before the model loads
    compute = _compute_dtype(dtype)
    records = read_dicts(data)
    target = load_target(run, model)
    with autocast(compute):
        result = evaluate_utility(target.model, target.tokenizer, records, fields=fields, batch_size=batch_size)
    return result | {"dtype": dtype_name(compute)}


def audit(
    members: str,
    non_members: str,
    output: str,
    run: str | None = None,
    model: str | None = None,
    canaries: str | None = None,
    manifest: str | None = None,
    reference: str | None = None,
    secret_fields: tuple[str, ...] = (),
    secret_pattern: str | None = None,
    max_records: int | None = None,
    batch_size: int = 16,
    seed: int = 0,
    n_boot: int = 200,
    dtype: str = "auto",
    exposure_candidates: int = 2000,
    one_run_alternatives: int = 8,
) -> dict:
    """Audit a model against member and non-member files; writes audit.json and report.html in `output`.

    Args:
        manifest: a data manifest; when it names a scenario (a synth-medical manifest names
            "medical"), that scenario's sections are added under its name.
        secret_fields: field names whose values are secret (`--secret-field`).
        secret_pattern: a regular expression over the records' targets (`--secret-pattern`).
        dtype: compute dtype, auto (bf16 where the hardware does it natively, else fp32), fp32 or bf16.
        exposure_candidates: random secrets scored per exposure canary (its cost grows with them).
        one_run_alternatives: random secrets scored per one-run canary for its "alternatives" score.

    Returns:
        The audit (audit.json content), with the compute dtype that ran under "dtype".
    """
    from dpft.audit.report import write_report
    from dpft.audit.runner import run_audit
    from dpft.audit.secret_extraction import SecretSpec
    from dpft.models import load_base_model
    from dpft.scenarios import read_manifest, scenario_of

    spec = SecretSpec(tuple(secret_fields), secret_pattern)
    spec.finders()  # a bad --secret-field or --secret-pattern stops before any model loads
    data = read_dicts(members), read_dicts(non_members), read_canaries(canaries) if canaries else None
    meta = read_manifest(manifest) if manifest else None
    compute = _compute_dtype(dtype)
    target = load_target(run, model)
    privacy = run_privacy(run)
    ref_name = reference or (_base_model_of(run) if run else None)
    ref = load_base_model(ref_name).model if ref_name else None
    scenario = scenario_of(meta)
    options = {"batch_size": batch_size, "max_records": max_records, "seed": seed, "n_boot": n_boot}
    with autocast(compute):
        result = run_audit(
            target.model,
            target.tokenizer,
            *data,
            ref,
            secrets=spec,
            num_candidates=exposure_candidates,
            one_run_alternatives=one_run_alternatives,
            theoretical_epsilon=privacy.get("epsilon") if privacy else None,
            delta=privacy.get("delta") if privacy else None,
            **options,
        ) | {"dtype": dtype_name(compute)}
        if scenario is not None:
            result[scenario.NAME] = scenario.audit(target.model, target.tokenizer, *data[:2], meta, **options)
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    (out / "audit.json").write_text(json.dumps(result, indent=2))
    name = Path(run).name if run else str(model)
    write_report(
        out / "report.html",
        {
            "title": f"dpft audit: {name}",
            "models": {name: {"audit": result, "privacy": privacy, "dtype": result["dtype"]}},
        },
        extra=scenario.REPORT_SECTIONS if scenario else (),
    )
    return result


def _compute_dtype(requested: str) -> torch.dtype:
    """Native bf16 halves CPU time (every score is still computed in fp32 from the logits); emulated, it is ~70x slower."""
    dtype = resolve_dtype(requested)
    announce(dtype)
    return dtype


def _base_model_of(run: str) -> str | None:
    meta = RunPaths(Path(run)).model_meta
    return json.loads(meta.read_text())["base_model"] if meta.is_file() else None
