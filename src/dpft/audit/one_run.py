"""Empirical epsilon lower bound from one training run (Steinke, Nasr & Jagielski, NeurIPS 2023).

Each one-run canary was inserted with probability 1/2 (independent fair coins). The auditor
guesses "in" for the k+ highest scores and "out" for the k- lowest and abstains on the rest.
Under (eps, delta)-DP the number of correct guesses among r is dominated by
Binomial(r, e^eps / (1 + e^eps)) up to a delta term (their Theorem 3 and its appendix code), so a
count too high for that law at 95% confidence refutes eps: the largest refuted eps is the lower
bound. Any k+ and k- are allowed, k- = 0 included. For a language model the evidence is
one-sided: a memorised canary has an unusually high score, an absent one is unremarkable, so
positive-only guesses (k- = 0, k+ = the top fraction) are usually the strongest test: 100 correct
"in" guesses out of 100 refute eps = 3 at level 0.008 (0.9526^100).

Which score and which (k+, k-) to use is chosen on a random part of the canaries, the calibration
canaries (their coins are known to the auditor, like every canary's): for each candidate, the
precision of its guesses on the calibration canaries (at MARGIN times its guesses, so that a
split at the edge of what stands out is not chosen on a lucky draw) predicts the bound it would
give on the others. The test then runs ONCE, with the chosen score and split, on the other
canaries, and m in the bound is their number. The choice never sees the audited canaries' scores or coins, so no
multiple-testing correction is due. Without calibration canaries, a fixed default (the first
score, DEFAULT_SPLIT) is tested once on every canary.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
from scipy.stats import binom

CONFIDENCE = 0.95
# (k+, k-) as fractions of the audited canaries: positive-only guesses, then symmetric ones.
POSITIVE_FRACTIONS = (0.01, 0.02, 0.03, 0.05, 0.07, 0.1, 0.13, 0.16, 0.2, 0.25, 0.3, 0.4, 0.5)
SYMMETRIC_FRACTIONS = (0.05, 0.1, 0.2, 0.5)
SPLITS = (*((f, 0.0) for f in POSITIVE_FRACTIONS), *((f, f) for f in SYMMETRIC_FRACTIONS))
DEFAULT_SPLIT = (0.1, 0.0)
# A split is judged by the calibration precision of this many times its guesses: how many canaries
# stand out differs between the calibration and the audited canaries, and a split at the edge of
# them loses most when the audited ones have fewer.
MARGIN = 1.5


def p_value(m: int, r: int, v: int, eps: float, delta: float = 0.0) -> float:
    """Probability of >= v correct guesses out of r under an (eps, delta)-DP mechanism.

    Args:
        m: number of audited canaries, each included independently with probability 1/2.
        r: number of guesses (abstentions excluded).
        v: number of correct guesses.
        eps: the null hypothesis' epsilon.
        delta: the null hypothesis' delta.

    Returns:
        The p-value, capped at 1.
    """
    q = 1.0 / (1.0 + math.exp(-eps))
    beta = binom.sf(v - 1, r, q)
    if delta == 0.0:
        return float(min(beta, 1.0))
    # The delta term: delta * 2m * max_i P[v - i <= Binomial(r, q) < v] / i.
    pmf = binom.pmf(np.arange(v - 1, -1, -1), r, q)
    alpha = float(np.max(np.cumsum(pmf) / np.arange(1, v + 1))) if v > 0 else 0.0
    return float(min(beta + alpha * delta * 2 * m, 1.0))


def epsilon_lower_bound(
    m: int,
    r: int,
    v: int,
    delta: float = 0.0,
    alpha: float = 1 - CONFIDENCE,
) -> float:
    """Largest eps that `v` correct guesses out of `r` refute at level `alpha`.

    Args:
        m: number of audited canaries.
        r: number of guesses.
        v: number of correct guesses.
        delta: delta of the null hypothesis.
        alpha: test level (0.05 for 95% confidence).

    Returns:
        The lower bound (0 when even eps = 0 is not refuted).
    """
    if r == 0 or p_value(m, r, v, 0.0, delta) > alpha:
        return 0.0
    lo, hi = 0.0, 1.0
    while p_value(m, r, v, hi, delta) <= alpha:
        lo, hi = hi, hi * 2
    for _ in range(50):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if p_value(m, r, v, mid, delta) <= alpha else (lo, mid)
    return lo


def guesses(m: int, split: tuple[float, float]) -> tuple[int, int]:
    """(k+, k-) of a split of fractions, for m canaries."""
    return round(split[0] * m), round(split[1] * m)


def count_correct(scores: np.ndarray, truth: np.ndarray, k_plus: int, k_minus: int) -> int:
    """Correct guesses when the k+ highest scores are guessed in and the k- lowest out (ties: stable order)."""
    order = np.argsort(-scores, kind="stable")
    top, bottom = order[:k_plus], order[len(order) - k_minus :] if k_minus else order[:0]
    return int(truth[top].sum() + (~truth[bottom]).sum())


def predicted_epsilon(
    scores: np.ndarray, truth: np.ndarray, split: tuple[float, float], m_audit: int, delta: float
) -> tuple[int, int, float]:
    """What a split would give on m_audit canaries, judged on the calibration canaries alone.

    Returns (guesses, correct) of MARGIN times the split's fractions on the calibration canaries
    and the predicted bound: the bound of the split's guess count on m_audit canaries at that
    precision, Laplace-smoothed ((correct + 1) / (guesses + 2)) so that a few lucky guesses do
    not look like a perfect score.
    """
    k_plus, k_minus = guesses(len(scores), (min(MARGIN * split[0], 1.0), min(MARGIN * split[1], 1.0)))
    r = k_plus + k_minus
    if r == 0:
        return 0, 0, 0.0
    correct = count_correct(scores, truth, k_plus, k_minus)
    precision = (correct + 1) / (r + 2)
    r_audit = sum(guesses(m_audit, split))
    return r, correct, epsilon_lower_bound(m_audit, r_audit, math.floor(precision * r_audit), delta)


def one_run_audit(
    scores: Mapping[str, Sequence[float]] | Sequence[float],
    included: Sequence[bool],
    calibration: Sequence[bool] | None = None,
    delta: float = 0.0,
) -> dict:
    """Choose a score and a guess split on the calibration canaries, then bound epsilon once on the others.

    Args:
        scores: one score per canary (higher = more likely inserted), or several scores by name;
            the first name is the default when there is nothing to calibrate on.
        included: whether each canary was inserted.
        calibration: True for the canaries used only to choose the score and the split; None or
            all False: the default score and split, tested on every canary.
        delta: delta of the guarantee being tested (0 for pure DP).

    Returns:
        {"epsilon_lower_bound", "score", "k_plus", "k_minus", "guesses", "correct", "m" (audited
        canaries), "canaries" (all), "delta", "confidence", "correction", "calibration": {
        "canaries", "included", "chosen_by", "score", "k_plus_fraction", "k_minus_fraction",
        "predicted_epsilon", "candidates": [per score and split: calibration guesses, correct,
        predicted bound]}}.

    Raises:
        ValueError: if the lengths differ or no score is given.
    """
    table = {k: np.asarray(v, float) for k, v in scores.items()} if isinstance(scores, Mapping) else None
    table = table if table is not None else {"score": np.asarray(scores, float)}
    truth = np.asarray(included, bool)
    cal = np.zeros(len(truth), bool) if calibration is None else np.asarray(calibration, bool)
    if not table or any(len(s) != len(truth) for s in table.values()) or len(cal) != len(truth):
        raise ValueError("one score per canary for every score, one coin and one calibration flag per canary")
    audited = ~cal
    m = int(audited.sum())
    candidates = []
    for name, s in table.items():
        for split in SPLITS:
            r, correct, predicted = predicted_epsilon(s[cal], truth[cal], split, m, delta)
            candidates.append(
                {
                    "score": name,
                    "k_plus_fraction": split[0],
                    "k_minus_fraction": split[1],
                    "guesses": r,
                    "correct": correct,
                    "predicted_epsilon": predicted,
                }
            )
    best = max(candidates, key=lambda c: c["predicted_epsilon"])  # first of equals: the order given
    if best["predicted_epsilon"] > 0:
        chosen_by, name, split = "calibration", best["score"], (best["k_plus_fraction"], best["k_minus_fraction"])
    else:
        chosen_by, name, split = "default", next(iter(table)), DEFAULT_SPLIT
    k_plus, k_minus = guesses(m, split)
    correct = count_correct(table[name][audited], truth[audited], k_plus, k_minus)
    bound = epsilon_lower_bound(m, k_plus + k_minus, correct, delta)
    return {
        "epsilon_lower_bound": bound,
        "score": name,
        "k_plus": k_plus,
        "k_minus": k_minus,
        "guesses": k_plus + k_minus,
        "correct": correct,
        "m": m,
        "canaries": len(truth),
        "delta": delta,
        "confidence": CONFIDENCE,
        "correction": "none: one test, its score and split chosen on the calibration canaries",
        "calibration": {
            "canaries": int(cal.sum()),
            "included": int(truth[cal].sum()),
            "chosen_by": chosen_by,
            "score": name,
            "k_plus_fraction": split[0],
            "k_minus_fraction": split[1],
            "predicted_epsilon": best["predicted_epsilon"] if chosen_by == "calibration" else None,
            "candidates": candidates,
        },
    }
