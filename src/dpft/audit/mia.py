"""Membership inference: per-record scores and the metrics that judge them.

Every score follows one direction: higher means "more likely a member". The metrics are
ROC AUC, TPR at low FPR (the regime that matters for privacy, Carlini et al. 2022) and
bootstrap 95% intervals over resampled members and non-members.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable, Sequence

import numpy as np
from scipy.stats import rankdata

FPR_LEVELS = (0.01, 0.001)
MIN_K_FRACTION = 0.2


def roc_curve(members: np.ndarray, non_members: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """ROC curve of the rule "member if score >= t" over all thresholds t.

    Args:
        members: scores of members.
        non_members: scores of non-members.

    Returns:
        (fpr, tpr), both starting at 0 and ending at 1, non-decreasing.
    """
    scores = np.concatenate([members, non_members])
    labels = np.concatenate([np.ones(len(members)), np.zeros(len(non_members))])
    order = np.argsort(-scores, kind="stable")
    scores, labels = scores[order], labels[order]
    # Keep only the last index of each run of tied scores: a threshold cannot split ties.
    last = np.r_[np.nonzero(np.diff(scores))[0], len(scores) - 1]
    tpr = np.r_[0.0, np.cumsum(labels)[last] / max(len(members), 1)]
    fpr = np.r_[0.0, np.cumsum(1 - labels)[last] / max(len(non_members), 1)]
    return fpr, tpr


def auc(members: np.ndarray, non_members: np.ndarray) -> float:
    """ROC AUC as the Mann-Whitney probability P(member score > non-member score), ties half.

    Args:
        members: scores of members (non-empty).
        non_members: scores of non-members (non-empty).

    Returns:
        The AUC in [0, 1].
    """
    n1, n0 = len(members), len(non_members)
    ranks = rankdata(np.concatenate([members, non_members]))
    return float((ranks[:n1].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


def tpr_at_fpr(members: np.ndarray, non_members: np.ndarray, max_fpr: float) -> float:
    """Highest TPR over thresholds whose FPR does not exceed `max_fpr`.

    Args:
        members: scores of members.
        non_members: scores of non-members.
        max_fpr: the FPR budget, e.g. 0.01.

    Returns:
        The TPR in [0, 1] (0 when no threshold meets the budget but the trivial one).
    """
    fpr, tpr = roc_curve(members, non_members)
    return float(tpr[fpr <= max_fpr].max())


def bootstrap_ci(
    members: np.ndarray,
    non_members: np.ndarray,
    stat: Callable[[np.ndarray, np.ndarray], float],
    n_boot: int = 200,
    seed: int = 0,
) -> list[float]:
    """Percentile bootstrap 95% interval of a two-sample statistic.

    Args:
        members: first sample.
        non_members: second sample.
        stat: statistic of (members, non_members).
        n_boot: number of resamples.
        seed: RNG seed, so that reports are reproducible.

    Returns:
        [low, high], the 2.5% and 97.5% percentiles.
    """
    rng = np.random.default_rng(seed)
    vals = [stat(rng.choice(members, len(members)), rng.choice(non_members, len(non_members))) for _ in range(n_boot)]
    return [float(np.percentile(vals, 2.5)), float(np.percentile(vals, 97.5))]


def compare_rates(members: np.ndarray, non_members: np.ndarray, n_boot: int = 200, seed: int = 0) -> dict:
    """Members' and non-members' means (rates of a 0/1 outcome, or scores), their difference (the
    attack's advantage) and its bootstrap 95% interval; all None when either side is empty."""
    if not len(members) or not len(non_members):
        return {"member": None, "non_member": None, "advantage": None, "advantage_ci": None}
    return {
        "member": float(members.mean()),
        "non_member": float(non_members.mean()),
        "advantage": float(members.mean() - non_members.mean()),
        "advantage_ci": bootstrap_ci(members, non_members, lambda a, b: a.mean() - b.mean(), n_boot, seed),
    }


def attack_metrics(
    members: np.ndarray,
    non_members: np.ndarray,
    n_boot: int = 200,
    seed: int = 0,
    roc_points: int = 101,
) -> dict:
    """AUC, TPR at 1% and 0.1% FPR with bootstrap CIs, and a thinned ROC curve for plots.

    Args:
        members: member scores (higher = more likely member).
        non_members: non-member scores.
        n_boot: bootstrap resamples.
        seed: bootstrap seed.
        roc_points: at most this many ROC points are kept (log-spaced FPR grid).

    Returns:
        {"auc", "auc_ci", "tpr_at_fpr": {"0.01": ..}, "tpr_at_fpr_ci": {..}, "tpr_at_fpr_missing":
        {level: why}, "roc": {"fpr", "tpr"}}. A TPR at an FPR level is given only where the
        non-members resolve it (at least 1/level of them: with n, FPR moves in steps of 1/n, and
        below one step the threshold admits no false positive at all, a different quantity);
        otherwise the level is in "tpr_at_fpr_missing" with the reason.
    """
    members, non_members = np.asarray(members, float), np.asarray(non_members, float)
    fpr, tpr = roc_curve(members, non_members)
    # Log-spaced grid: the low-FPR corner is what the log-log ROC plot shows.
    grid = np.unique(np.r_[0.0, np.logspace(-4, 0, roc_points - 1)])
    grid_tpr = [float(tpr[fpr <= g].max()) for g in grid]
    out = {
        "auc": auc(members, non_members),
        "auc_ci": bootstrap_ci(members, non_members, auc, n_boot, seed),
        "tpr_at_fpr": {},
        "tpr_at_fpr_ci": {},
        "tpr_at_fpr_missing": {},
        "roc": {"fpr": grid.tolist(), "tpr": grid_tpr},
    }
    for level in FPR_LEVELS:
        if len(non_members) * level < 1:
            out["tpr_at_fpr_missing"][str(level)] = (
                f"needs at least {math.ceil(1 / level)} non-members, {len(non_members)} scored "
                f"(smallest FPR step {1 / max(len(non_members), 1):.2%})"
            )
            continue

        def at(a: np.ndarray, b: np.ndarray, level: float = level) -> float:
            return tpr_at_fpr(a, b, level)

        out["tpr_at_fpr"][str(level)] = at(members, non_members)
        out["tpr_at_fpr_ci"][str(level)] = bootstrap_ci(members, non_members, at, n_boot, seed)
    return out


def min_k_prob(logprobs: np.ndarray, k: float = MIN_K_FRACTION) -> float:
    """Min-K% prob (Shi et al. 2024): mean of the lowest k fraction of token log-probs.

    Args:
        logprobs: the token log-probs of one sequence.
        k: fraction of tokens kept (at least one).

    Returns:
        The mean of the lowest ceil(k * n) log-probs.
    """
    n = max(1, int(np.ceil(k * len(logprobs))))
    return float(np.sort(logprobs)[:n].mean())


def record_scores(
    logprobs: Sequence[np.ndarray],
    texts: Sequence[str],
    reference_logprobs: Sequence[np.ndarray] | None = None,
) -> dict[str, np.ndarray]:
    """The membership scores of each record, all oriented higher = more likely member.

    Args:
        logprobs: token log-probs of each record under the audited model.
        texts: each record's text (for its zlib length).
        reference_logprobs: token log-probs under a reference (e.g. base) model, optional.

    Returns:
        {"loss": -loss, "zlib": -loss / zlib bytes, "min_k": Min-20% prob, and when a
        reference is given "reference": -(loss - reference loss)}.
    """
    loss = np.array([-lp.mean() for lp in logprobs])
    zlen = np.array([len(zlib.compress(t.encode("utf-8"))) for t in texts], float)
    scores = {
        "loss": -loss,
        "zlib": -loss / zlen,
        "min_k": np.array([min_k_prob(lp) for lp in logprobs]),
    }
    if reference_logprobs is not None:
        ref_loss = np.array([-lp.mean() for lp in reference_logprobs])
        scores["reference"] = -(loss - ref_loss)
    return scores
