"""Gaussian noise, added once per logical step to the sum of clipped per-unit gradients.

Two modes:

- Seeded (default): a `torch.Generator` from `make_generator(seed)`, so a run is reproducible.
  Anyone who knows the seed can regenerate the noise and subtract it: the seed is a secret of
  the same rank as the training data.
- Secure (``--secure-noise``): for every call a fresh seed is drawn from OS entropy
  (`secrets`), used once and never stored or logged, and every coordinate is the normalised sum
  of two Gaussian draws, (g₁ + g₂)/√2 ~ N(0, 1), the floating-point mitigation of Holohan &
  Braghin, "Secure Random Sampling in Differential Privacy", ESORICS 2021 (arXiv:2107.10138),
  as implemented in their IBM diffprivlib Gaussian mechanism (n = 2). A single sampler output
  lies on a sparse, structured set of floats, from which an attacker can tell the exact draw
  and so the unnoised value (Mironov 2012; Jin et al. 2022 for Gaussians); the sum of two
  independent draws fills the gaps between those floats.

What secure mode does not give: the generators are not cryptographically secure. On CUDA it is
torch's Philox, keyed by the 64-bit fresh seed; on CPU it is numpy's PCG64 seeded with 128
bits (torch's CPU Mersenne Twister takes only 32 bits of a seed, few enough to search). An
attacker who saw enough raw noise of one step could in principle recover that step's state,
but not the next step's, nor reproduce a run from its config or logs. Nor is the sum of two
fp32 draws an exact Gaussian: the mitigation makes the known reconstruction attacks
impractical, it is not a proof, and the noised sum is rounded again when it is scaled and
applied by the optimizer (those roundings are post-processing of the noised value).
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Iterable

import numpy as np
import torch

from dpft.errors import ConfigError

# Holohan & Braghin's Gaussian sampler: the sum of this many draws, divided by its square root.
SECURE_NOISE_DRAWS = 2


def make_generator(seed: int, device: str | torch.device = "cpu") -> torch.Generator:
    """A seeded torch generator for reproducible noise.

    Args:
        seed: The noise seed (keep it as secret as the data: it reproduces the noise).
        device: Where the noise is drawn; use the gradients' device to avoid a copy per step.

    Returns:
        A `torch.Generator` on `device`, seeded with `seed`.
    """
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    return generator


def _seeded_noise(
    shape: torch.Size, std: float, device: torch.device, generator: torch.Generator | None
) -> torch.Tensor:
    where = generator.device if generator is not None else device
    noise = torch.normal(0.0, std, size=shape, generator=generator, device=where, dtype=torch.float32)
    return noise.to(device, non_blocking=True)


def _secure_noise(shape: torch.Size, std: float, device: torch.device) -> torch.Tensor:
    if device.type == "cuda":
        generator = torch.Generator(device=device)
        generator.manual_seed(secrets.randbits(64))
        draws = torch.randn((SECURE_NOISE_DRAWS, *shape), generator=generator, device=device, dtype=torch.float32)
    else:
        rng = np.random.Generator(np.random.PCG64(secrets.randbits(128)))
        draws = torch.from_numpy(rng.standard_normal((SECURE_NOISE_DRAWS, *shape), dtype=np.float32)).to(device)
    return draws.sum(dim=0).mul_(std / math.sqrt(SECURE_NOISE_DRAWS))


def add_gaussian_noise(
    grads: Iterable[torch.Tensor],
    std: float,
    generator: torch.Generator | None,
    secure: bool = False,
) -> None:
    """Add N(0, std²) fp32 noise to every coordinate of every tensor, in place.

    Args:
        grads: The summed clipped gradients (one tensor per parameter).
        std: Noise standard deviation σ·C (the caller divides by the expected batch size after).
        generator: Source of seeded noise; None uses torch's global generator. Must be None
            when `secure` is set.
        secure: Draw from fresh OS entropy with the Holohan & Braghin sampler (module doc).

    Raises:
        ConfigError: If std is negative or not finite.
        ValueError: If a generator is given together with `secure`.
    """
    if not (math.isfinite(std) and std >= 0):
        raise ConfigError([f"noise std (--noise-multiplier × --max-grad-norm) must be a finite number >= 0, got {std}"])
    if secure and generator is not None:
        raise ValueError("secure noise draws its own randomness: pass generator=None")
    with torch.no_grad():
        for grad in grads:
            if secure:
                noise = _secure_noise(grad.shape, std, grad.device)
            else:
                noise = _seeded_noise(grad.shape, std, grad.device, generator)
            grad.add_(noise)
