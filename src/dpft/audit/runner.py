"""The whole audit of one model on any data: membership inference, verbatim and secret
extraction, canary exposure, one-run epsilon. Scenario sections (`dpft.scenarios`) are added by
the caller; nothing here knows what the records are about."""

from __future__ import annotations

import json
from collections.abc import Sequence

import numpy as np

from dpft.audit.exposure import canary_exposures
from dpft.audit.mia import MIN_K_FRACTION, attack_metrics, record_scores
from dpft.audit.one_run import one_run_audit
from dpft.audit.probes import trained_text
from dpft.audit.scoring import ReferenceScores, encode_as_trained, suffix_logprobs, token_logprobs
from dpft.audit.secret_extraction import SecretSpec, secret_extraction
from dpft.audit.verbatim import verbatim_extraction
from dpft.data.canaries import audit_prefix
from dpft.errors import DpftError

CONTENT_KEYS = ("prompt", "completion", "text", "messages")


def run_audit(
    model,
    tokenizer,
    members: Sequence[dict],
    non_members: Sequence[dict],
    canaries: Sequence[dict] | None,
    reference_model=None,
    *,
    secrets: SecretSpec | None = None,
    batch_size: int = 16,
    max_new_tokens: int = 32,
    max_records: int | None = None,
    seed: int = 0,
    theoretical_epsilon: float | None = None,
    delta: float | None = None,
    num_candidates: int = 2000,
    secret_candidates: int = 100,
    n_boot: int = 200,
    verbatim: bool = True,
) -> dict:
    """Measure what a model leaks about its training records and canaries.

    Args:
        model: the audited causal LM (any HF model; private or not). Put in eval mode for the
            audit and restored afterwards.
        tokenizer: its tokenizer (needs an eos token; a chat template for chat records).
        members: training records, any format; rows that are canaries' training rows are left
            out (they have no non-member counterpart).
        non_members: held-out records of the same kind.
        canaries: canary dicts from canaries.jsonl, or None.
        reference_model: the base model before fine-tuning, for the calibrated MIA score; a
            `ReferenceScores` reuses its scores across the audits of several models.
        secrets: the secret fields and/or pattern (`--secret-field`, `--secret-pattern`), or None.
        batch_size: sequences per forward pass or generate call.
        max_new_tokens: tokens generated and compared per verbatim extraction prompt.
        max_records: cap on member and on non-member records scored.
        seed: seed of subsampling, candidates and bootstraps.
        theoretical_epsilon: the model's guarantee, reported beside the empirical bound.
        delta: delta of the guarantee, used in the one-run bound (0 when None).
        num_candidates: random secrets scored per exposure canary.
        secret_candidates: other records' secrets ranked against each true secret, at most.
        n_boot: bootstrap resamples for confidence intervals.
        verbatim: run the verbatim extraction (one greedy generation per audited record); a
            scenario with its own targeted extraction may skip it.

    Returns:
        The audit.json content: "settings", "mia", "verbatim", "secrets", "exposure", "one_run",
        "theoretical_epsilon", "delta". Sections without inputs are None.

    Raises:
        DpftError: if there are no member or no non-member records, or no eos token.
        ConfigError: a secret spec that is invalid or matches no member or no non-member record.
    """
    if tokenizer.eos_token_id is None:
        raise DpftError("the tokenizer has no eos token; the audit encodes records as trained")
    rng = np.random.default_rng(seed)
    canaries = [{**c, "prefix": audit_prefix(tokenizer, c)} for c in canaries or []]
    mem_recs = _cap(_without_canaries(members, canaries), max_records, rng)
    non_recs = _cap(list(non_members), max_records, rng)
    if not mem_recs or not non_recs:
        raise DpftError("the audit needs member and non-member records (besides canary rows)")
    reference = _reference_scores(reference_model)
    was_training = model.training
    model.eval()
    try:
        verbatim_result = (
            verbatim_extraction(
                model,
                tokenizer,
                mem_recs,
                non_recs,
                batch_size=batch_size,
                max_new_tokens=max_new_tokens,
                seed=seed,
                n_boot=n_boot,
            )
            if verbatim
            else None
        )
        found = (
            secret_extraction(
                model,
                tokenizer,
                mem_recs,
                non_recs,
                secrets,
                batch_size=batch_size,
                num_candidates=secret_candidates,
                seed=seed,
                n_boot=n_boot,
            )
            if secrets and (secrets.fields or secrets.pattern)
            else None
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
                "seed": seed,
                "batch_size": batch_size,
                "max_new_tokens": max_new_tokens,
                "max_records": max_records,
                "num_candidates": num_candidates,
                "secret_candidates": secret_candidates,
                "bootstrap_resamples": n_boot,
                "min_k_fraction": MIN_K_FRACTION,
                "reference_model": reference_model is not None,
                "mia_unit": "record",
            },
            "mia": mia,
            "verbatim": verbatim_result,
            "secrets": found,
            "exposure": exposure,
            "one_run": one_run,
            "theoretical_epsilon": theoretical_epsilon,
            "delta": delta,
        }
    )


def _reference_scores(reference) -> ReferenceScores | None:
    if reference is None or isinstance(reference, ReferenceScores):
        return reference
    return ReferenceScores(reference)


def _content(record: dict) -> str:
    return json.dumps({k: v for k, v in record.items() if k in CONTENT_KEYS}, sort_keys=True)


def _without_canaries(records: Sequence[dict], canaries: Sequence[dict]) -> list[dict]:
    """Records that are not a canary's training row (synth-medical canaries: their text)."""
    rows = {_content(c["record"] if c.get("record") else {"text": c.get("text")}) for c in canaries}
    return [r for r in records if _content(r) not in rows]


def _cap(items: list, limit: int | None, rng: np.random.Generator) -> list:
    """A seeded random subset of at most `limit` items, in their order."""
    if limit is None or len(items) <= limit:
        return items
    return [items[i] for i in sorted(rng.permutation(len(items))[:limit])]


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
    seqs = [encode_as_trained(tokenizer, r)[0] for r in recs]
    texts = [trained_text(r) for r in recs]
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
    result = one_run_audit(scores, [bool(c["included"]) for c in canaries], delta=delta)
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
