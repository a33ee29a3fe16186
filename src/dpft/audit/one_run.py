"""Empirical epsilon lower bound from one training run (Steinke, Nasr & Jagielski, NeurIPS 2023).

Each "one_run" canary was inserted with probability 1/2. The auditor guesses "in" for the
k+ highest scores and "out" for the k- lowest and abstains on the rest. Under (eps, delta)-DP
the number of correct guesses among r is dominated by Binomial(r, e^eps / (1 + e^eps)) up to a
delta term (their Theorem 3 and its appendix code), so a count too high for that law at 95%
confidence refutes eps: the largest refuted eps is the lower bound.

Several (k+, k-) splits are tried; to stay honest about that search, each split is tested at
level 0.05 / (number of splits) (Bonferroni), so the reported maximum holds at 95% overall.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from scipy.stats import binom

CONFIDENCE = 0.95
# Fractions of the canaries guessed on each side; 0.5 + 0.5 guesses every canary.
GUESS_FRACTIONS = (0.05, 0.1, 0.2, 0.5)


def p_value(m: int, r: int, v: int, eps: float, delta: float = 0.0) -> float:
    """Probability of >= v correct guesses out of r under an (eps, delta)-DP mechanism.

    Args:
        m: number of canaries, each included independently with probability 1/2.
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
        m: number of canaries.
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


def one_run_audit(scores: Sequence[float], included: Sequence[bool], delta: float = 0.0) -> dict:
    """Guess membership from scores, count correct guesses and bound epsilon from below.

    Args:
        scores: one score per canary, higher = more likely inserted.
        included: whether each canary was inserted.
        delta: delta of the guarantee being tested (0 for pure DP).

    Returns:
        {"epsilon_lower_bound", "k_plus", "k_minus", "guesses", "correct", "m", "delta",
        "confidence", "correction", "splits": [per split results]}.
    """
    scores, truth = np.asarray(scores, float), np.asarray(included, bool)
    m = len(scores)
    order = np.argsort(-scores, kind="stable")
    level = (1 - CONFIDENCE) / len(GUESS_FRACTIONS)
    splits = []
    for frac in GUESS_FRACTIONS:
        k = int(frac * m)
        top, bottom = order[:k], order[m - k :] if k else order[:0]
        correct = int(truth[top].sum() + (~truth[bottom]).sum())
        splits.append(
            {
                "k_plus": k,
                "k_minus": k,
                "guesses": 2 * k,
                "correct": correct,
                "epsilon": epsilon_lower_bound(m, 2 * k, correct, delta, level),
            }
        )
    best = max(splits, key=lambda s: s["epsilon"])
    return {
        "epsilon_lower_bound": best["epsilon"],
        "k_plus": best["k_plus"],
        "k_minus": best["k_minus"],
        "guesses": best["guesses"],
        "correct": best["correct"],
        "m": m,
        "delta": delta,
        "confidence": CONFIDENCE,
        "correction": f"Bonferroni over {len(GUESS_FRACTIONS)} splits",
        "splits": splits,
    }
