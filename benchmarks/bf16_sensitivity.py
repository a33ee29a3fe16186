"""How far one more unit moves the pre-noise sum, in units of C, with bf16 weights (figures, not a test).

B + 1 vs B identical records through `PrivacyStep` on a bf16 `Linear(256, 256)`: the fixed code adds
the noise to the fp32 sums (≤ 1·C); the emulated old behaviour rounds the clipped sum to bf16 first.

    PYTHONPATH=src python benchmarks/bf16_sensitivity.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from dpft.privacy import step as step_module
from test_step import linear_model, make_step, unit_losses

CLIP = 0.25


def pre_noise_sum(model: torch.nn.Module, x: torch.Tensor, round_first: bool) -> torch.Tensor:
    seen: list[torch.Tensor] = []
    real = step_module.add_gaussian_noise

    def spy(tensors, std, randomness, t):
        seen.extend(t_.detach().clone() for t_ in tensors)
        real(tensors, std, randomness, t)

    step_module.add_gaussian_noise = spy
    try:
        step, _ = make_step(model, sigma=1.0, clip=CLIP)
        if round_first:  # the old engine: clipped sum rounded to the weights' dtype before the noise
            take = step._engine.take_sums
            step._engine.take_sums = lambda: {n: s.to(torch.bfloat16).float() for n, s in take().items()}
        step.begin(0)
        step.backward(unit_losses(model, x), torch.arange(x.shape[0]))
        step.finish()
        step.remove()
    finally:
        step_module.add_gaussian_noise = real
    return torch.cat([s.double().flatten() for s in seen])


def main() -> None:
    torch.manual_seed(1)
    for batch in (64, 256, 1024):
        x = torch.randn(1, 256).repeat(batch + 1, 1)
        for round_first in (True, False):
            model = linear_model(torch.bfloat16)
            moved = (pre_noise_sum(model, x, round_first) - pre_noise_sum(model, x[:-1], round_first)).norm()
            label = "rounded to bf16 before the noise" if round_first else "noise on the fp32 sum (dpft)"
            print(f"B = {batch:5d}  {label:34s} |Δ sum| / C = {moved.item() / CLIP:.4f}")


if __name__ == "__main__":
    main()
