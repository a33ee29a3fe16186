"""The probe refuses, before a run writes anything, what the engine cannot clip, and leaves the model as it was."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from dpft.errors import ConfigError
from dpft.models.loading import with_lora
from dpft.models.probe import check_trainable
from helpers import VOCAB, tiny_llama


class Bilinear(nn.Module):
    """A trainable module called with two inputs: no rule can clip it."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner, self.scale = inner, nn.Parameter(torch.ones(()))

    def forward(self, x: Tensor) -> Tensor:
        return self.inner(x) * self.scale


class TokenMajor(nn.Module):
    """Feeds a Linear the batch's rows token-first: (T·B, d), not example-major."""

    def __init__(self, inner: nn.Linear):
        super().__init__()
        self.inner = inner

    def forward(self, x: Tensor) -> Tensor:
        b, t, d = x.shape
        y = self.inner(x.transpose(0, 1).reshape(-1, d))
        return y.view(t, b, -1).transpose(0, 1)


def snapshot(model: nn.Module) -> tuple[dict[str, Tensor], dict[str, bool], Tensor]:
    return (
        {n: t.clone() for n, t in model.state_dict().items()},
        {n: m.training for n, m in model.named_modules()},
        torch.get_rng_state(),
    )


def assert_unchanged(model: nn.Module, before: tuple) -> None:
    state, modes, rng = before
    assert all(torch.equal(state[n], t) for n, t in model.state_dict().items())
    assert {n: m.training for n, m in model.named_modules()} == modes
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(p.grad is None for p in model.parameters())
    assert all("forward" not in m.__dict__ for m in model.modules())  # the clipper was removed


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_accepts_a_clippable_model_and_leaves_it_unchanged(mode: str) -> None:
    model = tiny_llama().train()  # training mode (dropout modules present): restored after
    model = with_lora(model, 4, 8, "auto") if mode == "lora" else model.requires_grad_(True)
    before = snapshot(model)
    check_trainable(model, VOCAB)
    assert_unchanged(model, before)


def test_refuses_a_module_no_rule_can_clip() -> None:
    model = tiny_llama().requires_grad_(True)
    mlp = model.model.layers[0].mlp
    mlp.down_proj = Bilinear(mlp.down_proj)  # owns a parameter and a trainable submodule
    before = snapshot(model)
    with pytest.raises(ConfigError, match="Bilinear"):
        check_trainable(model, VOCAB)
    assert_unchanged(model, before)


def test_refuses_rows_in_another_order_than_the_examples() -> None:
    """The flattened-rows rule assumes example-major rows; the probe catches a model that is not."""
    model = tiny_llama().requires_grad_(True)
    mlp = model.model.layers[0].mlp
    mlp.down_proj = TokenMajor(mlp.down_proj)
    before = snapshot(model)
    with pytest.raises(ConfigError, match="disagree with a per-unit loop"):
        check_trainable(model, VOCAB)
    assert_unchanged(model, before)


def test_refuses_a_model_with_nothing_to_train() -> None:
    with pytest.raises(ConfigError, match="no trainable parameter"):
        check_trainable(tiny_llama().requires_grad_(False), VOCAB)
