"""Poisson sampling follows its Binomial laws (invariant 4); micro-batching keeps units whole."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from dpft.errors import ConfigError
from dpft.privacy.randomness import Randomness
from dpft.privacy.sampling import (
    PoissonSampler,
    PrivacyUnits,
    batch_size_consistency,
    micro_batches,
    sample_rate_for,
)


def binomial_chi_square_p(observed: np.ndarray, n: int, p: float) -> float:
    """Chi-square goodness of fit of integer draws to Binomial(n, p), tails pooled to E ≥ 5."""
    support = np.arange(n + 1)
    expected = stats.binom.pmf(support, n, p) * observed.size
    counts = np.bincount(observed, minlength=n + 1)
    lo = np.flatnonzero(np.cumsum(expected) >= 5)[0]
    hi = n - np.flatnonzero(np.cumsum(expected[::-1]) >= 5)[0]
    exp_bins = np.concatenate([[expected[: lo + 1].sum()], expected[lo + 1 : hi], [expected[hi:].sum()]])
    obs_bins = np.concatenate([[counts[: lo + 1].sum()], counts[lo + 1 : hi], [counts[hi:].sum()]])
    return stats.chisquare(obs_bins, exp_bins).pvalue


def draw(sampler: PoissonSampler, steps: int, start: int = 0) -> list[np.ndarray]:
    return [sampler.sample(t) for t in range(start, start + steps)]


def test_batch_sizes_follow_binomial():
    n, q, steps = 2000, 0.02, 4000
    sizes = np.array([b.size for b in draw(PoissonSampler(n, q, Randomness.unsafe_seeded(1)), steps)])
    assert sizes.mean() == pytest.approx(n * q, abs=4 * np.sqrt(n * q * (1 - q) / steps))
    # Var of the sample variance is ≈ 2σ⁴/(T-1): 5 standard errors is a generous band.
    assert sizes.var(ddof=1) == pytest.approx(n * q * (1 - q), rel=5 * np.sqrt(2 / steps))
    assert binomial_chi_square_p(sizes, n, q) > 1e-3


def test_batches_are_sorted_distinct_int64():
    for batch in draw(PoissonSampler(50, 0.3, Randomness.unsafe_seeded(2)), 100):
        assert batch.dtype == np.int64
        assert np.all(np.diff(batch) > 0) and (batch.size == 0 or 0 <= batch[0] <= batch[-1] < 50)


def test_inclusion_counts_follow_binomial_and_ignore_the_index():
    n, q, steps = 1000, 0.05, 1000
    counts = np.zeros(n, dtype=int)
    for batch in draw(PoissonSampler(n, q, Randomness.unsafe_seeded(3)), steps):
        counts[batch] += 1
    assert binomial_chi_square_p(counts, steps, q) > 1e-3
    # No unit is favoured by its position: low and high indices have the same count law.
    assert stats.ks_2samp(counts[: n // 2], counts[n // 2 :]).pvalue > 1e-3
    assert abs(stats.spearmanr(np.arange(n), counts).statistic) < 4 / np.sqrt(n)


def test_empty_batches_occur_at_the_expected_rate():
    n, q, steps = 20, 0.05, 5000
    empty = sum(b.size == 0 for b in draw(PoissonSampler(n, q, Randomness.unsafe_seeded(4)), steps))
    assert stats.binomtest(empty, steps, (1 - q) ** n).pvalue > 1e-3


def test_seeded_samplers_agree_and_differ_by_seed():
    a, b, c = (PoissonSampler(500, 0.1, Randomness.unsafe_seeded(s)) for s in (9, 9, 10))
    first, second, third = draw(a, 5), draw(b, 5), draw(c, 5)
    assert all(np.array_equal(x, y) for x, y in zip(first, second, strict=True))
    assert not all(np.array_equal(x, y) for x, y in zip(first, third, strict=True))


def test_batch_size_consistency_accepts_poisson_and_rejects_impostors():
    n, q, steps = 1000, 0.03, 500
    poisson = [b.size for b in draw(PoissonSampler(n, q, Randomness.unsafe_seeded(5)), steps)]
    assert batch_size_consistency(poisson, n, q) > 1e-3
    assert batch_size_consistency([30] * steps, n, q) < 1e-6  # fixed-size batches
    wrong_rate = [b.size for b in draw(PoissonSampler(n, 0.033, Randomness.unsafe_seeded(6)), steps)]
    assert batch_size_consistency(wrong_rate, n, q) < 1e-6
    assert batch_size_consistency([n + 1] * 3, n, q) == 0.0


def test_batch_size_consistency_holds_for_small_expected_batches():
    # N·q = 1: very skewed binomial; the kurtosis-corrected variance test keeps its level.
    n, q = 100, 0.01
    sampler = PoissonSampler(n, q, Randomness.unsafe_seeded(7))
    p_values = [batch_size_consistency([b.size for b in draw(sampler, 300, 300 * i)], n, q) for i in range(100)]
    assert min(p_values) > 1e-4
    assert np.mean(np.array(p_values) < 0.05) < 0.15


def test_sample_rate_for():
    assert sample_rate_for(64, 1000) == 0.064
    for bad in (0, -1, 1001):
        with pytest.raises(ConfigError, match="--batch-size"):
            sample_rate_for(bad, 1000)


def test_micro_batches_never_split_a_unit_and_respect_the_cap():
    rng = np.random.default_rng(8)
    sizes = rng.integers(1, 6, size=200)
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    unit_examples = [list(range(s, s + k)) for s, k in zip(starts, sizes, strict=True)]
    units = [u for u in range(200) if rng.random() < 0.4]
    batches = micro_batches(units, unit_examples, micro_batch_size=7)
    assert all(0 < len(b) <= 7 for b in batches)
    owner = {e: u for u, examples in enumerate(unit_examples) for e in examples}
    where = {}
    for i, batch in enumerate(batches):
        for example in batch:
            assert where.setdefault(owner[example], i) == i  # a unit lives in one micro-batch
    assert [e for b in batches for e in b] == [e for u in units for e in unit_examples[u]]
    assert micro_batches([], unit_examples, 7) == []


def test_micro_batches_refuse_a_unit_larger_than_the_micro_batch():
    with pytest.raises(ConfigError, match=r"--micro-batch-size.*--max-records-per-user"):
        micro_batches([0, 1], [[0, 1, 2], [3, 4, 5, 6, 7]], micro_batch_size=4)


def test_privacy_units_cap_each_user_and_batch_by_unit():
    unit_examples = [list(range(10 * u, 10 * u + k)) for u, k in enumerate([1, 5, 10, 3])]
    ids = [f"u{u}" for u in range(4)]
    units = PrivacyUnits(unit_examples, ids, 3, Randomness.unsafe_seeded(0))
    capped = units.unit_examples
    assert [len(u) for u in capped] == [1, 3, 3, 3]
    assert all(set(c) <= set(u) and c == sorted(c) for c, u in zip(capped, unit_examples, strict=True))
    assert capped == PrivacyUnits(unit_examples, ids, 3, Randomness.unsafe_seeded(0)).unit_examples
    assert capped != PrivacyUnits(unit_examples, ids, 3, Randomness.unsafe_seeded(1)).unit_examples
    batches = units.micro_batches([3, 1, 2], micro_batch_size=6)
    assert [len(mb) for mb, _ in batches] == [6, 3]
    assert [ui.tolist() for _, ui in batches] == [[1, 1, 1, 0, 0, 0], [0, 0, 0]]  # unit index per example
    with pytest.raises(ConfigError, match="--max-records-per-user"):
        PrivacyUnits(unit_examples, ids, 0, Randomness.secure())


def test_secure_sampler_follows_the_poisson_law():
    n, q, steps = 1000, 0.03, 400
    sampler = PoissonSampler(n, q, Randomness.secure())
    assert batch_size_consistency([sampler.sample(t).size for t in range(steps)], n, q) > 1e-6


def test_micro_batches_pack_similar_lengths_together():
    unit_examples = [[0], [1], [2], [3]]
    lengths = [5, 90, 7, 88]
    units = PrivacyUnits(unit_examples, ["a", "b", "c", "d"], None, Randomness.secure(), lengths)
    batches = [mb for mb, _ in units.micro_batches([0, 1, 2, 3], micro_batch_size=2)]
    assert batches == [[1, 3], [2, 0]]  # the two long records share a micro-batch, the short ones the other
    assert sorted(i for mb in batches for i in mb) == [0, 1, 2, 3]  # every sampled unit, once
