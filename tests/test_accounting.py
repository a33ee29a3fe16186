"""Accounting against independent references (invariant 5), calibration, and checkpointed state."""

from __future__ import annotations

import json
import math

import pytest
from dp_accounting.pld import PLDAccountant
from scipy import optimize, stats

from dpft.errors import CheckpointError, ConfigError
from dpft.privacy.accounting import (
    ACCOUNTANTS,
    PLD_DISCRETIZATION,
    PrivacyAccountant,
    calibrate_noise,
    check_delta,
    compute_epsilon,
    dp_event,
    max_steps,
)


def analytic_gaussian_epsilon(sigma: float, delta: float) -> float:
    """Exact ε of one Gaussian mechanism with sensitivity 1 (Balle & Wang 2018, Theorem 8)."""

    def delta_at(eps: float) -> float:
        return stats.norm.cdf(0.5 / sigma - eps * sigma) - math.exp(eps) * stats.norm.cdf(-0.5 / sigma - eps * sigma)

    return optimize.brentq(lambda e: delta_at(e) - delta, 0.0, 100.0, xtol=1e-12)


def test_pld_matches_published_reference():
    # q=0.01, σ=4, T=10,000, δ=1e-5: ε ≈ 0.947 (PLD with a 1e-5 grid, Google dp_accounting).
    assert compute_epsilon(0.01, 4.0, 10_000, 1e-5) == pytest.approx(0.947, rel=0.01)


def test_rdp_matches_published_reference():
    # Same setting, RDP (Mironov et al. 2019 sampled Gaussian moments): ε ≈ 1.036.
    assert compute_epsilon(0.01, 4.0, 10_000, 1e-5, "rdp") == pytest.approx(1.036, rel=0.01)


@pytest.mark.parametrize(("sigma", "steps"), [(2.0, 1), (8.0, 16), (1.0, 1)])
def test_pld_matches_exact_gaussian_without_sampling(sigma, steps):
    # With q = 1, T Gaussian steps at σ are exactly one Gaussian at σ/√T: a closed form.
    exact = analytic_gaussian_epsilon(sigma / math.sqrt(steps), 1e-5)
    pld = compute_epsilon(1.0, sigma, steps, 1e-5)
    assert exact <= pld <= exact * 1.005  # pessimistic: an upper bound, and a tight one


def test_epsilon_grows_with_steps_and_falls_with_noise():
    by_steps = [compute_epsilon(0.02, 1.0, t, 1e-5) for t in (10, 100, 1000)]
    by_noise = [compute_epsilon(0.02, s, 100, 1e-5) for s in (0.7, 1.0, 2.0)]
    assert by_steps == sorted(by_steps) and len(set(by_steps)) == 3
    assert by_noise == sorted(by_noise, reverse=True) and len(set(by_noise)) == 3


def test_pld_is_tighter_than_rdp():
    assert compute_epsilon(0.05, 1.0, 500, 1e-6) < compute_epsilon(0.05, 1.0, 500, 1e-6, "rdp")


def test_edge_values():
    assert compute_epsilon(0.1, 1.0, 0, 1e-5) == 0.0
    assert compute_epsilon(0.1, 0.0, 10, 1e-5) == math.inf
    assert max_steps(0.1, 0.0, 1e-5, 10.0) == 0


def test_mixed_history_equals_dp_accounting_composition():
    segments = [(0.01, 1.0, 300), (0.02, 1.5, 200), (0.01, 1.0, 100)]
    accountant = PrivacyAccountant()
    for q, sigma, count in segments:
        accountant.step(q, sigma, count)
    reference = PLDAccountant(value_discretization_interval=PLD_DISCRETIZATION)
    reference.compose(dp_event(segments))
    assert accountant.epsilon(1e-5) == pytest.approx(reference.get_epsilon(1e-5), rel=1e-9)
    # One segment per step, or one per run, is the same mechanism.
    single = PrivacyAccountant()
    for _ in range(50):
        single.step(0.01, 1.0)
    assert single.history == [(0.01, 1.0, 50)]
    assert single.epsilon(1e-5) == compute_epsilon(0.01, 1.0, 50, 1e-5)


@pytest.mark.parametrize("accountant", ACCOUNTANTS)
@pytest.mark.parametrize(("q", "steps", "target"), [(0.01, 2000, 1.0), (0.05, 300, 8.0)])
def test_calibration_round_trip(accountant, q, steps, target):
    sigma = calibrate_noise(q, steps, 1e-5, target, accountant)
    achieved = compute_epsilon(q, sigma, steps, 1e-5, accountant)
    assert target * 0.98 <= achieved <= target
    # The smallest such σ: 1 % less noise already overshoots the target.
    assert compute_epsilon(q, sigma * 0.99, steps, 1e-5, accountant) > target


def test_calibration_refuses_unreachable_targets():
    with pytest.raises(ConfigError, match="--epsilon"):
        calibrate_noise(1.0, 1, 1e-5, 5000.0, "rdp")


@pytest.mark.parametrize("accountant", ACCOUNTANTS)
def test_max_steps_boundary(accountant):
    steps = max_steps(0.02, 1.0, 1e-5, 2.0, accountant)
    assert steps > 0
    assert compute_epsilon(0.02, 1.0, steps, 1e-5, accountant) <= 2.0
    assert compute_epsilon(0.02, 1.0, steps + 1, 1e-5, accountant) > 2.0
    assert max_steps(0.02, 1.0, 1e-5, 2.0, accountant, upper=10) == 10


def test_state_round_trip_through_json():
    accountant = PrivacyAccountant("rdp")
    accountant.step(0.01, 1.0, 120)
    accountant.step(0.02, 0.9)
    restored = PrivacyAccountant("rdp")
    restored.load_state_dict(json.loads(json.dumps(accountant.state_dict())))
    assert restored.history == accountant.history and restored.steps == 121
    assert restored.epsilon(1e-6) == accountant.epsilon(1e-6)


def test_load_state_validates():
    accountant = PrivacyAccountant()
    with pytest.raises(CheckpointError, match="malformed"):
        accountant.load_state_dict({"history": []})
    with pytest.raises(CheckpointError, match="--accountant rdp"):
        accountant.load_state_dict({"accountant": "rdp", "history": []})
    with pytest.raises(CheckpointError, match="--sample-rate"):
        accountant.load_state_dict({"accountant": "pld", "history": [[1.5, 1.0, 3]]})
    assert accountant.steps == 0


def test_epsilon_if_does_not_change_state():
    accountant = PrivacyAccountant()
    accountant.step(0.01, 1.0, 100)
    what_if = accountant.epsilon_if(0.01, 1.0, 50, 1e-5)
    assert accountant.steps == 100
    accountant.step(0.01, 1.0, 50)
    assert accountant.epsilon(1e-5) == what_if
    assert PrivacyAccountant().epsilon(1e-5) == 0.0


def test_validation_reports_every_problem_at_once():
    with pytest.raises(ConfigError) as err:
        compute_epsilon(0.0, -1.0, -3, 1.0, "moments")
    assert len(err.value.problems) == 5
    for flag in ("--sample-rate", "--noise-multiplier", "--steps", "--delta", "pld, rdp"):
        assert flag in str(err.value)
    with pytest.raises(ConfigError, match="--epsilon"):
        max_steps(0.01, 1.0, 1e-5, 0.0)
    with pytest.raises(ConfigError, match="pld, rdp"):
        PrivacyAccountant("gdp")
    with pytest.raises(ConfigError, match="--sample-rate"):
        PrivacyAccountant().step(2.0, 1.0)


def test_check_delta():
    check_delta(1e-5, 1000)
    with pytest.raises(ConfigError, match=r"1/N = 1/1000.*\(0, 1/N\)-DP"):
        check_delta(1e-3, 1000)
    with pytest.raises(ConfigError, match="no privacy units"):
        check_delta(1e-5, 0)
