"""Privacy accounting for DP-SGD: Poisson-sampled Gaussian steps, composed with dp_accounting.

A training run is plain data: a history of `Segment` s ``(q, σ, steps)``, each meaning ``steps``
compositions of ``PoissonSampledDpEvent(q, GaussianDpEvent(σ))``. Every ε comes from
`epsilon_bound` / `epsilon_of` over such a history, so the ledger, the hard stop, calibration and
the report compute the same number from the same data.

Two upper bounds on ε, both valid for the same mechanism at the same δ:
- PLD (privacy loss distributions, pessimistic rounding). Its cost is set by its value grid,
  chosen per history (`pld_discretization`): ~2,000 points across one step's privacy-loss
  range, at most `PLD_DISCRETIZATION` nats apart where that is affordable, and coarser where
  one step's grid would pass 50,000 points or the composed one 2^20. A tiny σ (whose loss
  spans ~1/σ² nats) thus costs ≲ 1 s, not gigabytes, and a tiny q gets a grid fine enough to
  be tight. Where bounding the cost leaves a step under 8 points, PLD is not computed.
- RDP (Mironov et al. 2019): cheap at any q, σ and T; tighter than PLD for some tiny q.
``accountant="pld"`` reports the smaller of the two (each is an upper bound, so the minimum is
one); ``accountant="rdp"`` reports RDP alone. `EpsilonBound.method` says which one it is.
Measured (δ=1e-5): q=0.01, σ=4, T=10^4: PLD 0.9469, RDP 1.0355; q=1e-4, σ=2, T=10^6: PLD 0.1720,
RDP 0.1925 (the former fixed 5e-4 grid gave 0.4935); q=1e-4, σ=1, T=10^7: RDP 1.764 wins over
PLD 2.702. A first ε for a new (q, σ) took ≤ 1.3 s (median 0.14 s) over 210 cases with q in
[1e-6, 1], σ in [1e-3, 30], T ≤ 10^7, at ≤ 0.2 GB.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import numbers
from collections.abc import Callable, Iterable, Iterator
from typing import NamedTuple

import dp_accounting
import numpy as np
from absl import logging as absl_logging
from dp_accounting.pld import privacy_loss_distribution, privacy_loss_mechanism
from dp_accounting.rdp import rdp_privacy_accountant

from dpft.errors import BudgetExceededError, ConfigError

ACCOUNTANTS = ("pld", "rdp")
RDP_ORDERS = rdp_privacy_accountant.DEFAULT_RDP_ORDERS
PLD_DISCRETIZATION = 5e-4  # the coarsest PLD grid used where a finer one is affordable
_STEP_POINTS = 2_000  # wanted grid points across one step's privacy-loss range
_MIN_STEP_POINTS = 8  # a coarser step grid is no use: RDP is then the bound
# dp_accounting keeps a PMF of at most 1000 points sparse, and a sparse PMF's self_compose(T)
# first computes size**T as a Python integer: minutes at T = 10^7. Longer runs are composed
# as blocks of _BLOCK steps (dense, since size**_BLOCK > 1000), with the same pessimism.
_DIRECT_STEPS = 4_096
_BLOCK = 64
_MAX_STEP_POINTS = 50_000  # building one step's PLD costs ~20 µs per point
_MAX_COMPOSED_POINTS = 1 << 20  # each composition is an FFT (and ε a Python scan) this long
# σ below this makes ε meaningless (≥ ~50 per step at q = 1): calibration does not go there.
_MIN_CALIBRATED_SIGMA = 0.05
_MAX_CALIBRATED_SIGMA = 2.0**20
_RELATIVE_TOLERANCE = 1e-4  # calibrate σ to within this
MAX_DELTA_TIMES_N = 0.1  # δ ≤ 0.1/N: "well below 1/N" (check_delta)


class Segment(NamedTuple):
    """`steps` consecutive Poisson-sampled Gaussian steps at rate q and noise multiplier σ."""

    sample_rate: float
    noise_multiplier: float
    steps: int


@dataclasses.dataclass(frozen=True)
class DatasetCap:
    """--dataset-budget as a run's hard stop applies it: the dataset's other runs, read once at setup.

    Their journals (`segments`) compose exactly with the run's own; `bare_epsilon` is added on top
    (runs recorded without segments: basic composition; ∞ once a non-private run exposed the data).
    """

    limit: float
    segments: tuple[Segment, ...] = ()
    bare_epsilon: float = 0.0

    def epsilon(self, own: Iterable[Segment], delta: float, accountant: str = "pld") -> float:
        """ε of the dataset: the other runs composed with `own` (this run's journal, plus any step to come)."""
        if math.isinf(self.bare_epsilon):  # exposed (or a bare ε = ∞): nothing to compose
            return math.inf
        return self.composed(own, delta, accountant)

    def composed(self, own: Iterable[Segment], delta: float, accountant: str = "pld") -> float:
        """`segments` and `own` composed exactly, plus `bare_epsilon` (basic composition): the ledger's
        rule, which `BudgetLedger.spend` shares. It composes even past a bare ε = ∞, where `epsilon`
        stops, so `spend` still refuses an invalid δ, accountant or planned segment there."""
        return epsilon_of(merge_segments([*self.segments, *own]), delta, accountant) + self.bare_epsilon

    def check_spent(self, own: Iterable[Segment], delta: float, accountant: str = "pld") -> None:
        """Refuse to go on with a run whose journal already takes the dataset past the budget.

        Raises:
            BudgetExceededError: Nothing more may be published from this run within the budget.
        """
        spent = self.epsilon(own, delta, accountant)
        if spent > self.limit:
            raise BudgetExceededError(
                f"this run's journal already brings the total ε on this dataset to {spent:.3g}, over "
                f"--dataset-budget {self.limit:g}; its model cannot be finished within the budget"
            )


class EpsilonBound(NamedTuple):
    """ε at δ of a history, and how it was obtained.

    Attributes:
        epsilon: The reported ε: the smaller of the bounds computed.
        method: "pld" or "rdp", the bound that `epsilon` is ("none" for no noised step taken,
            "unbounded" when a step had σ = 0).
        pld: The PLD bound (None when not computed).
        rdp: The RDP bound (None when not computed).
        pld_discretization: The PLD value grid used (None when PLD was not computed).
    """

    epsilon: float
    method: str
    pld: float | None = None
    rdp: float | None = None
    pld_discretization: float | None = None


def _problems(
    *,
    sample_rate: float | None = None,
    noise_multiplier: float | None = None,
    steps: int | None = None,
    delta: float | None = None,
    target_epsilon: float | None = None,
    accountant: str | None = None,
) -> list[str]:
    """Every invalid setting among those given (None = not given), in the user's words."""
    problems = []
    if sample_rate is not None and not 0 < sample_rate <= 1:
        problems.append(f"--sample-rate must be in (0, 1], got {sample_rate}")
    if noise_multiplier is not None and not (math.isfinite(noise_multiplier) and noise_multiplier >= 0):
        problems.append(f"--noise-multiplier must be a finite number >= 0, got {noise_multiplier}")
    if steps is not None and not (isinstance(steps, numbers.Integral) and steps >= 0):
        problems.append(f"--steps must be a whole number >= 0, got {steps}")
    if delta is not None and not 0 < delta < 1:
        problems.append(f"--delta must be in (0, 1), got {delta}")
    if target_epsilon is not None and not (math.isfinite(target_epsilon) and target_epsilon > 0):
        problems.append(f"--epsilon must be a positive number, got {target_epsilon}")
    if accountant is not None and accountant not in ACCOUNTANTS:
        problems.append(f"--accountant must be one of {', '.join(ACCOUNTANTS)}, got {accountant!r}")
    return problems


def _validate(**settings: float | int | str | None) -> None:
    problems = _problems(**settings)  # type: ignore[arg-type]
    if problems:
        raise ConfigError(problems)


def check_delta(delta: float, num_units: int) -> None:
    """Refuse a δ that is not well below 1/N, where N is the number of privacy units.

    "Well below" is δ ≤ 0.1/N: at δ near 1/N a mechanism that publishes one random unit's data in
    full already satisfies the guarantee.

    Args:
        delta: The target δ.
        num_units: The number of privacy units (records, or users) in the training data.

    Raises:
        ConfigError: If δ is not in (0, 1), N < 1, or δ > 0.1/N.
    """
    problems = _problems(delta=delta)
    if num_units < 1:
        problems.append(f"the training data has no privacy units (N = {num_units})")
    elif not problems and delta * num_units > MAX_DELTA_TIMES_N * (1 + 1e-9):  # 1e-9: δ = 0.1/N itself passes
        problems.append(
            f"--delta {delta:g} must be well below 1/N = 1/{num_units} (at most 0.1/N = {0.1 / num_units:.3g}): "
            f"a mechanism that publishes one random unit's data in full satisfies (0, 1/N)-DP; use e.g. --delta "
            f"{10 ** math.floor(math.log10(MAX_DELTA_TIMES_N / num_units)):g}"
        )
    if problems:
        raise ConfigError(problems)


def dp_event(segments: Iterable[Segment]) -> dp_accounting.DpEvent:
    """The dp_accounting event of a history: each segment is `steps` Poisson-sampled Gaussians.

    Args:
        segments: ``(sample_rate, noise_multiplier, steps)`` triples, in order.

    Returns:
        A ``ComposedDpEvent`` of ``SelfComposedDpEvent`` s.
    """
    return dp_accounting.ComposedDpEvent(
        [
            dp_accounting.SelfComposedDpEvent(
                dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), steps
            )
            for q, sigma, steps in segments
        ]
    )


def merge_segments(segments: Iterable[Segment]) -> tuple[Segment, ...]:
    """Validated segments, in order, without empty ones and with equal neighbours merged.

    Merging changes nothing (T steps at (q, σ) then T' more is T + T' steps), but it makes
    equal histories equal keys for the cache, however they were journaled.

    Raises:
        ConfigError: Listing every invalid value (q, σ or steps).
    """
    merged: list[Segment] = []
    for q, sigma, steps in segments:
        _validate(sample_rate=q, noise_multiplier=sigma, steps=steps)
        if steps == 0:
            continue
        if merged and merged[-1][:2] == (q, sigma):
            merged[-1] = merged[-1]._replace(steps=merged[-1].steps + int(steps))
        else:
            merged.append(Segment(float(q), float(sigma), int(steps)))
    return tuple(merged)


@contextlib.contextmanager
def _absl_quiet() -> Iterator[None]:
    before = absl_logging.get_verbosity()
    absl_logging.set_verbosity(absl_logging.ERROR)
    try:
        yield
    finally:
        absl_logging.set_verbosity(before)


@functools.lru_cache(maxsize=256)
def _step_rdp(sample_rate: float, noise_multiplier: float) -> np.ndarray:
    """RDP of one step at `RDP_ORDERS` (read-only): ~80 ms, so computed once per (q, σ)."""
    # RdpAccountant recomputes this on every compose, which made the hard stop and calibration
    # 3x slower; the module function it calls is private, so `test_accounting` checks that the
    # result equals RdpAccountant's exactly.
    # An order whose series does not converge is dropped by dp_accounting (the bound stays valid
    # over the other orders); its absl warning would otherwise print on every new (q, σ).
    with _absl_quiet():
        rdp = rdp_privacy_accountant._compute_rdp_poisson_subsampled_gaussian(sample_rate, noise_multiplier, RDP_ORDERS)
    rdp.setflags(write=False)
    return rdp


def _rdp_epsilon(segments: tuple[Segment, ...], delta: float) -> float | None:
    """The RDP bound, or None where dp_accounting's numerics overflow (σ ≲ 1e-3)."""
    try:
        rdp = sum(steps * _step_rdp(q, sigma) for q, sigma, steps in segments)
        return float(rdp_privacy_accountant.compute_epsilon(RDP_ORDERS, rdp, delta)[0])
    except (ArithmeticError, ValueError):
        return None


@functools.lru_cache(maxsize=256)
def _step_loss_range(sample_rate: float, noise_multiplier: float) -> float:
    """Width, in nats, of the range of one step's privacy loss that dp_accounting discretises."""
    widths = []
    for adjacency in (privacy_loss_mechanism.AdjacencyType.ADD, privacy_loss_mechanism.AdjacencyType.REMOVE):
        loss = privacy_loss_mechanism.GaussianPrivacyLoss(
            noise_multiplier, sampling_prob=sample_rate, adjacency_type=adjacency
        )
        bounds = loss.connect_dots_bounds()
        widths.append(bounds.epsilon_upper - bounds.epsilon_lower)
    return float(max(widths))


def pld_discretization(segments: tuple[Segment, ...]) -> float | None:
    """The PLD value grid for a history: fine enough to be tight, coarse enough to be cheap.

    dp_accounting keeps the composed distribution where its mass exceeds 1e-15 in either tail;
    RDP at δ = 1e-20 (a Chernoff bound, like that truncation) estimates the upper end, and the
    lower one is about as far below zero. Composing all steps untruncated is the worst case.

    Args:
        segments: A non-empty, merged history of noised steps (σ > 0).

    Returns:
        The interval in nats, one for all segments (composition needs one grid); None when
        bounding the cost leaves a step fewer than `_MIN_STEP_POINTS` points.
    """
    widths = [_step_loss_range(q, sigma) for q, sigma, _ in segments]
    untruncated = sum(width * steps for width, (_, _, steps) in zip(widths, segments, strict=True))
    tail = _rdp_epsilon(segments, 1e-20)
    composed = untruncated if tail is None else min(untruncated, 3 * tail + 4 * sum(widths))
    wanted = min(PLD_DISCRETIZATION, min(widths) / _STEP_POINTS)
    grid = max(wanted, max(widths) / _MAX_STEP_POINTS, composed / _MAX_COMPOSED_POINTS)
    return None if min(widths) / grid < _MIN_STEP_POINTS else grid


@functools.lru_cache(maxsize=64)
def _step_pld(
    sample_rate: float, noise_multiplier: float, discretization: float
) -> privacy_loss_distribution.PrivacyLossDistribution:
    """The PLD of one step: most of the cost of ε, and (q, σ, grid) rarely change."""
    # The construction PLDAccountant uses for PoissonSampledDpEvent(GaussianDpEvent), so the
    # numbers are identical (tested); the cache is what PLDAccountant lacks.
    return privacy_loss_distribution.from_gaussian_mechanism(
        standard_deviation=noise_multiplier,
        value_discretization_interval=discretization,
        sampling_prob=sample_rate,
    )


def _self_composed(
    pld: privacy_loss_distribution.PrivacyLossDistribution, steps: int
) -> privacy_loss_distribution.PrivacyLossDistribution:
    """`steps` compositions of a step's PLD; see _DIRECT_STEPS for why in blocks."""
    if steps <= _DIRECT_STEPS:
        return pld.self_compose(steps)
    blocks, rest = divmod(steps, _BLOCK)
    composed = pld.self_compose(_BLOCK).self_compose(blocks)
    return composed.compose(pld.self_compose(rest)) if rest else composed


def _pld_epsilon(segments: tuple[Segment, ...], delta: float) -> tuple[float | None, float | None]:
    """(the PLD bound, its grid), or None for the bound where it is unaffordable or overflows."""
    # At absurd σ numpy warns on its way to the error caught here; the warnings would print
    # around the CLI's one-line message.
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        try:
            grid = pld_discretization(segments)
            if grid is None:
                return None, None
            plds = [_self_composed(_step_pld(q, sigma, grid), steps) for q, sigma, steps in segments]
            return float(functools.reduce(lambda a, b: a.compose(b), plds).get_epsilon_for_delta(delta)), grid
        except (ArithmeticError, ValueError):
            return None, None


@functools.lru_cache(maxsize=4096)
def _bound(segments: tuple[Segment, ...], delta: float, accountant: str) -> EpsilonBound:
    """ε of a validated, merged history (pure, hence cached)."""
    if not segments:
        return EpsilonBound(0.0, "none")
    if any(sigma == 0 for _, sigma, _ in segments):
        return EpsilonBound(math.inf, "unbounded")  # an un-noised step can publish a gradient outright
    rdp = _rdp_epsilon(segments, delta)
    pld, grid = _pld_epsilon(segments, delta) if accountant == "pld" else (None, None)
    bounds = {
        name: value for name, value in (("pld", pld), ("rdp", rdp)) if value is not None and not math.isnan(value)
    }
    if not bounds:
        sigma = min(sigma for _, sigma, _ in segments)
        raise ConfigError(
            [
                f"--noise-multiplier {sigma:g} is too small for the accountant to evaluate ε "
                "(its numbers overflow); so little noise gives no meaningful privacy: raise it"
            ]
        )
    method = min(bounds, key=bounds.__getitem__)
    return EpsilonBound(bounds[method], method, pld, rdp, grid)


def epsilon_bound(segments: Iterable[Segment], delta: float, accountant: str = "pld") -> EpsilonBound:
    """ε at δ of the composition of `segments`, in order, with both bounds and which one won.

    Args:
        segments: (q, σ, steps) segments, e.g. a run's privacy journal.
        delta: Target δ, in (0, 1).
        accountant: "pld" (the smaller of the PLD and RDP bounds) or "rdp" (RDP only).

    Returns:
        An `EpsilonBound`; ε = 0.0 with no steps, math.inf if a step had σ = 0.

    Raises:
        ConfigError: Listing every invalid argument, or if dp_accounting cannot evaluate ε.
    """
    segments = merge_segments(segments)
    _validate(delta=delta, accountant=accountant)
    return _bound(segments, float(delta), accountant)


def epsilon_of(segments: Iterable[Segment], delta: float, accountant: str = "pld") -> float:
    """ε at δ of the composition of `segments`, in order: the one function every ε comes from.

    Args:
        segments: (q, σ, steps) segments, e.g. a run's privacy journal.
        delta: Target δ, in (0, 1).
        accountant: "pld" (the smaller of the PLD and RDP bounds) or "rdp" (RDP only).

    Returns:
        `epsilon_bound(segments, delta, accountant).epsilon`.

    Raises:
        ConfigError: Listing every invalid argument, or if dp_accounting cannot evaluate ε.
    """
    return epsilon_bound(segments, delta, accountant).epsilon


def compute_epsilon(
    sample_rate: float, noise_multiplier: float, steps: int, delta: float, accountant: str = "pld"
) -> float:
    """ε after `steps` Poisson-sampled Gaussian steps: `epsilon_of` of one segment.

    Args:
        sample_rate: Poisson sampling rate q, in (0, 1].
        noise_multiplier: σ, noise std divided by the clipping norm; 0 means no noise.
        steps: Number of steps T ≥ 0.
        delta: Target δ, in (0, 1).
        accountant: "pld" (default) or "rdp".

    Returns:
        The smallest ε certified at δ; 0.0 for T = 0, math.inf for σ = 0.

    Raises:
        ConfigError: Listing every invalid argument, or if dp_accounting cannot evaluate ε.
    """
    _validate(
        sample_rate=sample_rate, noise_multiplier=noise_multiplier, steps=steps, delta=delta, accountant=accountant
    )
    return epsilon_of([Segment(sample_rate, noise_multiplier, steps)], delta, accountant)


def _sigma_bracket(epsilon_at: Callable[[float], float], target_epsilon: float) -> tuple[float, float]:
    """(σ too small, σ large enough) around the target, by doubling / halving from σ = 1."""
    low, high = 1.0, 1.0
    while epsilon_at(high) > target_epsilon:
        low, high = high, high * 2
        if high > _MAX_CALIBRATED_SIGMA:
            raise ConfigError(
                [
                    f"--epsilon {target_epsilon:g} is too small to reach with any noise multiplier; "
                    "raise --epsilon or lower --steps"
                ]
            )
    while low == high or epsilon_at(low) <= target_epsilon:
        low, high = low / 2, low
        if low < _MIN_CALIBRATED_SIGMA:
            raise ConfigError(
                [
                    f"--epsilon {target_epsilon:g} needs a noise multiplier below {_MIN_CALIBRATED_SIGMA}: "
                    "that gives no meaningful privacy; lower --epsilon or set --noise-multiplier"
                ]
            )
    return low, high


def calibrate_noise(
    sample_rate: float, steps: int, delta: float, target_epsilon: float, accountant: str = "pld"
) -> float:
    """The smallest noise multiplier σ whose ε after `steps` steps is at most `target_epsilon`.

    ε is `compute_epsilon`'s, the function the hard stop (`max_steps`) and the report use, so
    the calibrated σ meets the target by the same account that later checks it.

    Args:
        sample_rate: Poisson sampling rate q, in (0, 1].
        steps: Number of steps T ≥ 1.
        delta: Target δ, in (0, 1).
        target_epsilon: Target ε > 0.
        accountant: "pld" or "rdp".

    Returns:
        σ with compute_epsilon(q, σ, T, δ) ≤ target_epsilon, within 1e-4 relative of the optimum.

    Raises:
        ConfigError: On invalid arguments, or a target that needs σ < 0.05 or σ > 2**20.
    """
    _validate(sample_rate=sample_rate, steps=steps, delta=delta, target_epsilon=target_epsilon, accountant=accountant)
    if steps == 0:
        raise ConfigError(["--steps must be at least 1 to calibrate the noise"])

    def epsilon_at(sigma: float) -> float:
        return compute_epsilon(sample_rate, sigma, steps, delta, accountant)

    low, high = _sigma_bracket(epsilon_at, target_epsilon)
    # Bisection keeps ε(high) ≤ target checked at every step, so the σ returned meets the
    # target even where discretisation makes ε(σ) wiggle.
    while high - low > _RELATIVE_TOLERANCE * low:
        middle = (low + high) / 2
        low, high = (low, middle) if epsilon_at(middle) <= target_epsilon else (middle, high)
    return high


def max_steps(
    sample_rate: float,
    noise_multiplier: float,
    delta: float,
    target_epsilon: float,
    accountant: str = "pld",
    upper: int = 10**7,
) -> int:
    """The largest number of steps T with ε(T) ≤ target_epsilon, by `compute_epsilon`.

    Args:
        sample_rate: Poisson sampling rate q, in (0, 1].
        noise_multiplier: σ ≥ 0.
        delta: Target δ, in (0, 1).
        target_epsilon: Target ε > 0.
        accountant: "pld" or "rdp".
        upper: Search no further than this many steps.

    Returns:
        T in [0, upper] with ε(T) ≤ target_epsilon checked; 0 when even one step exceeds the
        target (always so for σ = 0).

    Raises:
        ConfigError: Listing every invalid argument, or if dp_accounting cannot evaluate ε.
    """
    _validate(
        sample_rate=sample_rate,
        noise_multiplier=noise_multiplier,
        steps=upper,
        delta=delta,
        target_epsilon=target_epsilon,
        accountant=accountant,
    )

    def fits(steps: int) -> bool:
        return compute_epsilon(sample_rate, noise_multiplier, steps, delta, accountant) <= target_epsilon

    # Gallop up from 1 so that a short budget never pays for composing 10^7 steps.
    good, bad = 0, 1
    while bad <= upper and fits(bad):
        good, bad = bad, bad * 2
    if bad > upper:
        if fits(upper):
            return upper
        bad = upper
    while bad - good > 1:
        middle = (good + bad) // 2
        good, bad = (middle, bad) if fits(middle) else (good, middle)
    return good
