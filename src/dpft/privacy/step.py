"""The DP-SGD step as one guarded object: clip → accumulate → noise σC once → ÷ expected batch → account.

Every caller (the `dpft train` recipe, and whatever else drives an optimizer) goes through
`PrivacyStep`, so the guarantee rests on this file alone:

    step.begin(t)                      # hard stop at the budget; journal the step BEFORE the data is read
    for micro-batch of the sampled units:
        step.backward(losses, unit_index)   # per-unit clip and accumulate (fp32)
    step.finish()                      # N(0, σ²C²) once per coordinate, in fp32 → ÷ B → p.grad
    optimizer.step()                   # refused unless `finish` ran for this step, and only once

The stages are checked at run time, not by line order (after Opacus, which marks processed
gradients): a second `finish`, an optimizer step without noise, gradients replaced between
`finish` and the optimizer, or a `backward` outside a step raise `StepOrderError`.
`Mechanism.dp = False` (`--no-dp`) is the one switch for the non-private baseline: same sampling
and division, no clipping, no noise, nothing journalled.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor, nn

from dpft.errors import BudgetExceededError, ConfigError
from dpft.privacy.accounting import DatasetCap, Segment, calibrate_noise, check_delta, epsilon_of, max_steps
from dpft.privacy.engine import PerUnitClipper, PlainAccumulator
from dpft.privacy.noise import RowShard, add_gaussian_noise
from dpft.privacy.randomness import Randomness


@dataclass(frozen=True)
class Mechanism:
    """The public parameters of the mechanism, as the accountant sees them.

    Args:
        sample_rate: Poisson rate q of the sampler that runs.
        expected_batch_size: q·N; the noised sum is divided by it (the realised size is private).
        noise_multiplier: σ; the noise std per coordinate is σ·C.
        max_grad_norm: C, the bound on each unit's gradient.
        dp: False for the non-private baseline (`--no-dp`).
    """

    sample_rate: float
    expected_batch_size: float
    noise_multiplier: float
    max_grad_norm: float
    dp: bool = True

    @classmethod
    def non_private(cls, sample_rate: float, expected_batch_size: float) -> Mechanism:
        """The --no-dp baseline: the same sampling and division, no clipping, no noise."""
        return cls(sample_rate, expected_batch_size, 0.0, float("inf"), dp=False)

    @property
    def segment(self) -> Segment:
        """One step of this mechanism, as the journal and the accountant record it."""
        return Segment(self.sample_rate, self.noise_multiplier, 1)


@dataclass(frozen=True)
class Budget:
    """What ε is measured against: δ, the accountant, and the hard stops: the run's target ε (None:
    report, don't cap) and the dataset's budget over every run on it (None: no --dataset-budget)."""

    delta: float
    accountant: str = "pld"
    target_epsilon: float | None = None
    dataset: DatasetCap | None = None


def plan_mechanism(
    sample_rate: float,
    expected_batch_size: float,
    steps: int,
    num_units: int,
    budget: Budget,
    noise_multiplier: float | None,
    max_grad_norm: float,
) -> tuple[Mechanism, int]:
    """The mechanism for a run of `steps` steps, and how many of them the target ε allows.

    σ is `noise_multiplier` when given, else calibrated so the planned steps spend at most the
    target. Without a target ε the run is not capped (ε is reported).

    Raises:
        ConfigError: δ is not well below 1/N, or the target ε is below one step's ε.
    """
    check_delta(budget.delta, num_units)
    target = budget.target_epsilon
    sigma = noise_multiplier or calibrate_noise(sample_rate, steps, budget.delta, target, budget.accountant)
    mechanism = Mechanism(sample_rate, expected_batch_size, sigma, max_grad_norm)
    if target is None:
        return mechanism, steps
    allowed = max_steps(sample_rate, sigma, budget.delta, target, budget.accountant, upper=max(steps, 1))
    if allowed == 0:
        raise ConfigError(
            [f"the target ε {target:g} is below the ε of a single step at noise multiplier {sigma:g}: no step fits"]
        )
    return mechanism, allowed


class Journal(Protocol):
    """The single source of ε: every step that touched the data, written before it did."""

    def segments(self) -> list[Segment]: ...
    def record(self, segment: Segment) -> None: ...


class Reducer(Protocol):
    """Sums the step's fp32 clipped sums over the ranks of a data-parallel run, in place.

    `adds_noise` is True on exactly one rank: the noise is drawn there, before the reduce, so the
    reduced sum holds it once (privacy/distributed.py, `AllReduceSums`).
    """

    adds_noise: bool
    scatters: bool  # False

    def reduce(self, tensors: list[Tensor]) -> None: ...


class ShardedReducer(Protocol):
    """The engine's sink (FSDP2): reduce-scatters each micro-batch's fp32 clipped sums into this
    rank's rows as they are formed, and hands the step's rows to `finish` (`take`).

    Every rank noises its own rows once, at `finish`; the rows of the ranks tile each parameter
    exactly once (privacy/sharded.py, `ReduceScatterSums`).
    """

    scatters: bool  # True
    names: list[str]
    shards: list[RowShard]

    def add(self, name: str, clipped: Tensor) -> None: ...
    def end_micro_batch(self) -> None: ...
    def take(self) -> dict[str, Tensor]: ...
    def as_grad(self, param: nn.Parameter, rows: Tensor) -> Tensor: ...


class MemoryJournal:
    """A journal in memory (tests, and callers that persist it themselves)."""

    def __init__(self) -> None:
        self._steps: list[Segment] = []

    def segments(self) -> list[Segment]:
        return list(self._steps)

    def record(self, segment: Segment) -> None:
        self._steps.append(segment)


class StepOrderError(RuntimeError):
    """A DP stage ran out of order, twice, or not at all: a bug in the caller, never user input."""


_IDLE, _OPEN, _FINISHED = "idle", "open", "finished"


class PrivacyStep:
    """One logical DP-SGD step at a time over `model`'s trainable parameters.

    Args:
        model: The model; its trainable parameters are clipped, noised and updated.
        mechanism: q, B, σ, C (and the --no-dp switch).
        budget: δ, accountant and the optional hard stop.
        randomness: Where the noise comes from (secure unless explicitly seeded).
        journal: Where each step is recorded before it touches the data.
        reducer: Data-parallel runs only: sums the ranks' clipped sums in `finish`, after the
            noise (added on the one rank whose reducer `adds_noise`) and before ÷ B; or, sharded
            (FSDP2), takes them from the engine micro-batch by micro-batch into this rank's rows,
            which `finish` noises.

    Raises:
        ConfigError: C is not positive, the model has a module dpft cannot clip, or a sharded
            reducer comes without DP.
        ValueError: A sharded reducer built for other parameters.
    """

    def __init__(
        self,
        model: nn.Module,
        mechanism: Mechanism,
        budget: Budget,
        randomness: Randomness,
        journal: Journal,
        reducer: Reducer | ShardedReducer | None = None,
    ):
        self.mechanism, self.budget = mechanism, budget
        self._reducer = reducer
        self._randomness, self._journal = randomness, journal
        self._params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        sink = reducer if reducer is not None and reducer.scatters else None
        if sink is not None and not mechanism.dp:
            raise ConfigError(["--fsdp is built for the DP step only; the --no-dp baseline runs without it"])
        if sink is not None and sink.names != list(self._params):
            raise ValueError("the sharded reducer was built for other parameters than this model's trainable ones")
        self._engine = PerUnitClipper(model, mechanism.max_grad_norm, sink) if mechanism.dp else PlainAccumulator(model)
        self._state, self._step = _IDLE, -1
        self._written: dict[str, Tensor] = {}
        self._hooks: list = []

    def attach(self, optimizer: torch.optim.Optimizer) -> None:
        """Refuse any `optimizer.step()` that does not follow exactly one `finish()`, or that would
        apply a gradient `finish()` did not write."""
        self._hooks += [
            optimizer.register_step_pre_hook(lambda opt, *_: self._before_update(opt)),
            optimizer.register_step_post_hook(lambda *_: self._after_update()),
        ]

    @property
    def epsilon(self) -> float | None:
        """ε at δ of every journalled step (None for --no-dp)."""
        if not self.mechanism.dp:
            return None
        return epsilon_of(self._journal.segments(), self.budget.delta, self.budget.accountant)

    def within_budget(self) -> bool:
        """Whether one more step keeps ε of the journal's actual segments within the target and the
        dataset's budget (the other runs composed with this journal)."""
        return self.exceeded_limit() is None

    def exceeded_limit(self) -> str | None:
        """The limit one more step would pass, in words ("ε = 3.0", or the dataset budget); None if none."""
        b = self.budget
        if not self.mechanism.dp or (b.target_epsilon is None and b.dataset is None):
            return None
        segments = [*self._journal.segments(), self.mechanism.segment]
        if b.target_epsilon is not None and epsilon_of(segments, b.delta, b.accountant) > b.target_epsilon:
            return f"ε = {b.target_epsilon}"
        if b.dataset is not None and b.dataset.epsilon(segments, b.delta, b.accountant) > b.dataset.limit:
            return f"--dataset-budget {b.dataset.limit:g} (this run with the ledger's other runs on the dataset)"
        return None

    def begin(self, step: int) -> None:
        """Open logical step `step`: check the budget, then journal it before any data is read.

        Raises:
            BudgetExceededError: One more step would exceed the target ε or the dataset's budget.
            StepOrderError: The previous step was not completed by an optimizer step.
        """
        self._expect(_IDLE, "begin")
        limit = self.exceeded_limit()
        if limit is not None:
            raise BudgetExceededError(f"one more step would exceed {limit}")
        if self.mechanism.dp:
            self._journal.record(self.mechanism.segment)
        self._state, self._step = _OPEN, step

    def backward(self, example_losses: Tensor, unit_index: Tensor) -> Tensor:
        """Backward over one micro-batch; adds its units' clipped gradients to the step's sum.

        Args:
            example_losses: (B,) per-example losses (each the mean over its own target tokens).
            unit_index: (B,) long, the unit 0..U-1 of each example; a unit is never split.

        Returns:
            (U,) fp32 pre-clip norms (NaN without DP). Private: keep them with the data.
        """
        self._expect(_OPEN, "backward")
        return self._engine.backward(example_losses, unit_index)

    def finish(self) -> None:
        """Noise the fp32 sum once (std σC per coordinate), divide by the expected batch, write p.grad.

        The noise goes onto the fp32 sums before anything is rounded to the weights' dtype: a
        rounding before the noise would depend on the other units and could move the sum by more
        than C. An empty step (no unit sampled) is noised like any other.

        Data-parallel (a reducer): only the rank whose reducer `adds_noise` draws the noise, onto
        its own sums; then one all-reduce sums every rank's, so the total holds it exactly once.
        Sharded: the sums are already reduce-scattered; each rank noises its own rows.
        """
        self._expect(_OPEN, "finish")
        if self._reducer is not None and self._reducer.scatters:
            self._finish_sharded()
            return
        sums = self._engine.take_sums()
        m = self.mechanism
        if m.dp and (self._reducer is None or self._reducer.adds_noise):
            add_gaussian_noise(list(sums.values()), self._noise_std, self._randomness, self._step)
        if self._reducer is not None:
            self._reducer.reduce(list(sums.values()))
        for name, total in sums.items():
            param = self._params[name]
            param.grad = total.div_(m.expected_batch_size).to(param.dtype)
            self._written[name] = param.grad
        self._state = _FINISHED

    @property
    def _noise_std(self) -> float:
        """σC: the std of the one draw each coordinate gets (before ÷ B)."""
        return self.mechanism.noise_multiplier * self.mechanism.max_grad_norm

    def _finish_sharded(self) -> None:
        """FSDP2: noise this rank's rows of the step's fp32 sums, reduce-scattered micro-batch by
        micro-batch (each coordinate has one owner, so one draw), ÷ B, and hand the rows to the
        sharded parameters as their gradients."""
        m, reducer = self.mechanism, self._reducer
        rows = reducer.take()  # every micro-batch of every rank summed: the noise goes on now, once
        add_gaussian_noise(list(rows.values()), self._noise_std, self._randomness, self._step, reducer.shards)
        for name, total in rows.items():
            param = self._params[name]
            param.grad = reducer.as_grad(param, total.div_(m.expected_batch_size).to(param.dtype))
            self._written[name] = param.grad
        self._state = _FINISHED

    def remove(self) -> None:
        """Detach from the model and the optimizer."""
        self._engine.remove()
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()

    def _before_update(self, optimizer: torch.optim.Optimizer) -> None:
        self._expect(_FINISHED, "optimizer.step")
        for name, param in self._params.items():
            if param.grad is not self._written.get(name):
                raise StepOrderError(f"the gradient of '{name}' was replaced after the noise was added")
        self._refuse_unknown_params(optimizer)

    def _refuse_unknown_params(self, optimizer: torch.optim.Optimizer) -> None:
        """A parameter the optimizer holds but `finish()` never wrote (a module replaced after the
        attach, e.g. by accelerate's fp8 conversion, and the optimizer remapped to it) would be
        updated with its raw, unclipped gradient."""
        known = {id(p) for p in self._params.values()}
        for group in optimizer.param_groups:
            for param in group["params"]:
                if param.grad is not None and id(param) not in known:
                    raise StepOrderError(
                        f"the optimizer holds a parameter of shape {tuple(param.shape)} with a gradient dpft did "
                        "not write (a module replaced after PrivacyStep.attach); its update would be unclipped"
                    )

    def _after_update(self) -> None:
        self._written.clear()
        self._state = _IDLE
        for param in self._params.values():
            param.grad = None

    def _expect(self, state: str, action: str) -> None:
        if self._state != state:
            raise StepOrderError(f"{action} called while the DP step is {self._state} (expected {state})")
