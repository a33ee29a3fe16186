"""The seed's story, runnable: a plain fine-tune leaks patients' conditions; a DP one does not.

synthetic records → non-private fine-tune → DP fine-tune (patient-level unit) → evaluate and audit
both → one self-contained report.html and a terminal summary. Both models train on the full record
text (`--loss-on all`): the record is then a training target, which is what lets a plain
fine-tune memorise a patient's condition (FACTS.md); the report says so.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dpft.data.canaries import DEFAULT_DESIGN
from dpft.models.embedded import EMBEDDED_NAME
from dpft.models.precision import announce, autocast, describe_hardware, dtype_name, resolve_dtype
from dpft.output_claim import claim_output, read_jsonl
from dpft.run_layout import RunPaths
from dpft.training.config import TrainConfig
from dpft.training.progress import format_duration

MICRO_BATCH, MAX_LENGTH = 32, 96  # both runs; the time estimate measures one such micro-batch
# The estimate's proxy is one forward and input backward through every block of the base model.
# Measured by the fp32 demo alone on a real 2-core AVX2 EPYC, two runs: training 723 s and 740 s
# for 4404 examples = 0.54 and 0.60 proxy per micro-batch (proxy 9.81 s and 9.00 s per 32
# records); audits of both models 240 s and 247 s for 200 records = 0.12 and 0.14 proxy per
# record. The factors are their means. (On an AVX-512 EPYC capped to AVX2: 0.63 and 0.14.)
TRAIN_FACTOR, AUDIT_PROXIES = 0.57, 0.13
# 1000 one-run canaries (rare-prefix, about 10 tokens each): with 100 (m = 75 audited) the plain
# model's one-run bound cannot pass about 2.3 however well it memorises; with 1000 it reached 3.47 on a
# real 2-core AVX2 EPYC (docs/dp-utility.md), at about 8 more minutes of demo there. `--one-run-canaries`
# trades power for time.
DEMO_ONE_RUN_CANARIES = 1000
# The DP run's expected batch is the share of people that gives this many expected steps over
# `dp_epochs`: 128 of 743 people, 171 of 992 (each one-run canary is a person of its own).
DP_STEPS = 29
# The demo's data and DP settings before it had 1000 one-run canaries: the figures that
# benchmarks/demo_step.py, demo_profile.py, one_run_power.py and utility.py (its DP batch and
# records per patient) document were measured on them.
EARLIER_DEMO = dict(
    patients=400, records_per_patient=(1, 2, 4), one_run_canaries=100, dp_batch_size=64, dp_records_per_patient=1
)
# The "alternatives" one-run score costs this many more short sequences per canary and model.
DEMO_ONE_RUN_ALTERNATIVES = 0
PHASES = ("data", "plain fine-tune", "DP fine-tune", "audits", "report")


@dataclass
class DemoOptions:
    output: str = "demo-out"
    model: str = EMBEDDED_NAME
    # 600, not 300: twice the patients per DP step lifted DP / plain exact match from 0.81 to 0.95-1.05
    # (two runs of each model at 600) for 18 more minutes on 2 AVX2 cores (docs/dp-utility.md).
    patients: int = 600
    records_per_patient: tuple[int, ...] = (1, 2, 4, 8)  # patients with 8 records are the ones memorised
    lora_layers: int | None = 15  # top half of SmolLM2's 30 blocks: the 15 below run once per record
    loss_on: str = "all"  # "completion": the record text is context only, never a target
    epsilon: float = 8.0
    delta: float = 1e-5
    seed: int = 0
    dtype: str = "auto"  # compute dtype: bf16 where the CPU does it natively, else fp32
    # Non-private: a plain fine-tune, small batches of records.
    epochs: float = 3.0
    batch_size: int = 16
    # With 1000 canaries (a third of the rows) 1e-2 spiked after warmup and left the run erratic:
    # one-run bound 3.47 then 0.69, advantage 0.15 and 0.11; 5e-3: 3.90 and 0.46 (docs/dp-utility.md).
    lr: float = 5e-3
    warmup_steps: int = 16
    # DP: patient-level units, each contributing at most dp_records_per_patient records; large
    # batches and a high, decaying rate, as DP-SGD wants (the noise is spread over the batch).
    dp_epochs: float = 5.0
    dp_batch_size: int | None = None  # None: the people over DP_STEPS steps (dp_batch)
    dp_lr: float = 1e-2
    # A patient's records share one clipped gradient, so more of them sharpen its direction at no
    # privacy cost. At 300 patients (canaries two thirds of each batch), on 2 AVX2 cores: 1 record 65.0%
    # exact match, 2 75.8%, 4 78.3% and 75.8% (6.5 more DP minutes), 8 68.3% (docs/dp-utility.md).
    dp_records_per_patient: int = 4
    audit_records: int = 80
    utility_records: int = 120
    quiet: bool = False
    canaries_per_repetition: int = 2
    one_run_canaries: int = DEMO_ONE_RUN_CANARIES
    canary_design: str = DEFAULT_DESIGN
    one_run_alternatives: int = DEMO_ONE_RUN_ALTERNATIVES
    exposure_candidates: int = 200


def demo_config(o: DemoOptions, data: Path, output: Path, dp: bool, dtype: str) -> TrainConfig:
    """The two fine-tunes share the model, adapters, data, loss and dtype; they differ in what DP-SGD needs."""
    shared = dict(
        data=str(data / "train.jsonl"),
        model=o.model,
        output=str(output),
        delta=o.delta,
        loss_on=o.loss_on,
        lora_r=16,
        lora_alpha=32,
        lora_targets="all-linear",
        lora_layers=o.lora_layers,
        dtype=dtype,
        max_length=MAX_LENGTH,
        micro_batch_size=MICRO_BATCH,
        lr_schedule="linear",
        seed=o.seed,
        checkpoint_every=0,
        quiet=o.quiet,
    )
    if not dp:
        return TrainConfig(
            **shared,
            no_dp=True,
            epsilon=None,
            privacy_unit="record",
            batch_size=o.batch_size,
            epochs=o.epochs,
            lr=o.lr,
            warmup_steps=o.warmup_steps,
        )
    return TrainConfig(
        **shared,
        epsilon=o.epsilon,
        privacy_unit="user",
        max_records_per_user=o.dp_records_per_patient,
        batch_size=o.dp_batch_size,
        epochs=o.dp_epochs,
        lr=o.dp_lr,
    )


def run_demo(o: DemoOptions) -> dict[str, Any]:
    """Run the whole demo; returns the per-model results that went into the report."""
    from dpft.audit import write_report
    from dpft.audit.scoring import ReferenceScores
    from dpft.cli.summary import print_summary
    from dpft.models import load_base_model
    from dpft.scenarios.medical import REPORT_SECTIONS
    from dpft.scenarios.medical.synth import synth_medical
    from dpft.training.recipe import train

    out = Path(o.output)
    data = out / "data"
    dtype = resolve_dtype(o.dtype)  # a bad --dtype stops before anything is written
    claim_output(out, {k: v for k, v in asdict(o).items() if k not in ("output", "quiet")}, "demo.json")
    announce(dtype)
    t0 = time.perf_counter()
    _phase(0, t0)
    manifest = synth_medical(
        data,
        patients=o.patients,
        seed=o.seed,
        records_per_patient=o.records_per_patient,
        canaries_per_repetition=o.canaries_per_repetition,
        one_run_canaries=o.one_run_canaries,
        canary_design=o.canary_design,
    )
    conditions = [c["name"] for c in manifest["conditions"]]
    members, holdout, canaries = (read_jsonl(data / f) for f in ("train.jsonl", "holdout.jsonl", "canaries.jsonl"))
    per_person = Counter(r["user_id"] for r in members)  # the DP run's units: patients and canary owners
    o = replace(o, dp_batch_size=dp_batch(o, len(per_person)))
    dp_records = sum(min(n, o.dp_records_per_patient) for n in per_person.values())  # one DP epoch's records
    reference = load_base_model(o.model)
    print(f"estimate: {_estimate(o, reference, data, len(members), dp_records, dtype)}", flush=True)
    privacy = {}
    for phase, (name, dp) in enumerate((("non-private", False), ("dp", True)), 1):
        _phase(phase, t0)
        run = out / "runs" / name
        privacy[name] = _train_or_reuse(demo_config(o, data, run, dp, dtype_name(dtype)), run, train)
    _phase(3, t0)
    models: dict[str, dict[str, Any]] = {}
    base_scores = ReferenceScores(reference.model)  # the base model is scored once for both audits
    for name in privacy:
        run = out / "runs" / name
        models[name] = {"privacy": privacy[name], "metrics": read_jsonl(RunPaths(run).metrics)}
        models[name] |= _assess(o, run, privacy[name], members, holdout, canaries, conditions, base_scores, dtype)
        models[name]["dtype"] = _ran_dtype(run, models[name]["dtype"])
    _phase(4, t0)
    write_report(
        out / "report.html",
        {
            "title": "dpft demo: a plain fine-tune leaks, a DP fine-tune does not",
            "notes": _notes(o, dtype),
            "models": models,
        },
        extra=REPORT_SECTIONS,
    )
    print_summary(models)
    np_match, dp_match = (models[n]["utility"]["exact_match"]["full"] for n in ("non-private", "dp"))
    if np_match:
        print(f"DP / non-private full-answer exact match: {dp_match / np_match:.2f}")
    print(f"demo finished in {format_duration(time.perf_counter() - t0)} → {out / 'report.html'}")
    return models


def dp_batch(o: DemoOptions, people: int) -> int:
    """The DP run's expected batch: the user's, or the people (a public count) over DP_STEPS steps."""
    if o.dp_batch_size is not None:
        return o.dp_batch_size
    return max(1, round(people * o.dp_epochs / DP_STEPS))


def _phase(index: int, t0: float) -> None:
    """A line as each phase starts; the gaps between the lines are each phase's time."""
    elapsed = format_duration(time.perf_counter() - t0)
    print(f"[{index + 1}/{len(PHASES)}] {PHASES[index]} (elapsed {elapsed})", flush=True)


def _estimate(o: DemoOptions, reference, data: Path, records: int, dp_records: int, dtype: torch.dtype) -> str:
    """The demo's time, from one measured micro-batch: a CPU without native bf16 must not surprise."""
    proxy = _time_micro_batch(reference, data, o.loss_on, dtype)
    examples = o.epochs * records + o.dp_epochs * dp_records
    train_s = TRAIN_FACTOR * proxy * examples / MICRO_BATCH
    audit_s = AUDIT_PROXIES * proxy * (o.audit_records + o.utility_records)
    return (
        f"about {format_duration(train_s + audit_s)} in all: training {format_duration(train_s)}, "
        f"audits {format_duration(audit_s)} (one {MICRO_BATCH}-record micro-batch: {proxy:.2f} s)"
    )


def _time_micro_batch(loaded, data: Path, loss_on: str, dtype: torch.dtype) -> float:
    """Seconds of one forward and input backward of the first training records, in the run's dtype."""
    from dpft.data import collate, encode_records, read_records
    from dpft.training.loss import example_losses

    records = read_records(str(data / "train.jsonl"))[:MICRO_BATCH]
    examples = encode_records(records, loaded.tokenizer, MAX_LENGTH, "record", loss_on).examples
    batch = collate(examples, loaded.tokenizer.pad_token_id)
    # Gradients to the input only: the reference model's weights must get no .grad.
    embeds = loaded.model.get_input_embeddings()(batch["input_ids"]).detach().requires_grad_()
    seconds = float("inf")
    for _ in range(2):  # the first pass pays one-off kernel setup
        start = time.perf_counter()
        with autocast(dtype):
            logits = loaded.model(inputs_embeds=embeds, attention_mask=batch["attention_mask"]).logits
        torch.autograd.grad(example_losses(logits, batch["labels"]).sum(), embeds)
        seconds = min(seconds, time.perf_counter() - start)
    return seconds


def _ran_dtype(run: Path, audit_dtype: str) -> str:
    """The dtype each part of a model's story ran in (a reused run may predate this demo's choice)."""
    train_dtype = TrainConfig.load(RunPaths(run).config).dtype
    return train_dtype if train_dtype == audit_dtype else f"{train_dtype} (training), {audit_dtype} (audits)"


def _notes(o: DemoOptions, dtype: torch.dtype) -> list[str]:
    loss = (
        "loss on ALL tokens of each record (the record text is a training target, which is what lets a "
        "plain fine-tune memorise it)."
        if o.loss_on == "all"
        else "loss on the completion only (the record text is context, never a target; canaries are text "
        "records, learned whole)."
    )
    blocks = f"the last {o.lora_layers} blocks" if o.lora_layers else "every block"
    hw = describe_hardware()
    native = "native bf16" if hw["native_bf16"] else "no native bf16"
    return [
        f"Both models: {o.model}, LoRA r=16 on all linear layers of {blocks}, Poisson sampling, "
        f"linear learning-rate decay, {loss}",
        f"Compute dtype: {_dtype_words(dtype)} (--dtype {o.dtype}), on CPU {hw['cpu']} ({hw['capability']}, {native}, "
        f"{hw['threads']} threads); the summary table gives the dtype each model actually ran in.",
        f"Non-private: a plain fine-tune, {o.epochs:g} epochs over all records, expected batch {o.batch_size} "
        f"records, lr {o.lr:g} after {o.warmup_steps} warmup steps; no clipping, no noise.",
        f"DP: ε = {o.epsilon:g}, δ = {o.delta:g}, privacy unit = patient (each person, patient or canary owner, "
        f"contributes at most {o.dp_records_per_patient} record{'s' if o.dp_records_per_patient > 1 else ''}, "
        f"chosen once: a person's clipped gradient is bounded by C however many records they have); "
        f"{o.dp_epochs:g} epochs, expected batch {o.dp_batch_size} patients, lr {o.dp_lr:g} (DP-SGD wants "
        "large batches and a high rate).",
        f"Synthetic data: {o.patients} patients (seed {o.seed}) with {'/'.join(map(str, o.records_per_patient))} "
        f"records each, split by patient; utility on {o.utility_records} random held-out records; the audit scores "
        f"up to {o.audit_records} patients and records on each side, {o.exposure_candidates} random candidates "
        f"per exposure canary; {o.one_run_canaries} one-run canaries ({o.canary_design}), each trained on with "
        "probability ½, a quarter of them used only to choose the one-run test's score and guesses. To save "
        "time on CPUs without native bf16, the demo skips two measurements `dpft audit` makes: the generic verbatim extraction (the name → condition attack is its targeted "
        "form here) and the likelihood ranking of each patient's condition among all conditions.",
    ]


def _dtype_words(dtype: torch.dtype) -> str:
    return "bf16 autocast (norms, clipping and noise in fp32)" if dtype == torch.bfloat16 else "fp32"


def _assess(
    o: DemoOptions, run: Path, privacy: dict, members, holdout, canaries, conditions, reference, dtype: torch.dtype
) -> dict:
    """Utility on held-out records and the full audit; reused when the run was assessed already."""
    from dpft.audit import evaluate_utility, run_audit
    from dpft.models import load_run_model
    from dpft.scenarios.medical import UTILITY_FIELDS, medical_audit

    done = run / "assessment.json"
    if done.is_file():
        return json.loads(done.read_text())
    trained = load_run_model(run)
    # Native bf16 halves the audit's CPU time; scores are still computed in fp32 from the logits.
    with autocast(dtype):
        result = {
            "dtype": dtype_name(dtype),
            "utility": evaluate_utility(
                trained.model, trained.tokenizer, _sample(holdout, o.utility_records, o.seed), fields=UTILITY_FIELDS
            ),
            "audit": run_audit(
                trained.model,
                trained.tokenizer,
                members,
                holdout,
                canaries,
                reference,
                max_records=o.audit_records,
                num_candidates=o.exposure_candidates,
                one_run_alternatives=o.one_run_alternatives,
                seed=o.seed,
                theoretical_epsilon=privacy.get("epsilon"),
                delta=privacy.get("delta"),
                verbatim=False,  # the name → condition attack below is the demo's targeted extraction
            ),
        }
        result["audit"]["medical"] = medical_audit(
            trained.model,
            trained.tokenizer,
            members,
            holdout,
            conditions,
            max_records=o.audit_records,
            seed=o.seed,
            rank_conditions=False,  # as costly as the extraction itself; `dpft audit` ranks
        )
    done.write_text(json.dumps(result, indent=2))
    return result


def _train_or_reuse(cfg: TrainConfig, run: Path, train) -> dict[str, Any]:
    """A finished run is reused, an interrupted one resumed: a re-run never loses work."""
    paths = RunPaths(run)
    if paths.privacy.is_file():
        return json.loads(paths.privacy.read_text())
    if paths.config.is_file():
        return train(TrainConfig(resume=str(run)))
    return train(cfg)


def _sample(records: list[dict], n: int, seed: int) -> list[dict]:
    """A seeded random subset: held-out records are grouped by patient, so a prefix would be a few people."""
    keep = sorted(np.random.default_rng(seed).permutation(len(records))[:n])
    return [records[i] for i in keep]
