"""Models whose examples are not independent are refused, with the module named.

Per-unit clipping bounds what one unit changes only if each example's loss depends on its own
input alone. A BatchNorm using the batch's statistics breaks that wherever it sits: removing one
unit then moves the others' gradients too (measured: the sum by 2.4·C here, without the check).
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from dpft.errors import ConfigError
from dpft.privacy import engine
from dpft.privacy.engine import PerUnitClipper
from helpers import unit_contributions
from test_engine import RECORDS, USERS, check_against_reference

pytestmark = pytest.mark.usefixtures("one_torch_thread")
# The last example lies far out: it dominates the batch's statistics, and so everyone's output.
X = torch.randn(6, 4, generator=torch.Generator().manual_seed(0)) * torch.tensor([1, 1, 1, 1, 1, 30.0])[:, None]


def with_norm(norm: nn.Module) -> nn.Sequential:
    """Linear, a frozen norm, Linear: the norm sits between two trainable layers."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), norm, nn.Tanh(), nn.Linear(8, 3))
    norm.requires_grad_(False)
    return model


def losses(model: nn.Module, x: Tensor) -> Tensor:
    return model(x).log_softmax(-1)[:, 0]


@pytest.mark.parametrize(
    "norm",
    [
        lambda: nn.BatchNorm1d(8),
        lambda: nn.BatchNorm1d(8, track_running_stats=False).eval(),
        lambda: nn.SyncBatchNorm(8),
    ],
    ids=["train-mode", "no-running-stats", "sync"],
)
def test_batch_statistics_are_refused_at_attach(norm) -> None:
    with pytest.raises(ConfigError, match=r"module '1' \(\w*BatchNorm1?d?\) normalises with the whole batch"):
        PerUnitClipper(with_norm(norm()), 1.0)  # nn modules start in training mode


def test_train_mode_after_attach_is_refused_before_the_backward() -> None:
    model = with_norm(nn.BatchNorm1d(8)).eval()  # running statistics: examples independent
    clipper = PerUnitClipper(model, 1.0)
    model.train()  # as the training loop does, after building the accumulator
    with pytest.raises(ConfigError, match=r"module '1' \(BatchNorm1d\)"):
        clipper.backward(losses(model, X), torch.arange(6))
    clipper.remove()


def test_batch_statistics_break_the_bound(monkeypatch: pytest.MonkeyPatch) -> None:
    """Why the refusal: without it, one unit moves the sum by more than C."""
    monkeypatch.setattr(engine, "mixes_examples", lambda module: None)
    model, c = with_norm(nn.BatchNorm1d(8)).train(), 0.1
    moved = unit_contributions(model, c, lambda rows: losses(model, X[rows]), torch.arange(6))
    assert max(moved.values()) > 2 * c


@pytest.mark.parametrize(
    "norm",
    [lambda: nn.BatchNorm1d(8).eval(), lambda: nn.GroupNorm(2, 8), lambda: nn.LayerNorm(8)],
    ids=["batchnorm-eval", "groupnorm", "layernorm"],
)
@pytest.mark.parametrize("units", [RECORDS, USERS], ids=["record", "user"])
def test_per_example_norms_are_accepted(norm, units: list[int]) -> None:
    model = with_norm(norm())
    check_against_reference(model, [(X, torch.tensor(units))], losses)


class Flattened(nn.Module):
    """Runs its Linear on (batch·tokens, features) rows, as some mixture-of-experts blocks do."""

    def __init__(self, drop_first_row: bool = False) -> None:
        super().__init__()
        self.proj = nn.Linear(4, 4)
        self.drop_first_row = drop_first_row

    def forward(self, x: Tensor) -> Tensor:
        rows = x.flatten(0, 1)
        if self.drop_first_row:  # rows no longer in step with the examples
            return x + self.proj(rows[1:]).mean()
        return self.proj(rows).view_as(x)


def test_example_major_flattened_rows_are_clipped_per_example() -> None:
    """(B·T, d) rows in example-major order (row r belongs to example r // T): the token rule."""
    model = Flattened()
    x = torch.randn(3, 5, 4)
    clipper = PerUnitClipper(model, 0.5)
    norms = clipper.backward(model(x).sum((1, 2)), torch.arange(3))
    clipper.remove()
    for e in range(3):  # each example alone: its own norm
        model.zero_grad()
        model(x[e : e + 1]).sum().backward()
        alone = torch.cat([p.grad.flatten() for p in model.parameters()]).norm()
        torch.testing.assert_close(norms[e], alone, rtol=1e-5, atol=1e-6)


def test_rows_out_of_step_with_the_examples_are_refused() -> None:
    model = Flattened(drop_first_row=True)
    clipper = PerUnitClipper(model, 1.0)
    with pytest.raises(ConfigError, match=r"module 'proj' got an input of 14 rows for 3 examples"):
        clipper.backward(model(torch.randn(3, 5, 4)).sum((1, 2)), torch.arange(3))
