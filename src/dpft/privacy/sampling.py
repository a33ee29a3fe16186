"""Poisson sampling of privacy units, contribution bounding, and micro-batching.

The accountant assumes Poisson sampling: at every step each unit is in the batch independently
with probability q. The batch size is therefore random, Binomial(N, q), and may be zero; a
fixed-size or shuffled batch would void the guarantee the accountant reports.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from scipy import stats

from dpft.errors import CheckpointError, ConfigError


class PoissonSampler:
    """Each unit is included independently with probability q at every step (the sampler the
    accountant assumes). Empty batches are legal.

    Args:
        num_units: Number of privacy units N ≥ 1.
        sample_rate: Inclusion probability q, in (0, 1].
        seed: Seed of the numpy PCG64 generator; None draws one from OS entropy.

    Raises:
        ConfigError: If N < 1 or q is not in (0, 1].
    """

    def __init__(self, num_units: int, sample_rate: float, seed: int | None):
        problems = []
        if num_units < 1:
            problems.append(f"the training data has no privacy units (N = {num_units})")
        if not 0 < sample_rate <= 1:
            problems.append(f"--sample-rate must be in (0, 1], got {sample_rate}")
        if problems:
            raise ConfigError(problems)
        self.num_units = int(num_units)
        self.sample_rate = float(sample_rate)
        self._rng = np.random.Generator(np.random.PCG64(seed))

    def sample(self) -> np.ndarray:
        """Draw one step's batch.

        Returns:
            The sorted int64 indices of the included units (possibly none).
        """
        # Same law as N independent coin flips, in O(batch) instead of O(N): the batch size is
        # Binomial(N, q) and, given its size, the batch is a uniformly random subset.
        size = self._rng.binomial(self.num_units, self.sample_rate)
        batch = self._rng.choice(self.num_units, size=size, replace=False)
        return np.sort(batch).astype(np.int64)

    def state_dict(self) -> dict:
        """JSON-serialisable state; loading it continues the same random stream."""
        return {
            "num_units": self.num_units,
            "sample_rate": self.sample_rate,
            "bit_generator": self._rng.bit_generator.state,
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore a state from `state_dict`.

        Raises:
            CheckpointError: If the state is malformed or belongs to other data or another rate.
        """
        try:
            num_units, sample_rate = state["num_units"], state["sample_rate"]
            bit_generator = np.random.PCG64()
            bit_generator.state = state["bit_generator"]
        except (KeyError, TypeError, ValueError) as err:
            raise CheckpointError(f"sampler state is malformed ({err!r})") from err
        if (num_units, sample_rate) != (self.num_units, self.sample_rate):
            raise CheckpointError(
                f"the checkpoint sampled {num_units} units at rate {sample_rate}, this run "
                f"{self.num_units} at {self.sample_rate}: resume with the same data and --batch-size"
            )
        self._rng = np.random.Generator(bit_generator)


def sample_rate_for(expected_batch_size: float, num_units: int) -> float:
    """The Poisson rate q = B / N that gives an expected batch of B units.

    Args:
        expected_batch_size: B, the expected number of units per step.
        num_units: N, the number of privacy units.

    Returns:
        q in (0, 1].

    Raises:
        ConfigError: If B ≤ 0, B > N or N < 1.
    """
    if num_units < 1:
        raise ConfigError([f"the training data has no privacy units (N = {num_units})"])
    if not 0 < expected_batch_size <= num_units:
        raise ConfigError(
            [f"--batch-size must be in (0, {num_units}] (the number of privacy units), got {expected_batch_size}"]
        )
    return expected_batch_size / num_units


def cap_unit_examples(unit_examples: Sequence[Sequence[int]], cap: int, seed: int) -> list[list[int]]:
    """Keep at most `cap` examples per unit (user-level DP), chosen once with a seeded RNG.

    Contribution bounding happens here, before training, and never changes afterwards: a
    unit's gradient is then the sum over at most `cap` examples, clipped once per step as a
    whole, which is what user-level sensitivity C assumes.

    Args:
        unit_examples: For each unit, the indices of its examples.
        cap: The largest number of examples a unit keeps (--max-records-per-user).
        seed: Seed of the choice, so that a resumed run keeps the same examples.

    Returns:
        For each unit, its kept example indices in their original order.

    Raises:
        ConfigError: If cap < 1.
    """
    if cap < 1:
        raise ConfigError([f"--max-records-per-user must be at least 1, got {cap}"])
    rng = np.random.Generator(np.random.PCG64(seed))
    capped = []
    for examples in unit_examples:
        kept = list(examples)
        if len(kept) > cap:
            chosen = np.sort(rng.choice(len(kept), size=cap, replace=False))
            kept = [kept[i] for i in chosen]
        capped.append(kept)
    return capped


def micro_batches(
    units: Sequence[int], unit_examples: Sequence[Sequence[int]], micro_batch_size: int
) -> list[list[int]]:
    """Pack the examples of the sampled units into micro-batches, never splitting a unit.

    Args:
        units: The sampled unit indices, in order.
        unit_examples: For each unit, the indices of its examples.
        micro_batch_size: The largest number of examples in one micro-batch.

    Returns:
        Example indices per micro-batch; units keep their order and their examples stay
        together (an empty list for an empty batch).

    Raises:
        ConfigError: If micro_batch_size < 1 or a sampled unit alone exceeds it.
    """
    if micro_batch_size < 1:
        raise ConfigError([f"--micro-batch-size must be at least 1, got {micro_batch_size}"])
    largest = max((len(unit_examples[u]) for u in units), default=0)
    if largest > micro_batch_size:
        raise ConfigError(
            [
                f"a privacy unit has {largest} examples but --micro-batch-size is "
                f"{micro_batch_size}: a unit's examples must share one micro-batch to be clipped "
                f"together; raise --micro-batch-size or lower --max-records-per-user"
            ]
        )
    batches: list[list[int]] = []
    current: list[int] = []
    for unit in units:
        examples = list(unit_examples[unit])
        if len(current) + len(examples) > micro_batch_size:
            batches.append(current)
            current = []
        current.extend(examples)
    if current:
        batches.append(current)
    return batches


def batch_size_consistency(batch_sizes: Sequence[int], num_units: int, sample_rate: float) -> float:
    """p-value that per-step batch sizes are i.i.d. Binomial(N, q), as Poisson sampling implies.

    Two tests, Bonferroni-combined (2 × the smaller p-value, capped at 1): a two-sided z-test on
    the mean (catches a wrong rate) and a two-sided test on the sample variance, using its exact
    large-T variance σ⁴(2/(T-1) + κ/T) with the binomial excess kurtosis κ, which stays valid
    for small N·q (catches fixed-size batches, whose variance is zero).

    Args:
        batch_sizes: The observed batch sizes, one per step.
        num_units: N.
        sample_rate: q.

    Returns:
        A p-value in [0, 1]; 1.0 with fewer than two steps (nothing to test).
    """
    sizes = np.asarray(batch_sizes, dtype=float)
    steps = sizes.size
    if steps and (sizes.min() < 0 or sizes.max() > num_units):
        return 0.0
    if steps < 2:
        return 1.0
    if sample_rate == 1:
        return float(np.all(sizes == num_units))
    variance = num_units * sample_rate * (1 - sample_rate)
    z_mean = (sizes.mean() - num_units * sample_rate) / math.sqrt(variance / steps)
    kurtosis = (1 - 6 * sample_rate * (1 - sample_rate)) / variance
    variance_std = variance * math.sqrt(2 / (steps - 1) + kurtosis / steps)
    z_variance = (sizes.var(ddof=1) - variance) / variance_std
    p_value = 2 * stats.norm.sf(max(abs(z_mean), abs(z_variance)))
    return float(min(1.0, 2 * p_value))
