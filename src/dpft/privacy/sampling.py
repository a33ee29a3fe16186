"""Poisson sampling of privacy units, contribution bounding, and micro-batching.

The accountant assumes Poisson sampling: at every step each unit is in the batch independently
with probability q. The batch size is therefore random, Binomial(N, q), and may be zero; a
fixed-size or shuffled batch would void the guarantee the accountant reports.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from scipy import stats

from dpft.errors import ConfigError
from dpft.privacy.randomness import Randomness


class PoissonSampler:
    """Each unit is included independently with probability q at every step (the sampler the
    accountant assumes). Empty batches are legal.

    Args:
        num_units: Number of privacy units N ≥ 1.
        sample_rate: Inclusion probability q, in (0, 1].
        randomness: Secure (fresh OS entropy per step, the default) or unsafe seeded.

    Raises:
        ConfigError: If N < 1 or q is not in (0, 1].
    """

    def __init__(self, num_units: int, sample_rate: float, randomness: Randomness):
        problems = []
        if num_units < 1:
            problems.append(f"the training data has no privacy units (N = {num_units})")
        if not 0 < sample_rate <= 1:
            problems.append(f"--sample-rate must be in (0, 1], got {sample_rate}")
        if problems:
            raise ConfigError(problems)
        self.num_units = int(num_units)
        self.sample_rate = float(sample_rate)
        self._randomness = randomness

    def sample(self, step: int) -> np.ndarray:
        """Draw the batch of logical step `step` (which keys seeded draws; secure ones ignore it).

        Returns:
            The sorted int64 indices of the included units (possibly none).
        """
        rng = self._randomness.numpy("sample", step)
        # Same law as N independent coin flips, in O(batch) instead of O(N): the batch size is
        # Binomial(N, q) and, given its size, the batch is a uniformly random subset.
        size = rng.binomial(self.num_units, self.sample_rate)
        batch = rng.choice(self.num_units, size=size, replace=False)
        return np.sort(batch).astype(np.int64)


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


class PrivacyUnits:
    """The privacy units of a dataset: the examples each unit keeps, and micro-batches of units.

    All of the unit bookkeeping lives here: the per-user cap (contribution bounding, chosen once,
    before training, independently for every user), the example → unit map, and packing sampled
    units into micro-batches that never split a unit (a unit is clipped as a whole).

    Args:
        unit_examples: For each unit, the indices of its examples.
        unit_ids: One stable id per unit (keys the seeded cap, so no user's choice depends on another).
        cap: At most this many examples per unit (user-level DP), or None (record-level: one each).
        randomness: Where the cap's choice comes from.
        lengths: Each example's token count, if known: sampled units are then packed longest first,
            so micro-batches hold similar lengths (less padding). A function of the batch's own
            examples only, so it changes no privacy property.

    Raises:
        ConfigError: If cap < 1.
    """

    def __init__(
        self,
        unit_examples: Sequence[Sequence[int]],
        unit_ids: Sequence[str],
        cap: int | None,
        randomness: Randomness,
        lengths: Sequence[int] | None = None,
    ):
        if cap is not None and cap < 1:
            raise ConfigError([f"--max-records-per-user must be at least 1, got {cap}"])
        self._num_examples = 1 + max((max(e) for e in unit_examples if e), default=-1)
        self._lengths = lengths
        self.adopt([_capped(list(e), cap, randomness, uid) for e, uid in zip(unit_examples, unit_ids, strict=True)])

    def adopt(self, unit_examples: Sequence[Sequence[int]]) -> None:
        """Hold these (capped) examples per unit: data parallelism gives every rank rank 0's choice.

        Raises:
            ValueError: Another number of units, or an example this dataset does not have.
        """
        if len(unit_examples) != len(getattr(self, "unit_examples", unit_examples)):
            raise ValueError("adopt: one list of examples per unit")
        self.unit_examples = [list(e) for e in unit_examples]
        self.example_unit = np.full(self._num_examples, -1, dtype=np.int64)  # -1: an example the cap left out
        for u, examples in enumerate(self.unit_examples):
            self.example_unit[examples] = u
        lengths = self._lengths
        self._longest = (
            None if lengths is None else [max((lengths[i] for i in e), default=0) for e in self.unit_examples]
        )

    def __len__(self) -> int:
        return len(self.unit_examples)

    def examples_of(self, units: Sequence[int]) -> int:
        """How many examples the given units hold (a private number: keep it with the data)."""
        return sum(len(self.unit_examples[u]) for u in units)

    def micro_batches(self, units: Sequence[int], micro_batch_size: int) -> list[tuple[list[int], torch.Tensor]]:
        """The sampled units' examples in micro-batches, each with its (B,) unit index 0..U-1.

        Raises:
            ConfigError: If micro_batch_size < 1 or a sampled unit alone exceeds it.
        """
        if self._longest is not None:
            units = sorted(units, key=lambda u: -self._longest[u])
        batches = micro_batches(units, self.unit_examples, micro_batch_size)
        return [(mb, torch.from_numpy(np.unique(self.example_unit[mb], return_inverse=True)[1])) for mb in batches]


def _capped(examples: list[int], cap: int | None, randomness: Randomness, unit_id: str) -> list[int]:
    """At most `cap` of a unit's examples, in their original order, drawn for this unit alone."""
    if cap is None or len(examples) <= cap:
        return examples
    chosen = np.sort(randomness.numpy("cap", unit_id).choice(len(examples), size=cap, replace=False))
    return [examples[i] for i in chosen]


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
