"""The sensitivity bound in bf16: one unit moves the engine's fp32 sums by at most C (σ = 0).

Under bf16 autocast, with bf16 weights, and with the engine's own backward inside an autocast
region, on tiny LMs and on a Linear(1, 1) built so that bf16 rounding of a per-example gradient
is as large as it gets. Each norm must be taken of exactly what is summed, in fp32.
"""

from __future__ import annotations

from contextlib import nullcontext

import pytest
import torch
from torch import Tensor, nn

from dpft.privacy.rules import linear
from helpers import unit_contributions
from test_engine import MODELS, Norms, example_losses, shared_losses
from test_engine_sensitivity import adversarial_batch

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny models: threads only add contention
C = 0.5
TOL = 1e-5  # fp32 rounding of the sums is ~1e-7 relative; bf16 rounding of a norm is up to 4e-3
MODES = ["autocast", "autocast-backward", "bf16-weights"]


def forward_context(mode: str):
    return nullcontext() if mode == "bf16-weights" else torch.autocast("cpu", dtype=torch.bfloat16)


@pytest.mark.parametrize("ghost", [True, False], ids=["ghost", "instantiate"])
@pytest.mark.parametrize("mode", MODES)
def test_linear_1x1_rounding_adversary(monkeypatch: pytest.MonkeyPatch, mode: str, ghost: bool) -> None:
    """bf16 input a = 1 + 2^-7 and output gradient g = 1 - 2^-8, both exact: the exact gradient
    g·a = 1 + 2^-8 - 2^-15 rounds down to 1 in bf16, 0.39% less, the most a bf16 product can lose."""
    monkeypatch.setattr(linear, "use_ghost", lambda *_: ghost)
    layer = nn.Linear(1, 1, bias=False)
    nn.init.ones_(layer.weight)
    x, scale = torch.full((4, 1), 1 + 2**-7), (1 - 2**-8) * 2**10  # norms ~1000·C: all clipped
    if mode == "bf16-weights":
        layer, x = layer.to(torch.bfloat16), x.to(torch.bfloat16)

    def losses_of(rows: Tensor) -> Tensor:
        with forward_context(mode):
            return layer(x[rows]).float().squeeze(1) * scale

    moved = unit_contributions(layer, C, losses_of, torch.arange(4), autocast_backward=mode == "autocast-backward")
    assert max(moved.values()) <= C * (1 + TOL), moved
    assert min(moved.values()) >= C * (1 - 1e-3), moved  # clipped to C, not dropped


@pytest.mark.parametrize("units", [[0, 1, 2, 3, 4, 5], [0, 0, 1, 2, 2, 3, 3, 3]], ids=["record", "user"])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", ["llama-tied", "gpt2", "lora-qv"])
def test_one_unit_moves_fp32_sums_by_at_most_c_in_bf16(name: str, mode: str, units: list[int]) -> None:
    model, (batch, weights) = MODELS[name](), adversarial_batch(units)
    if mode == "bf16-weights":
        model = model.to(torch.bfloat16)

    def losses_of(rows: Tensor) -> Tensor:
        with forward_context(mode):
            return example_losses(model, *(t[rows] for t in batch[:3])) * weights[rows]

    moved = unit_contributions(model, C, losses_of, batch[3], autocast_backward=mode == "autocast-backward")
    assert max(moved.values()) <= C * (1 + TOL), moved
    assert moved[max(moved)] >= C * (1 - 1e-3)  # the adversarial (last) unit is clipped, not ignored


@pytest.mark.parametrize("mode", MODES)
def test_norm_and_generic_rules_in_bf16(mode: str) -> None:
    """torch's RMSNorm, LayerNorm, a Gemma-style norm (norm rule) and an unknown scale (generic)."""
    model, units = Norms(), torch.tensor([0, 1, 1, 2, 3, 4])
    ids = torch.randint(0, 10, (len(units), 5), generator=torch.Generator().manual_seed(0))
    weights = torch.where(units == 4, 1e6, 1.0)
    if mode == "bf16-weights":
        model = model.to(torch.bfloat16)

    def losses_of(rows: Tensor) -> Tensor:
        with forward_context(mode):
            return shared_losses(model, ids[rows]) * weights[rows]

    moved = unit_contributions(model, C, losses_of, units, autocast_backward=mode == "autocast-backward")
    assert max(moved.values()) <= C * (1 + TOL), moved
    assert moved[4] >= C * (1 - 1e-3)
