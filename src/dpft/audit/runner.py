"""The whole audit of one model on any data: membership inference, verbatim and secret
extraction, canary exposure, one-run epsilon. Scenario sections (`dpft.scenarios`) are added by
the caller; nothing here knows what the records are about."""

from __future__ import annotations

import json
import zlib
from collections.abc import Sequence

import numpy as np

from dpft.audit.exposure import canary_exposures, sample_candidates
from dpft.audit.mia import MIN_K_FRACTION, attack_metrics, record_scores
from dpft.audit.one_run import one_run_audit
from dpft.audit.probes import trained_text
from dpft.audit.scoring import ReferenceScores, encode_as_trained, suffix_logprobs, token_logprobs
from dpft.audit.secret_extraction import SecretSpec, secret_extraction
from dpft.audit.verbatim import verbatim_extraction
from dpft.data.canaries import CALIBRATION_FRACTION, audit_prefix, secret_words
from dpft.errors import DpftError

CONTENT_KEYS = ("prompt", "completion", "text", "messages")
ONE_RUN_ALTERNATIVES = 8


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
    one_run_alternatives: int = ONE_RUN_ALTERNATIVES,
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
        one_run_alternatives: random alternative secrets scored per one-run canary for the
            "alternatives" score (0: that score is not computed; each costs one short sequence).

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
            one_run_alternatives,
            seed,
        )
        if one_run is not None and theoretical_epsilon:
            one_run["theoretical_epsilon"] = theoretical_epsilon
            one_run["fraction_of_guarantee"] = one_run["epsilon_lower_bound"] / theoretical_epsilon
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
                "one_run_alternatives": one_run_alternatives,
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
    model,
    reference: ReferenceScores | None,
    tokenizer,
    canaries: list[dict],
    delta: float,
    batch_size: int,
    alternatives: int,
    seed: int,
) -> dict | None:
    """One-run epsilon lower bound; the score and the guess split are chosen on the calibration canaries."""
    if not canaries:
        return None
    scores = one_run_scores(model, reference, tokenizer, canaries, batch_size, alternatives, seed)
    calibration, source = calibration_flags(canaries, seed)
    result = one_run_audit(scores, [bool(c["included"]) for c in canaries], calibration, delta=delta)
    result["calibration"]["source"] = source
    result["scores"] = list(scores)
    return result


def one_run_scores(
    model,
    reference: ReferenceScores | None,
    tokenizer,
    canaries: Sequence[dict],
    batch_size: int = 16,
    alternatives: int = ONE_RUN_ALTERNATIVES,
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """Every one-run score of each canary, higher = more likely inserted, in the order of preference.

    From lp = log P(secret | prefix) (canary prefixes as `audit_prefix` gives them):
    - "reference" (with a reference model): lp minus the reference's, which removes how likely
      a secret is a priori;
    - "loss": lp;
    - "zlib": lp / the secret's zlib length in bytes;
    - "alternatives" (when `alternatives` > 0 and every canary says where its secret was drawn
      from): lp minus the mean lp of `alternatives` random secrets from the same space after the
      same prefix, which removes how likely any secret is after that prefix, with no reference.
    """
    rng = np.random.default_rng(seed)
    items = [(c["prefix"], [c["secret"]]) for c in canaries]
    lp = np.concatenate(suffix_logprobs(model, tokenizer, items, batch_size))
    scores = {}
    if reference is not None:
        scores["reference"] = lp - np.concatenate(reference.suffix_logprobs(tokenizer, items, batch_size))
    scores["loss"] = lp
    scores["zlib"] = lp / np.array([len(zlib.compress(c["secret"].encode("utf-8"))) for c in canaries], float)
    others = [_alternative_secrets(c, alternatives, rng) for c in canaries] if alternatives > 0 else []
    if others and all(others):
        flat = [(c["prefix"], [alt]) for c, alts in zip(canaries, others, strict=True) for alt in alts]
        alt_lp = np.concatenate(suffix_logprobs(model, tokenizer, flat, batch_size))
        per_canary = np.split(alt_lp, np.cumsum([len(a) for a in others])[:-1])
        scores["alternatives"] = lp - np.array([a.mean() for a in per_canary])
    return scores


def _alternative_secrets(canary: dict, count: int, rng: np.random.Generator) -> list[str]:
    """`count` random secrets from the canary's secret space, without its own ([] when the space is unknown)."""
    length = int(canary.get("secret_length") or 0)
    if canary.get("secret_alphabet") and length:
        return sample_candidates(canary["secret_alphabet"], length, count, canary["secret"], rng)
    words = secret_words(canary["secret_words"]) if canary.get("secret_words") and length else None
    if not words:
        return []
    out: set[str] = set()
    while len(out) < min(count, len(words) ** length - 1):
        draw = " ".join(words[i] for i in rng.integers(0, len(words), length))
        if draw != canary["secret"]:
            out.add(draw)
    return sorted(out)


def calibration_flags(canaries: Sequence[dict], seed: int) -> tuple[np.ndarray, str]:
    """Which canaries choose the score and split: their "role" in canaries.jsonl, or a random part the audit draws.

    Canaries written before roles existed get CALIBRATION_FRACTION of them, drawn with the audit's
    seed: the split need not be secret, only independent of the inclusion coins.
    """
    if all(c.get("role") in ("calibration", "audit") for c in canaries):
        return np.array([c["role"] == "calibration" for c in canaries]), "canaries (role)"
    flags = np.zeros(len(canaries), bool)
    flags[np.random.default_rng(seed).permutation(len(canaries))[: round(CALIBRATION_FRACTION * len(canaries))]] = True
    return flags, "drawn by the audit (--seed)"


def _jsonable(x):
    """Plain Python types only, so that json.dump writes audit.json as is."""
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.generic):
        return x.item()
    return x
