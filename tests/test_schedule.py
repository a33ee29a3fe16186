"""Learning-rate schedules: warmup, decay to zero, and what a resumed run recomputes."""

import itertools

import pytest

from dpft.training.schedule import lr_at


def test_constant_is_the_peak_after_warmup():
    assert [lr_at(s, 10, 0.1, "constant", warmup_steps=3) for s in range(5)] == pytest.approx(
        [0.025, 0.05, 0.075, 0.1, 0.1]
    )


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_decays_from_peak_towards_zero_and_stays_positive(schedule):
    rates = [lr_at(s, 10, 0.1, schedule) for s in range(10)]
    assert rates[0] == pytest.approx(0.1)
    assert all(a > b > 0 for a, b in itertools.pairwise(rates))
    assert lr_at(10, 10, 0.1, schedule) == 0.0


def test_linear_halfway_is_half_the_peak():
    assert lr_at(5, 10, 0.2, "linear") == pytest.approx(0.1)
    assert lr_at(2 + 4, 10, 0.2, "linear", warmup_steps=2) == pytest.approx(0.1)
