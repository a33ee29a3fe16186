"""The whole audit of one model: extraction, exposure, membership inference, one-run epsilon."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from dpft.audit.exposure import canary_exposures
from dpft.audit.extraction import DUPONT, extraction_attack, patients
from dpft.audit.mia import MIN_K_FRACTION, attack_metrics, record_scores
from dpft.audit.one_run import one_run_audit
from dpft.audit.scoring import ReferenceScores, encode_record, suffix_logprobs, token_logprobs
from dpft.errors import DpftError


def run_audit(
    model,
    tokenizer,
    members: Sequence[dict],
    non_members: Sequence[dict],
    canaries: Sequence[dict] | None,
    conditions: Sequence[str] | None,
    reference_model=None,
    *,
    batch_size: int = 16,
    max_new_tokens: int = 24,
    max_records: int | None = None,
    seed: int = 0,
    theoretical_epsilon: float | None = None,
    delta: float | None = None,
    num_candidates: int = 2000,
    n_boot: int = 200,
    rank_conditions: bool = True,
) -> dict:
    """Measure what a model leaks about its training records and canaries.

    Args:
        model: the audited causal LM (any HF model; private or not). Put in eval mode for the
            audit and restored afterwards.
        tokenizer: its tokenizer (needs an eos token).
        members: training records; prompt/completion medical records are audited, others
            (e.g. canary text records) ignored.
        non_members: held-out records of the same shape.
        canaries: canary dicts from canaries.jsonl, or None.
        conditions: every condition name (manifest.json); None derives them from the records.
        reference_model: the base model before fine-tuning, for the calibrated MIA score; a
            `ReferenceScores` reuses its scores across the audits of several models.
        batch_size: sequences per forward pass or generate call.
        max_new_tokens: tokens generated per extraction prompt.
        max_records: cap on member and on non-member records (and patients) scored.
        seed: seed of subsampling, candidates and bootstraps.
        theoretical_epsilon: the model's guarantee, reported beside the empirical bound.
        delta: delta of the guarantee, used in the one-run bound (0 when None).
        num_candidates: random secrets scored per exposure canary.
        n_boot: bootstrap resamples for confidence intervals.
        rank_conditions: rank each patient's true condition among all by likelihood (extraction).

    Returns:
        The audit.json content: "settings", "extraction", "mia", "exposure", "one_run",
        "theoretical_epsilon", "delta", "dupont_completion". Sections without inputs are None.

    Raises:
        DpftError: if there are no member or no non-member medical records, or no eos token.
    """
    if tokenizer.eos_token_id is None:
        raise DpftError("the tokenizer has no eos token; the audit encodes records as trained")
    rng = np.random.default_rng(seed)
    mem_recs = _cap([r for r in members if _is_task(r)], max_records, rng)
    non_recs = _cap([r for r in non_members if _is_task(r)], max_records, rng)
    all_people = patients(members), patients(non_members)
    mem_people = _cap(all_people[0], max_records, rng, keep=DUPONT)
    non_people = _cap(all_people[1], max_records, rng)
    if not mem_recs or not non_recs or not mem_people or not non_people:
        raise DpftError(
            "the audit needs member and non-member medical records "
            "(prompt '{medical_record: \"<First> <Last> ...' with a completion)"
        )
    names = list(conditions) if conditions else sorted({p["condition"] for p in [*all_people[0], *all_people[1]]})
    canaries = list(canaries or [])
    reference = _reference_scores(reference_model)
    was_training = model.training
    model.eval()
    try:
        extraction = extraction_attack(
            model,
            tokenizer,
            mem_people,
            non_people,
            names,
            batch_size=batch_size,
            max_new_tokens=max_new_tokens,
            seed=seed,
            n_boot=n_boot,
            rank_conditions=rank_conditions,
        )
        mia = _membership(model, reference, tokenizer, mem_recs, non_recs, batch_size, seed, n_boot)
        exposure_canaries = [c for c in canaries if c.get("kind") == "exposure"]
        exposure = (
            canary_exposures(model, tokenizer, exposure_canaries, num_candidates, seed, batch_size)
            if exposure_canaries
            else None
        )
        one_run = _one_run(
            model,
            reference,
            tokenizer,
            [c for c in canaries if c.get("kind") == "one_run"],
            delta or 0.0,
            batch_size,
        )
    finally:
        model.train(was_training)
    return _jsonable(
        {
            "settings": {
                "members_scored": len(mem_recs),
                "non_members_scored": len(non_recs),
                "member_patients": len(mem_people),
                "non_member_patients": len(non_people),
                "seed": seed,
                "batch_size": batch_size,
                "max_new_tokens": max_new_tokens,
                "max_records": max_records,
                "num_candidates": num_candidates,
                "bootstrap_resamples": n_boot,
                "min_k_fraction": MIN_K_FRACTION,
                "reference_model": reference_model is not None,
                "mia_unit": "record",
            },
            "extraction": {k: v for k, v in extraction.items() if k != "dupont_completion"},
            "mia": mia,
            "exposure": exposure,
            "one_run": one_run,
            "theoretical_epsilon": theoretical_epsilon,
            "delta": delta,
            "dupont_completion": extraction["dupont_completion"],
        }
    )


def _reference_scores(reference) -> ReferenceScores | None:
    if reference is None or isinstance(reference, ReferenceScores):
        return reference
    return ReferenceScores(reference)


def _is_task(record: dict) -> bool:
    return bool(record.get("prompt")) and bool(record.get("completion"))


def _cap(items: list, limit: int | None, rng: np.random.Generator, keep: tuple[str, str] | None = None) -> list:
    """A seeded random subset of at most `limit` items, always keeping the patient `keep`."""
    if limit is None or len(items) <= limit:
        return items
    kept = [i for i, x in enumerate(items) if keep and (x.get("first"), x.get("last")) == keep]
    rest = [i for i in rng.permutation(len(items)) if i not in kept]
    return [items[i] for i in sorted([*kept, *rest][:limit])]


def _membership(
    model,
    reference: ReferenceScores | None,
    tokenizer,
    members: list[dict],
    non_members: list[dict],
    batch_size: int,
    seed: int,
    n_boot: int,
) -> dict:
    """Attack metrics of every membership score, members against non-members."""
    recs = [*members, *non_members]
    seqs = [encode_record(tokenizer, r["prompt"], r["completion"])[0] for r in recs]
    texts = [r["prompt"] + r["completion"] for r in recs]
    ref = reference.token_logprobs(seqs, batch_size) if reference is not None else None
    scores = record_scores(token_logprobs(model, seqs, batch_size), texts, ref)
    n = len(members)
    return {name: attack_metrics(s[:n], s[n:], n_boot, seed) for name, s in scores.items()}


def _one_run(
    model, reference: ReferenceScores | None, tokenizer, canaries: list[dict], delta: float, batch_size: int
) -> dict | None:
    """One-run epsilon lower bound, scoring each canary by log P(secret | prefix).

    With a reference model the score is calibrated (target minus reference log-prob), which
    removes how likely a secret is a priori.
    """
    if not canaries:
        return None
    items = [(c["prefix"], [c["secret"]]) for c in canaries]
    scores = np.concatenate(suffix_logprobs(model, tokenizer, items, batch_size))
    if reference is not None:
        scores = scores - np.concatenate(reference.suffix_logprobs(tokenizer, items, batch_size))
    result = one_run_audit(scores, [bool(c["included"]) for c in canaries], delta)
    return {**result, "score": "calibrated" if reference is not None else "log_prob"}


def _jsonable(x):
    """Plain Python types only, so that json.dump writes audit.json as is."""
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.generic):
        return x.item()
    return x
