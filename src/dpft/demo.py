"""The seed's story, runnable: a plain fine-tune leaks patients' conditions; a DP one does not.

synthetic records → non-private fine-tune → DP fine-tune (patient-level unit) → evaluate and audit
both → one self-contained report.html and a terminal summary. Both models train on the full record
text (`--loss-on all`): the record is then a training target, which is what lets a plain
fine-tune memorise a patient's condition (FACTS.md); the report says so.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from dpft.config import TrainConfig


@dataclass
class DemoOptions:
    output: str = "demo-out"
    patients: int = 160
    epochs: float = 4.0
    epsilon: float = 8.0
    delta: float = 1e-5
    seed: int = 0
    batch_size: int = 32
    audit_records: int = 120
    canaries_per_repetition: int = 2
    exposure_candidates: int = 500


def demo_config(o: DemoOptions, data: Path, output: Path, dp: bool) -> TrainConfig:
    """One training setting for both models; only clipping and noise differ."""
    return TrainConfig(
        data=str(data / "train.jsonl"),
        output=str(output),
        no_dp=not dp,
        epsilon=o.epsilon if dp else None,
        delta=o.delta,
        privacy_unit="user",
        max_records_per_user=16,
        loss_on="all",
        lora_r=16,
        lora_alpha=32,
        lora_targets="all-linear",
        bf16=True,
        max_length=96,
        batch_size=o.batch_size,
        micro_batch_size=16,
        epochs=o.epochs,
        lr=5e-3 if dp else 2e-3,
        seed=o.seed,
        checkpoint_every=0,
        quiet=False,
    )


def run_demo(o: DemoOptions) -> dict[str, Any]:
    """Run the whole demo; returns the per-model results that went into the report."""
    from dpft.audit import write_report
    from dpft.cli.summary import print_summary
    from dpft.data import synth_medical
    from dpft.models import load_base_model
    from dpft.training.recipe import train

    out = Path(o.output)
    data = out / "data"
    t0 = time.perf_counter()
    manifest = synth_medical(data, patients=o.patients, seed=o.seed, canaries_per_repetition=o.canaries_per_repetition)
    conditions = [c["name"] for c in manifest["conditions"]]
    members, holdout, canaries = (_jsonl(data / f) for f in ("train.jsonl", "holdout.jsonl", "canaries.jsonl"))
    reference = load_base_model().model
    models: dict[str, dict[str, Any]] = {}
    for name, dp in (("non-private", False), ("dp", True)):
        run = out / "runs" / name
        privacy = _train_or_reuse(demo_config(o, data, run, dp), run, train)
        models[name] = {"privacy": privacy, "metrics": _jsonl(run / "metrics.jsonl")}
        models[name] |= _assess(o, run, privacy, members, holdout, canaries, conditions, reference)
    write_report(
        out / "report.html",
        {
            "title": "dpft demo: a plain fine-tune leaks, a DP fine-tune does not",
            "models": models,
        },
    )
    print_summary(models)
    print(f"demo finished in {time.perf_counter() - t0:.0f} s → {out / 'report.html'}")
    return models


def _assess(o: DemoOptions, run: Path, privacy: dict, members, holdout, canaries, conditions, reference) -> dict:
    """Utility on held-out records and the full audit; reused when the run was assessed already."""
    from dpft.audit import evaluate_utility, run_audit
    from dpft.models import load_run_model

    done = run / "assessment.json"
    if done.is_file():
        return json.loads(done.read_text())
    trained = load_run_model(run)
    # bf16 matmuls halve the audit's CPU time; scores are still computed in fp32 from the logits.
    with torch.autocast("cpu", dtype=torch.bfloat16):
        result = {
            "utility": evaluate_utility(trained.model, trained.tokenizer, holdout[: o.audit_records]),
            "audit": run_audit(
                trained.model,
                trained.tokenizer,
                members,
                holdout,
                canaries,
                conditions,
                reference,
                max_records=o.audit_records,
                num_candidates=o.exposure_candidates,
                seed=o.seed,
                theoretical_epsilon=privacy.get("epsilon"),
                delta=privacy.get("delta"),
            ),
        }
    done.write_text(json.dumps(result, indent=2))
    return result


def _train_or_reuse(cfg: TrainConfig, run: Path, train) -> dict[str, Any]:
    """A finished run is reused, an interrupted one resumed: a re-run never loses work."""
    if (run / "privacy.json").is_file():
        return json.loads((run / "privacy.json").read_text())
    if (run / "config.yaml").is_file():
        return train(TrainConfig(resume=str(run)))
    return train(cfg)


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
