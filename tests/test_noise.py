"""The noise has std σC per coordinate, measured over many draws (invariant 3)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats

from dpft.errors import ConfigError
from dpft.privacy.noise import add_gaussian_noise
from dpft.privacy.randomness import Randomness

SIGMA, CLIP = 1.3, 0.7
STD = SIGMA * CLIP
SHAPES = [(1000, 512), (512,), (24, 20, 1000)]  # ≈ 1e6 coordinates in all


def noised(std: float, randomness: Randomness, step: int = 0) -> torch.Tensor:
    grads = [torch.zeros(shape) for shape in SHAPES]
    add_gaussian_noise(grads, std, randomness, step)
    return torch.cat([g.flatten() for g in grads]).double()


def assert_gaussian(sample: torch.Tensor, std: float) -> None:
    """The measured std, mean and shape match N(0, std²).

    The sample std has standard error std/√(2n) (0.07 % here): 5 of them separate σC from σ
    (43 % off at C = 0.7) and from a forgotten √2 of the secure sampler (41 % off).
    """
    n = sample.numel()
    measured = sample.std().item()
    assert abs(measured - std) < 5 * std / math.sqrt(2 * n), f"measured std {measured:.5f}, want {std:.5f}"
    assert abs(sample.mean().item()) < 5 * std / math.sqrt(n)
    assert stats.kstest(sample[:200_000].numpy(), "norm", args=(0, std)).pvalue > 1e-3


def test_secure_noise_has_std_sigma_c():
    assert_gaussian(noised(STD, Randomness.secure()), STD)


def test_seeded_noise_has_std_sigma_c():
    assert_gaussian(noised(STD, Randomness.unsafe_seeded(0)), STD)


def test_std_sigma_is_told_apart_from_sigma_c():
    sample = noised(SIGMA, Randomness.secure())
    with pytest.raises(AssertionError, match="measured std"):
        assert_gaussian(sample, STD)


def test_noise_is_added_in_place_once():
    grad = torch.full((200_000,), 3.0)
    add_gaussian_noise([grad], STD, Randomness.secure(), 0)
    assert grad.mean().item() == pytest.approx(3.0, abs=5 * STD / math.sqrt(grad.numel()))
    assert grad.std().item() == pytest.approx(STD, rel=0.01)


def test_seeded_noise_is_keyed_by_seed_and_step():
    first = noised(1.0, Randomness.unsafe_seeded(7), step=3)
    assert torch.equal(first, noised(1.0, Randomness.unsafe_seeded(7), step=3))
    assert not torch.equal(first, noised(1.0, Randomness.unsafe_seeded(8), step=3))
    assert not torch.equal(first, noised(1.0, Randomness.unsafe_seeded(7), step=4))


def test_secure_noise_is_not_reproducible():
    first, second = noised(1.0, Randomness.secure()), noised(1.0, Randomness.secure())
    assert not torch.equal(first, second)
    # Not merely shifted or rescaled: the two calls are uncorrelated.
    assert abs(np.corrcoef(first.numpy(), second.numpy())[0, 1]) < 0.01


def test_invalid_calls():
    with pytest.raises(ConfigError, match="--noise-multiplier"):
        add_gaussian_noise([torch.zeros(3)], -1.0, Randomness.secure(), 0)
    with pytest.raises(ValueError, match="fp32"):
        add_gaussian_noise([torch.zeros(3, dtype=torch.bfloat16)], 1.0, Randomness.secure(), 0)
    grad = torch.ones(5)
    add_gaussian_noise([grad], 0.0, Randomness.secure(), 0)
    assert torch.equal(grad, torch.ones(5))
