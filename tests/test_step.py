"""The DP step object (privacy/step.py): each stage once per logical step, noise σC in fp32, ÷ expected B.

Each test names the injected bug it catches (checked by breaking the code on purpose).
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from dpft.errors import BudgetExceededError
from dpft.privacy import step as step_module
from dpft.privacy.accounting import DatasetCap, Segment, compute_epsilon, epsilon_of
from dpft.privacy.randomness import Randomness
from dpft.privacy.step import Budget, Mechanism, MemoryJournal, PrivacyStep, StepOrderError

D_IN, D_OUT = 256, 256  # 65,792 noised coordinates per step


def linear_model(dtype: torch.dtype = torch.float32) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(D_IN, D_OUT)).to(dtype)


def make_step(
    model: nn.Module,
    sigma: float = 1.0,
    clip: float = 1.0,
    batch: float = 8.0,
    dp: bool = True,
    journal: MemoryJournal | None = None,
    target: float | None = None,
) -> tuple[PrivacyStep, torch.optim.Optimizer]:
    mechanism = Mechanism(0.1, batch, sigma, clip) if dp else Mechanism.non_private(0.1, batch)
    step = PrivacyStep(model, mechanism, Budget(1e-5, "rdp", target), Randomness.secure(), journal or MemoryJournal())
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.0)
    step.attach(optimizer)
    return step, optimizer


def unit_losses(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """(B,) per-example losses: each example's output summed (a gradient of norm ~‖x‖)."""
    return model(x.to(next(model.parameters()).dtype)).float().sum(-1)


def grads(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.grad.double().flatten() for p in model.parameters() if p.requires_grad])


def assert_std(sample: torch.Tensor, want: float) -> None:
    """The sample std equals `want` within 5 standard errors (std/√(2n)); the mean is ~0."""
    n = sample.numel()
    measured = sample.std().item()
    assert abs(measured - want) < 5 * want / math.sqrt(2 * n), f"std {measured:.5g}, expected {want:.5g}"
    assert abs(sample.mean().item()) < 5 * want / math.sqrt(n)


@pytest.mark.parametrize("clip", [0.1, 5.0])
def test_empty_step_is_noised_with_std_sigma_c_over_expected_batch(clip: float) -> None:
    """Bugs caught: noise std σ instead of σC (C ≠ 1 both ways); skipping empty steps; ÷ realised size."""
    model = linear_model()
    sigma, batch = 1.3, 8.0
    journal = MemoryJournal()
    step, optimizer = make_step(model, sigma, clip, batch, journal=journal)
    step.begin(0)
    step.finish()  # nobody was sampled: the step is still noised and journalled
    assert_std(grads(model), sigma * clip / batch)
    assert journal.segments() == [Segment(0.1, sigma, 1)]
    optimizer.step()


def test_noise_is_added_once_per_step_not_per_micro_batch() -> None:
    """Bug caught: noise once per micro-batch (std √3·σC over three micro-batches)."""
    model = linear_model()
    step, optimizer = make_step(model, sigma=2.0, clip=0.5, batch=4.0)
    step.begin(0)
    for _ in range(3):  # zero-gradient examples: whatever is in p.grad after finish is noise
        step.backward(unit_losses(model, torch.zeros(4, D_IN)) * 0, torch.arange(4))
    step.finish()
    assert_std(grads(model), 2.0 * 0.5 / 4.0)
    optimizer.step()


def test_divides_by_the_expected_batch_not_the_realised_one() -> None:
    """Bug caught: division by the realised batch size (5 units here, expected 8)."""
    model = linear_model()
    step, optimizer = make_step(model, dp=False, batch=8.0)
    x = torch.randn(5, D_IN)
    step.begin(0)
    step.backward(unit_losses(model, x), torch.arange(5))
    step.finish()
    want = torch.cat([x.sum(0).repeat(D_OUT), torch.full((D_OUT,), 5.0)]) / 8.0  # weight rows, then bias
    torch.testing.assert_close(grads(model).float(), want)
    optimizer.step()


def test_stages_run_exactly_once_per_step() -> None:
    model = linear_model()
    step, optimizer = make_step(model)
    with pytest.raises(StepOrderError):
        step.backward(unit_losses(model, torch.randn(2, D_IN)), torch.arange(2))  # before begin
    step.begin(0)
    with pytest.raises(StepOrderError):
        optimizer.step()  # no noise yet
    with pytest.raises(StepOrderError):
        step.begin(1)  # the previous step is still open
    step.finish()
    with pytest.raises(StepOrderError):
        step.finish()  # a second noise draw for the same step
    optimizer.step()
    with pytest.raises(StepOrderError):
        optimizer.step()  # a second update from one noised sum


def test_gradients_replaced_after_the_noise_are_refused() -> None:
    model = linear_model()
    step, optimizer = make_step(model)
    step.begin(0)
    step.finish()
    model[0].weight.grad = torch.zeros_like(model[0].weight)
    with pytest.raises(StepOrderError, match="replaced"):
        optimizer.step()


def replace_linear(model: nn.Sequential, optimizer: torch.optim.Optimizer) -> None:
    """What accelerate's fp8 conversion does after the attach: a new Linear (new parameters, same
    weights) in the model, and the optimizer remapped to its parameters."""
    old = list(model.parameters())
    fresh = nn.Linear(D_IN, D_OUT)
    fresh.load_state_dict(model[0].state_dict())
    model[0] = fresh
    remap = {id(a): b for a, b in zip(old, model.parameters(), strict=True)}
    for group in optimizer.param_groups:
        group["params"] = [remap[id(p)] for p in group["params"]]


def test_a_parameter_the_step_did_not_write_is_not_updated() -> None:
    """Bug caught: the pre-step guard checks only the parameters known at attach, so the optimizer
    applies a replaced module's raw gradient."""
    model = linear_model()
    step, optimizer = make_step(model)
    replace_linear(model, optimizer)
    step.begin(0)
    step.finish()
    unit_losses(model, torch.randn(3, D_IN)).sum().backward()  # a plain backward: unclipped gradients
    with pytest.raises(StepOrderError, match="gradient dpft did not write"):
        optimizer.step()


def test_hard_stop_composes_the_journals_actual_segments() -> None:
    """Bug caught: a hard stop that assumes every journalled step used the current (q, σ)."""
    journal = MemoryJournal()
    journal.record(Segment(0.1, 0.6, 20))  # earlier steps at a smaller σ spent more
    target = 1.05 * epsilon_of(journal.segments(), 1e-5, "rdp")
    assert compute_epsilon(0.1, 2.0, 21, 1e-5, "rdp") < target  # a step count at σ = 2 would allow it
    step, _ = make_step(linear_model(), sigma=2.0, journal=journal, target=target)
    assert step.within_budget() == (epsilon_of([*journal.segments(), Segment(0.1, 2.0, 1)], 1e-5, "rdp") <= target)
    tight = epsilon_of([*journal.segments(), Segment(0.1, 2.0, 1)], 1e-5, "rdp") * 0.999
    stopped, _ = make_step(linear_model(), sigma=2.0, journal=journal, target=tight)
    assert not stopped.within_budget()
    with pytest.raises(BudgetExceededError):
        stopped.begin(0)
    assert journal.segments() == [Segment(0.1, 0.6, 20)]  # a refused step is not journalled


def test_hard_stop_composes_the_dataset_budget_with_the_other_runs() -> None:
    """Bug caught: a hard stop that ignores --dataset-budget (a resume's redone steps passed it)."""
    journal, others = MemoryJournal(), (Segment(0.05, 0.8, 30), Segment(0.1, 2.0, 5))
    journal.record(Segment(0.1, 2.0, 10))
    mine = [*journal.segments(), Segment(0.1, 2.0, 1)]
    with_one_more = epsilon_of([others[0], Segment(0.1, 2.0, 16)], 1e-5, "rdp")  # the other runs + 11 steps
    assert epsilon_of(mine, 1e-5, "rdp") < with_one_more * 0.999  # this run alone would fit
    for limit, fits in ((with_one_more * 1.001, True), (with_one_more * 0.999, False)):
        model = linear_model()
        mechanism = Mechanism(0.1, 8.0, 2.0, 1.0)
        budget = Budget(1e-5, "rdp", None, DatasetCap(limit, others))
        step = PrivacyStep(model, mechanism, budget, Randomness.secure(), journal)
        assert step.within_budget() is fits
    assert step.exceeded_limit().startswith(f"--dataset-budget {limit:g}")
    with pytest.raises(BudgetExceededError, match="one more step would exceed --dataset-budget"):
        step.begin(10)
    assert journal.segments() == [Segment(0.1, 2.0, 10)]  # a refused step is not journalled
    exposed = Budget(1e-5, "rdp", None, DatasetCap(1e6, (), math.inf))  # a non-private run used the data
    assert not PrivacyStep(linear_model(), mechanism, exposed, Randomness.secure(), journal).within_budget()


def test_no_dp_journals_nothing_and_adds_no_noise() -> None:
    model, journal = linear_model(), MemoryJournal()
    step, optimizer = make_step(model, dp=False, journal=journal)
    step.begin(0)
    step.finish()
    assert not grads(model).any() and journal.segments() == [] and step.epsilon is None
    optimizer.step()


def pre_noise_sum(model: nn.Module, x: torch.Tensor, clip: float, monkeypatch) -> torch.Tensor:
    """The fp32 sum the noise is added to, for one step over the examples of x (one unit each)."""
    seen: list[torch.Tensor] = []
    real = step_module.add_gaussian_noise

    def spy(tensors, std, randomness, t):
        seen.extend(t_.detach().clone() for t_ in tensors)
        real(tensors, std, randomness, t)

    monkeypatch.setattr(step_module, "add_gaussian_noise", spy)
    step, _ = make_step(model, sigma=1.0, clip=clip)
    step.begin(0)
    step.backward(unit_losses(model, x), torch.arange(x.shape[0]))
    step.finish()
    step.remove()
    return torch.cat([s.double().flatten() for s in seen])


def test_bf16_weights_one_more_unit_moves_the_pre_noise_sum_by_at_most_c(monkeypatch) -> None:
    """Bug caught: rounding the clipped sum to the weights' bf16 before the noise (1.23·C at B = 256)."""
    model = linear_model(torch.bfloat16)
    clip = 0.25
    x = torch.randn(1, D_IN).repeat(257, 1)  # identical records: the rounding error adds up
    with_unit = pre_noise_sum(model, x, clip, monkeypatch)
    without = pre_noise_sum(model, x[:-1], clip, monkeypatch)
    assert (with_unit - without).norm().item() <= clip * (1 + 1e-5)
