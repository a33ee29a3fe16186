"""The medical scenario's own attack: does the model complete a patient's name with their condition?

Members are patients in the training set; non-members (held-out patients) give the rate at
which the model names the right condition by guessing from the condition frequencies alone.
A second, generation-free view ranks the true condition among all conditions by likelihood
after a neutral template. François Dupont's greedy completion is kept for the report.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence

import numpy as np

from dpft.audit.mia import compare_rates
from dpft.audit.scoring import greedy_generate, suffix_logprobs
from dpft.data.encode import encode_opening
from dpft.errors import DpftError
from dpft.scenarios.medical.records import DUPONT, NAME_RE, name_prefix

CONDITION_RE = re.compile(r'condition: "([^"]*)"')
# Chosen here (the generator's templates did not exist yet): a plain clinical phrasing that
# does not favour any condition.
NEUTRAL_TEMPLATE = " was diagnosed with"


def parse_patient(record: dict) -> dict | None:
    """Name, condition and unit of a prompt/completion medical record.

    Args:
        record: a record with "prompt", "completion" and optionally "user_id".

    Returns:
        {"user_id", "first", "last", "condition"}, or None for records of another shape
        (canary text records, free-form prompts).
    """
    name = NAME_RE.match(record.get("prompt") or "")
    cond = CONDITION_RE.search(record.get("completion") or "")
    if not name or not cond:
        return None
    first, last = name.groups()
    uid = record.get("user_id") or f"{first} {last}"
    return {"user_id": uid, "first": first, "last": last, "condition": cond.group(1)}


def patients(records: Sequence[dict]) -> list[dict]:
    """One entry per patient (deduplicated by user_id), with their number of records.

    Args:
        records: prompt/completion medical records; other records are ignored.

    Returns:
        Patient dicts as from `parse_patient`, plus "records" (count), in first-seen order.
    """
    parsed = [p for p in map(parse_patient, records) if p is not None]
    counts = Counter(p["user_id"] for p in parsed)
    first_seen: dict[str, dict] = {}
    for p in parsed:
        first_seen.setdefault(p["user_id"], {**p, "records": counts[p["user_id"]]})
    return list(first_seen.values())


def medical_audit(
    model,
    tokenizer,
    members: Sequence[dict],
    non_members: Sequence[dict],
    conditions: Sequence[str] | None = None,
    *,
    batch_size: int = 16,
    max_new_tokens: int = 24,
    max_records: int | None = None,
    seed: int = 0,
    n_boot: int = 200,
    rank_conditions: bool = True,
) -> dict:
    """The scenario's sections of audit.json: targeted extraction and Dupont's completion.

    Args:
        model: the audited causal LM (in eval mode).
        tokenizer: its tokenizer.
        members: training records; medical prompt/completion records are used, others ignored.
        non_members: held-out records.
        conditions: every condition name (manifest.json); None derives them from the records.
        batch_size: prompts per batch.
        max_new_tokens: tokens generated per name prefix.
        max_records: cap on member and on non-member patients (Dupont always kept).
        seed: seed of subsampling and bootstraps.
        n_boot: bootstrap resamples.
        rank_conditions: also rank each true condition among all by likelihood (about as costly
            as the extraction's generation).

    Returns:
        {"member_patients", "non_member_patients", "extraction": {...}, "dupont_completion"}.

    Raises:
        DpftError: if either side has no medical patient.
    """
    rng = np.random.default_rng(seed)
    everyone = patients(members), patients(non_members)
    mem = _cap(everyone[0], max_records, rng, keep=DUPONT)
    non = _cap(everyone[1], max_records, rng)
    if not mem or not non:
        raise DpftError(
            "the medical audit needs member and non-member medical records "
            "(prompt '{medical_record: \"<First> <Last> ...' with a completion)"
        )
    names = list(conditions) if conditions else sorted({p["condition"] for p in [*everyone[0], *everyone[1]]})
    extraction = extraction_attack(
        model,
        tokenizer,
        mem,
        non,
        names,
        batch_size=batch_size,
        max_new_tokens=max_new_tokens,
        seed=seed,
        n_boot=n_boot,
        rank_conditions=rank_conditions,
    )
    dupont = extraction.pop("dupont_completion")
    return {
        "member_patients": len(mem),
        "non_member_patients": len(non),
        "extraction": extraction,
        "dupont_completion": dupont,
    }


def _cap(items: list, limit: int | None, rng: np.random.Generator, keep: tuple[str, str] | None = None) -> list:
    """A seeded random subset of at most `limit` patients, always keeping the patient `keep`."""
    if limit is None or len(items) <= limit:
        return items
    kept = [i for i, x in enumerate(items) if keep and (x.get("first"), x.get("last")) == keep]
    rest = [i for i in rng.permutation(len(items)) if i not in kept]
    return [items[i] for i in sorted([*kept, *rest][:limit])]


def condition_ranks(
    model,
    tokenizer,
    people: Sequence[dict],
    conditions: Sequence[str],
    batch_size: int = 16,
) -> np.ndarray:
    """Rank (1 = most likely) of each patient's true condition among all conditions.

    Args:
        model: a causal LM.
        tokenizer: its tokenizer.
        people: patients from `patients`.
        conditions: every condition name; each patient's own is added if missing.
        batch_size: sequences per forward pass.

    Returns:
        Integer ranks; ties count in the true condition's favour.
    """
    items = []
    for p in people:
        cands = list(dict.fromkeys([p["condition"], *conditions]))
        items.append((name_prefix(p["first"], p["last"]) + NEUTRAL_TEMPLATE, [" " + c for c in cands]))
    scores = suffix_logprobs(model, tokenizer, items, batch_size)
    return np.array([1 + int(np.sum(s[1:] > s[0])) for s in scores])


def extraction_attack(
    model,
    tokenizer,
    members: Sequence[dict],
    non_members: Sequence[dict],
    conditions: Sequence[str],
    *,
    batch_size: int = 16,
    max_new_tokens: int = 24,
    seed: int = 0,
    n_boot: int = 200,
    rank_conditions: bool = True,
) -> dict:
    """Name-prefix extraction rates, their advantage over non-members, and condition ranks.

    Args:
        model: a causal LM.
        tokenizer: its tokenizer.
        members: member patients (from `patients` over the training records).
        non_members: held-out patients.
        conditions: every condition name, for the likelihood ranking.
        batch_size: prompts per batch.
        max_new_tokens: tokens generated per prompt.
        seed: bootstrap seed.
        n_boot: bootstrap resamples.
        rank_conditions: also rank each true condition among all by likelihood (one scoring pass
            per patient over every condition: about as costly as the generation).

    Returns:
        {"member_rate", "non_member_rate", "advantage", "advantage_ci", "by_repetition",
        "rank": {...} or None, "members", "non_members", "dupont_completion"}; dupont_completion
        is the generated continuation for François Dupont (None when he is not a member).
    """
    people = [*members, *non_members]
    prompts = [encode_opening(tokenizer, name_prefix(p["first"], p["last"])) for p in people]
    texts = greedy_generate(model, tokenizer, prompts, batch_size, max_new_tokens)
    hit = np.array([p["condition"].lower() in t.lower() for p, t in zip(people, texts, strict=True)])
    mem, non = hit[: len(members)].astype(float), hit[len(members) :].astype(float)
    by_rep = {}
    for reps in sorted({p["records"] for p in members}):
        sel = [i for i, p in enumerate(members) if p["records"] == reps]
        by_rep[str(reps)] = {"patients": len(sel), "rate": float(mem[sel].mean())}
    dupont = next((t for p, t in zip(members, texts, strict=False) if (p["first"], p["last"]) == DUPONT), None)
    rates = compare_rates(mem, non, n_boot, seed)
    return {
        "members": len(members),
        "non_members": len(non_members),
        "member_rate": _mean(mem),
        "non_member_rate": _mean(non),
        "advantage": rates["advantage"],
        "advantage_ci": rates["advantage_ci"],
        "by_repetition": by_rep,
        "rank": _rank_summary(model, tokenizer, people, len(members), conditions, batch_size)
        if rank_conditions
        else None,
        "dupont_completion": dupont,
    }


def _rank_summary(model, tokenizer, people: list[dict], n_members: int, conditions, batch_size: int) -> dict:
    ranks = condition_ranks(model, tokenizer, people, conditions, batch_size)
    r_mem, r_non = ranks[:n_members], ranks[n_members:]
    return {
        "template": NEUTRAL_TEMPLATE.strip(),
        "num_conditions": len(set(conditions)),
        "member_mean_rank": _mean(r_mem),
        "non_member_mean_rank": _mean(r_non),
        "member_top1": _mean(r_mem == 1),
        "non_member_top1": _mean(r_non == 1),
    }


def _mean(x: np.ndarray) -> float | None:
    return float(np.mean(x)) if len(x) else None
