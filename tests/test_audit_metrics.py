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
    compare_rates,
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


def test_compare_rates_is_the_difference_of_rates_with_a_covering_interval():
    members, non = np.array([1.0, 1, 1, 0]), np.array([1.0, 0, 0, 0, 0])
    out = compare_rates(members, non, n_boot=200)
    assert (out["member"], out["non_member"]) == (0.75, 0.2)
    assert out["advantage"] == pytest.approx(0.55)
    assert out["advantage_ci"][0] < 0.55 < out["advantage_ci"][1]
    assert compare_rates(members, np.array([]))["advantage"] is None


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


def coins_and_calibration(seed: int, n: int = 1000, fraction: float = 0.25) -> tuple[np.ndarray, np.ndarray]:
    """Fair inclusion coins and a random calibration part of the canaries, as the generators draw them."""
    rng = np.random.default_rng(seed)
    calibration = np.zeros(n, bool)
    calibration[rng.permutation(n)[: round(fraction * n)]] = True
    return rng.random(n) < 0.5, calibration


def test_positive_only_split_matches_a_hand_computation():
    """100 "in" guesses, all right: p(eps) = q^100 with q = e^eps / (1 + e^eps); the bound solves q^100 = 0.05."""
    assert p_value(100, 100, 100, 3.0) == pytest.approx((math.exp(3) / (1 + math.exp(3))) ** 100)
    assert p_value(100, 100, 100, 3.0) < 0.0125  # the arithmetic: 0.9526^100 ≈ 0.008
    q = 0.05 ** (1 / 100)
    hand = math.log(q / (1 - q))
    included = np.arange(1000) % 2 == 0
    scores = np.where(included, 1.0, 0.0) + np.linspace(0, 0.5, 1000)  # every included canary above every other
    out = one_run_audit(scores, included)  # no calibration canaries: the default split, k+ = 10% of m, k- = 0
    assert (out["k_plus"], out["k_minus"], out["guesses"], out["correct"], out["m"]) == (100, 0, 100, 100, 1000)
    assert out["epsilon_lower_bound"] == pytest.approx(hand, abs=1e-6) and 3.4 < hand < 3.5
    assert out["calibration"]["chosen_by"] == "default"
    # 90 right out of 100: the bound is where the binomial tail, summed by hand, is 0.05.
    eps = epsilon_lower_bound(1000, 100, 90)
    q = math.exp(eps) / (1 + math.exp(eps))
    tail = sum(math.comb(100, i) * q**i * (1 - q) ** (100 - i) for i in range(90, 101))
    assert tail == pytest.approx(0.05, abs=1e-6) and 1.0 < eps < 2.0


def test_a_perfect_score_on_1000_canaries_refutes_epsilon_3():
    included, calibration = coins_and_calibration(5)
    out = one_run_audit({"loss": included.astype(float)}, included, calibration, delta=1e-5)
    assert out["epsilon_lower_bound"] >= 3.0
    assert out["correct"] == out["guesses"] > 100
    assert out["m"] == 750 and out["canaries"] == 1000 and out["calibration"]["canaries"] == 250
    assert out["calibration"]["chosen_by"] == "calibration" and out["calibration"]["predicted_epsilon"] > 3


def test_random_scores_refute_nothing():
    """Several scores, none informative: the chosen one must still pass a 95% test only by chance."""
    bounds = []
    for seed in range(20):
        included, calibration = coins_and_calibration(seed)
        rng = np.random.default_rng(100 + seed)
        scores = {name: rng.random(1000) for name in ("loss", "reference", "zlib", "alternatives")}
        bounds.append(one_run_audit(scores, included, calibration, delta=1e-5)["epsilon_lower_bound"])
    assert max(bounds) < 0.5 and sum(b > 0 for b in bounds) <= 2, bounds


def test_a_weak_signal_in_one_score_is_found_by_calibration():
    """A third of the included canaries memorised, in one of two scores: calibration picks it, positive-only."""
    included, calibration = coins_and_calibration(7)
    rng = np.random.default_rng(8)
    memorised = included & (rng.random(1000) < 1 / 3)
    scores = {"zlib": rng.normal(size=1000), "loss": rng.normal(size=1000) + 6 * memorised}
    out = one_run_audit(scores, included, calibration)
    assert out["score"] == "loss" and out["k_minus"] == 0 and out["epsilon_lower_bound"] > 3.0


def test_the_choice_never_sees_the_audited_canaries():
    """Shuffling the audited canaries' coins (and scores) changes the test's outcome, never the choice."""
    included, calibration = coins_and_calibration(11)
    rng = np.random.default_rng(12)
    scores = {"loss": rng.normal(size=1000) + 2 * included, "zlib": rng.normal(size=1000) + included}
    first = one_run_audit(scores, included, calibration)
    audited = np.flatnonzero(~calibration)
    for seed in range(3):
        shuffled = included.copy()
        shuffled[audited] = np.random.default_rng(seed).permutation(included[audited])
        again = one_run_audit(scores, shuffled, calibration)
        assert again["calibration"] == first["calibration"]
        assert [again[k] for k in ("score", "k_plus", "k_minus")] == [first[k] for k in ("score", "k_plus", "k_minus")]
        assert again["correct"] != first["correct"]  # the coins did matter to the test itself
    # The calibration canaries' own coins do drive the choice.
    flipped = included.copy()
    flipped[calibration] = ~flipped[calibration]
    assert one_run_audit(scores, flipped, calibration)["calibration"] != first["calibration"]


def test_m_counts_the_audited_canaries_only():
    included, calibration = coins_and_calibration(3, n=400, fraction=0.3)
    out = one_run_audit({"loss": included.astype(float)}, included, calibration, delta=1e-5)
    assert out["m"] == 280 and out["k_plus"] + out["k_minus"] == out["guesses"] <= 280
    # The same guesses with m = 400 would give a different delta term: the bound uses 280.
    assert out["epsilon_lower_bound"] == epsilon_lower_bound(280, out["guesses"], out["correct"], 1e-5)


def test_tpr_is_given_only_at_fpr_levels_the_non_members_resolve():
    rng = np.random.default_rng(4)
    few = attack_metrics(rng.normal(1, 1, 80), rng.normal(0, 1, 80), n_boot=10)  # FPR steps of 1.25%
    assert set(few["tpr_at_fpr"]) == set() and set(few["tpr_at_fpr_missing"]) == {"0.01", "0.001"}
    assert few["tpr_at_fpr_missing"]["0.001"] == "needs at least 1000 non-members, 80 scored (smallest FPR step 1.25%)"
    some = attack_metrics(rng.normal(1, 1, 100), rng.normal(0, 1, 100), n_boot=10)
    assert set(some["tpr_at_fpr"]) == {"0.01"} and set(some["tpr_at_fpr_missing"]) == {"0.001"}
