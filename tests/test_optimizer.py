"""DP-AdamBC: the noise variance comes out of Adam's second moment, with φ = σC/B from the mechanism."""

from __future__ import annotations

import json

import pytest
import torch

import dpft
from dpft.errors import ConfigError
from dpft.privacy.step import Mechanism
from dpft.training.config import TrainConfig
from dpft.training.optimizer import DPAdamBC, build_optimizer
from helpers import write_records


def _one_step(opt_factory, grad: torch.Tensor, steps: int = 1) -> torch.Tensor:
    p = torch.nn.Parameter(torch.zeros_like(grad))
    opt = opt_factory([p])
    for _ in range(steps):
        p.grad = grad.clone()
        opt.step()
    return p.detach()


def test_first_step_is_lr_g_over_sqrt_g2_minus_phi2():
    # Step 1: m̂ = g and v̂ = g², so the update is lr·g/√max(g² − φ², γ): closed form.
    g, phi, gamma, lr = torch.tensor([0.5, -0.5, 0.1]), 0.3, 1e-4, 0.01
    moved = _one_step(lambda p: DPAdamBC(p, noise_std=phi, lr=lr, gamma=gamma), g)
    expected = -lr * torch.tensor([0.5 / 0.4, -0.5 / 0.4, 0.1 / gamma**0.5])
    torch.testing.assert_close(moved, expected)


def test_without_noise_it_is_adamw():
    torch.manual_seed(0)
    grads = [torch.randn(6) for _ in range(5)]
    ps = [torch.nn.Parameter(torch.ones(6)) for _ in range(2)]
    bc = DPAdamBC([ps[0]], noise_std=0.0, lr=0.01, gamma=1e-30, weight_decay=0.1)
    adamw = torch.optim.AdamW([ps[1]], lr=0.01, eps=0.0, weight_decay=0.1)
    for g in grads:
        for p, opt in zip(ps, (bc, adamw), strict=True):
            p.grad = g.clone()
            opt.step()
    torch.testing.assert_close(ps[0].detach(), ps[1].detach())


def test_signal_under_noise_moves_at_full_rate():
    # A constant signal of 0.01 under noise of std 0.1 per coordinate: Adam's step is about
    # lr·0.01/0.1, DP-AdamBC's about lr (the noise variance is taken out of the denominator).
    gen = torch.Generator().manual_seed(1)
    phi, signal, n, steps = 0.1, 0.01, 20_000, 300
    p_bc, p_adam = torch.nn.Parameter(torch.zeros(n)), torch.nn.Parameter(torch.zeros(n))
    bc = DPAdamBC([p_bc], noise_std=phi, lr=1e-3, gamma=(phi / 10) ** 2)
    adam = torch.optim.AdamW([p_adam], lr=1e-3, weight_decay=0.0)
    for _ in range(steps):
        g = signal + phi * torch.randn(n, generator=gen)
        for p, opt in ((p_bc, bc), (p_adam, adam)):
            p.grad = g.clone()
            opt.step()
    assert -p_adam.mean() / (steps * 1e-3) < 0.2  # about signal/phi = 0.1: Adam is SGD at lr/φ
    assert -p_bc.mean() / (steps * 1e-3) > 3 * (-p_adam.mean() / (steps * 1e-3))


def test_phi_is_sigma_c_over_expected_batch():
    p = [torch.nn.Parameter(torch.zeros(2))]
    mech = Mechanism(sample_rate=0.1, expected_batch_size=40.0, noise_multiplier=0.8, max_grad_norm=0.5)
    opt = build_optimizer("dp-adambc", p, 1e-3, 0.0, mech)
    assert opt.param_groups[0]["noise_std"] == pytest.approx(0.8 * 0.5 / 40)
    plain = build_optimizer("dp-adambc", p, 1e-3, 0.0, Mechanism.non_private(0.1, 40.0))
    assert plain.param_groups[0]["noise_std"] == 0.0
    assert isinstance(build_optimizer("adamw", p, 1e-3, 0.0, mech), torch.optim.AdamW)


def test_unknown_optimizer_is_refused():
    with pytest.raises(ConfigError, match="--optimizer must be one of adamw, dp-adambc"):
        TrainConfig(data="d.jsonl", output="o", optimizer="sgd").validate()


def test_dpft_train_runs_dp_adambc(tmp_path, tiny_model_dir, monkeypatch):
    seen = []
    monkeypatch.setattr(DPAdamBC, "step", _recording(DPAdamBC.step, seen))
    data = write_records(tmp_path / "d.jsonl")
    opts = dict(model=tiny_model_dir, batch_size=8, micro_batch_size=4, max_steps=3, lr=1e-4, max_length=64)
    opts |= dict(quiet=True, epsilon=8.0, delta=1e-3, checkpoint_every=0, optimizer="dp-adambc", max_grad_norm=0.5)
    privacy = dpft.train(str(data), str(tmp_path / "run"), **opts)
    assert len(seen) == 3
    assert seen[0] == pytest.approx(privacy["noise_multiplier"] * 0.5 / privacy["expected_batch_size"])
    assert "dp-adambc" in (tmp_path / "run" / "config.yaml").read_text()
    assert json.loads((tmp_path / "run" / "privacy.json").read_text())["steps"] == 3


def _recording(step, seen: list):
    def wrapped(self, closure=None):
        seen.append(self.param_groups[0]["noise_std"])
        return step(self, closure)

    return wrapped
