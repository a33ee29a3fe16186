"""Invariant 2: with no noise, one unit (even with a huge loss) moves the summed update by <= C."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from dpft.privacy.engine import PerUnitClipper, PlainAccumulator
from helpers import trainable, write_grads
from test_engine import MODELS, Batch, example_losses, make_batch, norm_of

C = 0.5
SCALE = 1e6  # the adversarial unit's loss multiplier


def adversarial_batch(units: list[int]) -> tuple[Batch, Tensor]:
    """A batch whose last unit targets each position's least likely token; its loss weights."""
    ids, mask, labels, unit_index = make_batch(units, seed=3)
    worst = unit_index == unit_index.max()
    model = MODELS["llama-tied"]()
    with torch.no_grad():
        least_likely = model(input_ids=ids, attention_mask=mask).logits.argmin(-1)
    targets = labels[:, 1:] != -100
    labels[:, 1:] = torch.where(worst[:, None] & targets, least_likely[:, :-1], labels[:, 1:])
    return (ids, mask, labels, unit_index), torch.where(worst, SCALE, 1.0)


def clipped_sum(model: nn.Module, batch: Batch, weights: Tensor, keep: Tensor) -> dict:
    """The engine's sum over the units in `keep` (rows of the other units removed)."""
    rows = torch.isin(batch[3], keep)
    _, unit_index = torch.unique(batch[3][rows], return_inverse=True)
    clipper = PerUnitClipper(model, C)
    losses = example_losses(model, *(t[rows] for t in batch[:3])) * weights[rows]
    clipper.backward(losses, unit_index)
    write_grads(clipper, model)
    clipper.remove()
    return {n: p.grad.clone() for n, p in trainable(model).items()}


@pytest.mark.parametrize("units", [[0, 1, 2, 3, 4, 5], [0, 0, 1, 2, 2, 3, 3, 3]], ids=["record", "user"])
@pytest.mark.parametrize("name", ["llama-tied", "gpt2", "lora-qv"])
def test_one_unit_moves_the_sum_by_at_most_c(name: str, units: list[int]) -> None:
    model, (batch, weights) = MODELS[name](), adversarial_batch(units)
    everyone = torch.unique(batch[3])
    full = clipped_sum(model, batch, weights, everyone)
    moved = {}
    for u in everyone.tolist():
        without = clipped_sum(model, batch, weights, everyone[everyone != u])
        alone = clipped_sum(model, batch, weights, torch.tensor([u]))
        moved[u] = float(norm_of({n: full[n] - without[n] for n in full}))
        assert moved[u] <= C * (1 + 1e-5), (u, moved[u])
        assert norm_of(alone) <= C * (1 + 1e-5), (u, float(norm_of(alone)))
    # the adversarial (last) unit is clipped, not ignored: it moves the sum by C, no less
    assert moved[max(moved)] >= C * (1 - 1e-3)


def test_huge_unit_norm_is_reported_unclipped() -> None:
    model, (batch, weights) = MODELS["llama-tied"](), adversarial_batch([0, 1, 2, 2])
    clipper = PerUnitClipper(model, C)
    norms = clipper.backward(example_losses(model, *batch[:3]) * weights, batch[3])
    clipper.remove()
    assert norms[-1] > SCALE * norms[:-1].max() / 10


def plain_grads(model: nn.Module, batches: list[Batch]) -> dict[str, Tensor]:
    model.zero_grad(set_to_none=True)
    sum(example_losses(model, *b[:3]).sum() for b in batches).backward()
    grads = {n: p.grad.clone() for n, p in trainable(model).items()}
    model.zero_grad(set_to_none=True)
    return grads


@pytest.mark.parametrize("name", ["llama-tied", "lora-qv"])
def test_plain_accumulator_equals_autograd(name: str) -> None:
    model = MODELS[name]()
    first, second = make_batch([0, 0, 1, 2], seed=4), make_batch([0, 1, 1], seed=5, length=8)
    acc = PlainAccumulator(model)
    norms = acc.backward(example_losses(model, *first[:3]), first[3])
    acc.backward(example_losses(model, *second[:3]), second[3])
    write_grads(acc, model)
    assert norms.shape == (3,) and norms.isnan().all()
    got = {n: p.grad.clone() for n, p in trainable(model).items()}
    for n, want in plain_grads(model, [first, second]).items():
        torch.testing.assert_close(got[n], want, rtol=1e-5, atol=1e-7, msg=n)
    acc.backward(example_losses(model, *second[:3]), second[3])  # a new step starts from zero
    write_grads(acc, model)
    got = {n: p.grad.clone() for n, p in trainable(model).items()}
    for n, want in plain_grads(model, [second]).items():
        torch.testing.assert_close(got[n], want, rtol=1e-5, atol=1e-7, msg=n)
