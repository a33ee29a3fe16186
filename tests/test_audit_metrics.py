"""Audit metrics on synthetic scores whose answers are known in closed form."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from scipy.stats import norm, skewnorm

from dpft.audit.exposure import estimated_exposure, exact_exposure, sample_candidates
from dpft.audit.mia import (
    attack_metrics,
    auc,
    bootstrap_ci,
    min_k_prob,
    record_scores,
    roc_curve,
    tpr_at_fpr,
)
from dpft.audit.one_run import epsilon_lower_bound, one_run_audit, p_value


@pytest.mark.parametrize("mu", [0.0, 0.5, 1.5])
def test_auc_of_gaussians_is_phi_mu_over_sqrt2(mu):
    rng = np.random.default_rng(1)
    members, non = rng.normal(mu, 1, 5000), rng.normal(0, 1, 5000)
    assert auc(members, non) == pytest.approx(norm.cdf(mu / math.sqrt(2)), abs=0.015)


def test_auc_counts_ties_half_and_matches_roc_area():
    members, non = np.array([3.0, 2.0]), np.array([1.0, 2.0])
    assert auc(members, non) == 0.875
    fpr, tpr = roc_curve(members, non)
    assert np.trapezoid(tpr, fpr) == pytest.approx(0.875)
    assert fpr[0] == tpr[0] == 0 and fpr[-1] == tpr[-1] == 1


@pytest.mark.parametrize("level", [0.01, 0.001])
def test_tpr_at_fpr_on_shifted_gaussians(level):
    rng = np.random.default_rng(2)
    members, non = rng.normal(2, 1, 100_000), rng.normal(0, 1, 100_000)
    want = norm.sf(norm.isf(level) - 2)
    assert tpr_at_fpr(members, non, level) == pytest.approx(want, abs=0.03)


def test_tpr_at_fpr_is_zero_for_inverted_scores_and_one_for_separated():
    low, high = np.arange(10.0), np.arange(10.0) + 100
    assert tpr_at_fpr(low, high, 0.01) == 0.0
    assert tpr_at_fpr(high, low, 0.01) == 1.0


def test_bootstrap_ci_covers_true_auc_in_most_replications():
    mu, covered = 1.0, 0
    truth = norm.cdf(mu / math.sqrt(2))
    for seed in range(20):
        rng = np.random.default_rng(100 + seed)
        lo, hi = bootstrap_ci(rng.normal(mu, 1, 300), rng.normal(0, 1, 300), auc, 200, seed)
        covered += lo <= truth <= hi
    assert covered >= 16  # nominal 95%: 19 of 20 expected


def test_attack_metrics_shape():
    rng = np.random.default_rng(3)
    out = attack_metrics(rng.normal(1, 1, 200), rng.normal(0, 1, 1000), n_boot=50)
    assert out["auc_ci"][0] <= out["auc"] <= out["auc_ci"][1]
    assert set(out["tpr_at_fpr"]) == {"0.01", "0.001"}
    assert len(out["roc"]["fpr"]) == len(out["roc"]["tpr"]) <= 101
    assert np.all(np.diff(out["roc"]["tpr"]) >= 0)


def test_scores_point_towards_members():
    low_loss, high_loss = np.full(10, -0.1), np.full(10, -3.0)
    scores = record_scores(
        [low_loss, high_loss], ["same text", "same text"], reference_logprobs=[np.full(10, -1.0), np.full(10, -1.0)]
    )
    for name, s in scores.items():
        assert s[0] > s[1], name
    assert min_k_prob(np.array([-5.0, -1, -1, -1, -1, -1, -1, -1, -1, -4])) == -4.5


def test_exposure_skewnorm_estimate_matches_exact_rank():
    rng = np.random.default_rng(4)
    # A known "space" of 10^6 log-perplexities, skewed like real ones.
    space = skewnorm.rvs(4, loc=20, scale=3, size=1_000_000, random_state=rng)
    for rank in (1_000, 20_000):
        secret = np.partition(space, rank - 1)[rank - 1] - 1e-9
        sample = rng.choice(space, 2000, replace=False)
        exact = exact_exposure(secret, space)
        assert exact == pytest.approx(math.log2(1_000_001 / rank), abs=0.01)
        assert estimated_exposure(secret, sample, 1_000_001) == pytest.approx(exact, abs=0.7)


def test_exposure_of_top_ranked_secret_is_log2_space():
    others = np.linspace(10, 20, 999)
    assert exact_exposure(1.0, others) == pytest.approx(math.log2(1000))
    assert estimated_exposure(-100.0, others, 1e6) == pytest.approx(math.log2(1e6))
    assert estimated_exposure(100.0, others, 1e6) == pytest.approx(0.0, abs=1e-6)


def test_candidates_are_distinct_and_exclude_secret():
    cands = sample_candidates("01", 3, 100, "101", np.random.default_rng(0))
    assert len(cands) == 7 and "101" not in cands and len(set(cands)) == 7


def test_one_run_bound_all_correct_is_5_81():
    assert epsilon_lower_bound(1000, 1000, 1000) == pytest.approx(5.81, abs=0.01)


def test_one_run_bound_is_monotone_and_zero_at_chance():
    bounds = [epsilon_lower_bound(1000, 1000, v) for v in range(500, 1001, 50)]
    assert bounds[0] == 0.0
    assert all(b2 > b1 for b1, b2 in itertools.pairwise(bounds))
    assert epsilon_lower_bound(1000, 1000, 1000, delta=1e-5) < bounds[-1]


def test_one_run_p_value_at_the_bound_is_the_level():
    eps = epsilon_lower_bound(1000, 200, 180)
    assert p_value(1000, 200, 180, eps) == pytest.approx(0.05, abs=1e-3)


def test_one_run_audit_perfect_and_random_scores():
    rng = np.random.default_rng(5)
    included = rng.permutation(np.arange(1000) < 500)
    perfect = one_run_audit(included.astype(float), included)
    # Bonferroni over the splits costs a little against the uncorrected 5.81.
    assert 5.0 < perfect["epsilon_lower_bound"] < 5.81
    assert perfect["correct"] == perfect["guesses"] == 1000
    assert one_run_audit(rng.random(1000), included)["epsilon_lower_bound"] < 0.5


def test_tpr_is_given_only_at_fpr_levels_the_non_members_resolve():
    rng = np.random.default_rng(4)
    few = attack_metrics(rng.normal(1, 1, 80), rng.normal(0, 1, 80), n_boot=10)  # FPR steps of 1.25%
    assert set(few["tpr_at_fpr"]) == set() and set(few["tpr_at_fpr_missing"]) == {"0.01", "0.001"}
    assert few["tpr_at_fpr_missing"]["0.001"] == "needs at least 1000 non-members, 80 scored (smallest FPR step 1.25%)"
    some = attack_metrics(rng.normal(1, 1, 100), rng.normal(0, 1, 100), n_boot=10)
    assert set(some["tpr_at_fpr"]) == {"0.01"} and set(some["tpr_at_fpr_missing"]) == {"0.001"}
