"""The shared input Gram of the ghost norm: found again only for the very same captured tensor.

A Linear fed a permuted 4-D activation gets a non-contiguous input, which `reshape` copies; each
copy is freed once its layer's norm is formed and the next layer's copy may take its address. A
Gram cache keyed by address then hands one layer another layer's Gram (norm error of percents).
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from dpft.privacy.rules import linear
from dpft.privacy.rules.base import Units
from helpers import unit_contributions
from test_engine import RECORDS, USERS, check_against_reference

pytestmark = pytest.mark.usefixtures("one_torch_thread")
A, D = 4, 8  # each Linear sees (B, A, A, D) transposed: same shape and strides in every layer


class Permuted(nn.Module):
    """Six Linears, each applied to the transpose of the previous output: every input is a copy."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(10, A * D)
        self.layers = nn.ModuleList(nn.Linear(D, D) for _ in range(6))
        self.head = nn.Linear(A * A * D, 10)

    def forward(self, ids: Tensor) -> Tensor:
        x = self.emb(ids).view(ids.shape[0], A, A, D)
        for layer in self.layers:
            x = torch.tanh(layer(x.transpose(1, 2)))
        return self.head(x.flatten(1))


def permuted_losses(model: nn.Module, ids: Tensor) -> Tensor:
    return model(ids).log_softmax(-1)[:, 3]


def tokens(n: int) -> Tensor:
    return torch.randint(0, 10, (n, A), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("ghost", [True, False], ids=["ghost", "instantiate"])
@pytest.mark.parametrize("units", [RECORDS, USERS], ids=["record", "user"])
def test_non_contiguous_inputs_match_single_unit_loop(monkeypatch: pytest.MonkeyPatch, ghost: bool, units: list[int]):
    monkeypatch.setattr(linear, "use_ghost", lambda *_: ghost)
    check_against_reference(Permuted(), [(tokens(len(units)), torch.tensor(units))], permuted_losses)


@pytest.mark.parametrize("units", [RECORDS, USERS], ids=["record", "user"])
def test_non_contiguous_inputs_one_unit_moves_the_sum_by_at_most_c(
    monkeypatch: pytest.MonkeyPatch, units: list[int]
) -> None:
    monkeypatch.setattr(linear, "use_ghost", lambda *_: True)
    model, ids, c = Permuted(), tokens(len(units)), 0.01  # every unit clipped

    moved = unit_contributions(model, c, lambda rows: permuted_losses(model, ids[rows]), torch.tensor(units))
    assert max(moved.values()) <= c * (1 + 1e-5), moved
    assert min(moved.values()) >= c * (1 - 1e-3), moved


def test_gram_of_another_tensor_at_the_same_address_is_recomputed() -> None:
    """Address reuse made deterministic: two tensors on one storage, the second with new values."""
    units = Units.from_index(torch.tensor([0, 1, 1]))
    storage = torch.randn(3 * 2 * 4).untyped_storage()
    first = torch.empty(0).set_(storage).view(3, 2, 4)
    kept = units.gram(first, source=first).clone()
    second = torch.empty(0).set_(storage).view(3, 2, 4)
    second.copy_(torch.randn(3, 2, 4))
    assert second.data_ptr() == first.data_ptr()
    torch.testing.assert_close(units.gram(second, source=second), units.gram(second))
    assert not torch.allclose(kept, units.gram(second))
    assert units.gram(second, source=second) is units.gram(second, source=second)  # q, k, v: one Gram
