"""Gaussian noise, added once per logical step to the sum of clipped per-unit gradients.

The randomness comes from a `Randomness` (privacy/randomness.py):

- Secure (the default): for every call a fresh seed is drawn from OS entropy (`secrets`), used
  once and never stored or logged, and every coordinate is the normalised sum of two Gaussian
  draws, (g₁ + g₂)/√2 ~ N(0, 1), the floating-point mitigation of Holohan & Braghin, "Secure
  Random Sampling in Differential Privacy", ESORICS 2021 (arXiv:2107.10138), as implemented in
  their IBM diffprivlib Gaussian mechanism (n = 2). A single sampler output lies on a sparse,
  structured set of floats, from which an attacker can tell the exact draw and so the unnoised
  value (Mironov 2012; Jin et al. 2022 for Gaussians); the sum of two independent draws fills
  the gaps between those floats.
- Seeded (UNSAFE, for tests and debugging): torch's generator keyed by (seed, step). Anyone who
  knows the seed can regenerate the noise and subtract it.

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
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import torch

from dpft.errors import ConfigError
from dpft.privacy.randomness import Randomness

# Holohan & Braghin's Gaussian sampler: the sum of this many draws, divided by its square root.
SECURE_NOISE_DRAWS = 2


def _secure_noise(shape: torch.Size, std: float, device: torch.device) -> torch.Tensor:
    if device.type == "cuda":
        generator = torch.Generator(device=device)
        generator.manual_seed(secrets.randbits(64))
        draws = torch.randn((SECURE_NOISE_DRAWS, *shape), generator=generator, device=device, dtype=torch.float32)
    else:
        rng = np.random.Generator(np.random.PCG64(secrets.randbits(128)))
        draws = torch.from_numpy(rng.standard_normal((SECURE_NOISE_DRAWS, *shape), dtype=np.float32)).to(device)
    return draws.sum(dim=0).mul_(std / math.sqrt(SECURE_NOISE_DRAWS))


class RowShard(NamedTuple):
    """Where one rank's part of a sharded sum lies: rows start, start+1, … (dim 0) of `full_shape`."""

    full_shape: torch.Size
    start: int


def add_gaussian_noise(
    tensors: Sequence[torch.Tensor],
    std: float,
    randomness: Randomness,
    step: int,
    shards: Sequence[RowShard] | None = None,
) -> None:
    """Add N(0, std²) noise to every coordinate of every fp32 tensor, in place.

    Args:
        tensors: The summed clipped gradients (fp32, one tensor per parameter).
        std: Noise standard deviation σ·C (the caller divides by the expected batch size after).
        randomness: Secure (fresh OS entropy) or unsafe seeded.
        step: The logical step, which keys seeded noise (a resumed seeded run redraws the same).
        shards: Sharded sums only: each tensor is these rows of a tensor of the full shape. Secure
            noise is drawn for the rows alone; seeded noise is drawn for the full tensor (the one
            process's stream) and these rows of it are added, so W ranks add the same noise as one.

    Raises:
        ConfigError: If std is negative or not finite.
        ValueError: If a tensor is not fp32 (noise must be added before any rounding).
    """
    if not (math.isfinite(std) and std >= 0):
        raise ConfigError([f"noise std (--noise-multiplier × --max-grad-norm) must be a finite number >= 0, got {std}"])
    if any(t.dtype != torch.float32 for t in tensors):
        raise ValueError("noise is added to fp32 sums, before any cast to the weights' dtype")
    if shards is not None and len(shards) != len(tensors):
        raise ValueError("one RowShard per tensor")
    generators: dict[torch.device, torch.Generator] = {}
    with torch.no_grad():
        for i, tensor in enumerate(tensors):
            if randomness.mode == "os-entropy":
                tensor.add_(_secure_noise(tensor.shape, std, tensor.device))
                continue
            if tensor.device not in generators:
                generators[tensor.device] = randomness.torch("noise", step, tensor.device)
            shape = tensor.shape if shards is None else shards[i].full_shape
            noise = torch.normal(0.0, std, shape, generator=generators[tensor.device], device=tensor.device)
            tensor.add_(noise if shards is None else noise[shards[i].start : shards[i].start + tensor.shape[0]])
