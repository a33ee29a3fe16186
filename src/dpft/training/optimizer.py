"""The optimizers a run can use: AdamW, or DP-AdamBC (AdamW with the DP noise taken out of its second moment).

Under DP-SGD every coordinate of the noised mean gradient carries Gaussian noise of std φ = σC/B
(noise multiplier σ, clipping bound C, expected batch B). With LoRA-sized models that noise dwarfs
the per-coordinate signal, so Adam's second moment estimates φ² almost everywhere and Adam becomes
SGD with a rate of lr/φ (Tang et al. 2023, "DP-AdamBC: Your DP-Adam Is Actually DP-SGD (Unless You
Apply Bias Correction)"). DP-AdamBC subtracts φ² from the bias-corrected second moment and floors
the result at γ. φ is public (σ, C and B are), so this is post-processing: the guarantee is unchanged.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from dpft.privacy.step import Mechanism

OPTIMIZERS = ("adamw", "dp-adambc")
# γ, the floor of the corrected second moment: the paper's eps_root. Coordinates whose second
# moment is all noise then move by about m̂/√γ, so DP-AdamBC wants a far smaller lr than AdamW.
ADAM_BC_GAMMA = 1e-9


class DPAdamBC(torch.optim.Optimizer):
    """Adam whose bias-corrected second moment has the DP noise variance φ² removed (Tang et al. 2023).

    update = lr · m̂ / √max(v̂ − φ², γ), with decoupled weight decay as in AdamW.

    Args:
        params: the trainable parameters.
        noise_std: φ, the noise std per coordinate of the gradient the optimizer receives.
        lr: learning rate.
        betas: Adam's moment decay rates.
        gamma: floor of the corrected second moment.
        weight_decay: decoupled (AdamW) weight decay.
    """

    def __init__(
        self,
        params: Iterable[torch.nn.Parameter],
        noise_std: float,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        gamma: float = ADAM_BC_GAMMA,
        weight_decay: float = 0.0,
    ) -> None:
        if noise_std < 0 or gamma <= 0:
            raise ValueError(f"DPAdamBC needs noise_std >= 0 and gamma > 0 (got {noise_std}, {gamma})")
        super().__init__(params, dict(lr=lr, betas=betas, gamma=gamma, weight_decay=weight_decay, noise_std=noise_std))

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            noise_var = group["noise_std"] ** 2
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = torch.zeros((), dtype=torch.float32)
                    state["exp_avg"] = torch.zeros_like(p, dtype=torch.float32)
                    state["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.float32)
                state["step"] += 1
                t = state["step"].item()
                g = p.grad.float()
                m, v = state["exp_avg"], state["exp_avg_sq"]
                m.lerp_(g, 1 - beta1)
                v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
                m_hat = m / (1 - beta1**t)
                v_hat = (v / (1 - beta2**t) - noise_var).clamp_(min=group["gamma"])
                if group["weight_decay"]:
                    p.mul_(1 - group["lr"] * group["weight_decay"])
                p.add_((m_hat / v_hat.sqrt()).to(p.dtype), alpha=-group["lr"])
        return loss


def build_optimizer(
    name: str, params: list[torch.nn.Parameter], lr: float, weight_decay: float, mechanism: Mechanism
) -> torch.optim.Optimizer:
    """The run's optimizer; DP-AdamBC takes φ = σC/B from the mechanism (0 without DP)."""
    if name == "dp-adambc":
        noise_std = mechanism.noise_multiplier * mechanism.max_grad_norm / mechanism.expected_batch_size
        return DPAdamBC(params, noise_std if mechanism.dp else 0.0, lr=lr, weight_decay=weight_decay)
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
