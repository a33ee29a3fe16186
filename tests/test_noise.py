"""The noise has std σC per coordinate, measured over many draws (invariant 3)."""

from __future__ import annotations

import math

import pytest
import torch
from scipy import stats

from dpft.errors import ConfigError
from dpft.privacy.noise import add_gaussian_noise, make_generator

SIGMA, CLIP = 1.3, 0.7
STD = SIGMA * CLIP
SHAPES = [(1000, 512), (512,), (24, 20, 1000)]  # ≈ 1e6 coordinates in all


def noised(std: float, generator: torch.Generator | None, secure: bool = False) -> torch.Tensor:
    grads = [torch.zeros(shape) for shape in SHAPES]
    add_gaussian_noise(grads, std, generator, secure=secure)
    return torch.cat([g.flatten() for g in grads]).double()


def assert_gaussian(sample: torch.Tensor, std: float) -> None:
    n = sample.numel()
    # The sample std has standard error std/√(2n) (0.07 % here): allow 5 of them, so that
    # passing σ instead of σC (43 % off) or forgetting the √2 of secure mode (41 %) fails.
    tolerance = 5 * std / math.sqrt(2 * n)
    assert abs(sample.std().item() - std) < tolerance
    assert abs(SIGMA - std) > tolerance and abs(std * math.sqrt(2) - std) > tolerance
    assert abs(sample.mean().item()) < 5 * std / math.sqrt(n)
    assert stats.kstest(sample[:200_000].numpy(), "norm", args=(0, std)).pvalue > 1e-3


def test_seeded_noise_has_std_sigma_c():
    assert_gaussian(noised(STD, make_generator(0)), STD)


def test_secure_noise_has_std_sigma_c():
    assert_gaussian(noised(STD, None, secure=True), STD)


def test_noise_is_added_in_place_once():
    grad = torch.full((200_000,), 3.0)
    add_gaussian_noise([grad], STD, make_generator(1))
    assert grad.mean().item() == pytest.approx(3.0, abs=5 * STD / math.sqrt(grad.numel()))
    assert grad.std().item() == pytest.approx(STD, rel=0.01)


def test_seeded_noise_is_reproducible():
    first, again = noised(1.0, make_generator(7)), noised(1.0, make_generator(7))
    assert torch.equal(first, again)
    assert not torch.equal(first, noised(1.0, make_generator(8)))


def test_secure_noise_is_not_reproducible():
    first, second = noised(1.0, None, secure=True), noised(1.0, None, secure=True)
    assert not torch.equal(first, second)
    # Not merely shifted or rescaled: the two calls are uncorrelated.
    assert abs(torch.corrcoef(torch.stack([first, second]))[0, 1].item()) < 0.01


def test_invalid_calls():
    with pytest.raises(ConfigError, match="--noise-multiplier"):
        add_gaussian_noise([torch.zeros(3)], -1.0, None)
    with pytest.raises(ValueError, match="generator=None"):
        add_gaussian_noise([torch.zeros(3)], 1.0, make_generator(0), secure=True)
    grad = torch.ones(5)
    add_gaussian_noise([grad], 0.0, make_generator(0))
    assert torch.equal(grad, torch.ones(5))
