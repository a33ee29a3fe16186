"""The sampling–accounting guard: the accountant assumes Poisson sampling, so a run whose batch
sizes disagree with Binomial(N, q) beyond chance must withhold its ε (privacy.json epsilon null,
`guarantee_refused`, and a model card that says so), while the true sampler passes.

The bugs are injected by replacing `PoissonSampler.sample` in an in-process tiny run with enough
steps for the check to have power: with zero variance (fixed-size batches) the variance z-score
grows like sqrt(T/2), about 7 at T = 100 (p ≈ 1e-11, far below the 1e-6 threshold).
"""

from __future__ import annotations

import json

import numpy as np
import pytest

import dpft
from dpft.privacy.accounting import compute_epsilon
from dpft.privacy.sampling import PoissonSampler
from dpft.training.report import SAMPLING_P_MIN

pytestmark = pytest.mark.usefixtures("one_torch_thread")


N, BATCH, STEPS = 40, 8, 100


RNG = np.random.default_rng()


def fixed_size(self, step: int) -> np.ndarray:
    """A plausible bug: shuffled fixed-size batches (what a DataLoader gives)."""
    return np.sort(RNG.choice(self.num_units, size=round(self.num_units * self.sample_rate), replace=False))


def half_rate(self, step: int) -> np.ndarray:
    """Another: Poisson sampling at the wrong rate (q/2, e.g. a unit counted twice in N)."""
    size = RNG.binomial(self.num_units, self.sample_rate / 2)
    return np.sort(RNG.choice(self.num_units, size=size, replace=False)).astype(np.int64)


def train(tmp_path, model: str) -> tuple[dict, dict, str]:
    rows = [{"prompt": f"r{i}:", "completion": f" c{i % 5}"} for i in range(N)]
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    report = dpft.train(
        str(data),
        str(tmp_path / "run"),
        model=model,
        batch_size=BATCH,
        micro_batch_size=16,
        max_steps=STEPS,
        max_length=12,
        epsilon=None,
        noise_multiplier=1.5,
        delta=1e-3,
        checkpoint_every=0,
        quiet=True,
    )
    privacy = json.loads((tmp_path / "run" / "privacy.json").read_text())
    assert privacy == json.loads(json.dumps(report))
    check = json.loads((tmp_path / "run" / "private" / "data.json").read_text())["sampling_check"]
    return privacy, check, (tmp_path / "run" / "model" / "README.md").read_text()


@pytest.mark.parametrize("bug", [fixed_size, half_rate], ids=["fixed_size", "half_rate"])
def test_wrong_sampler_withholds_the_guarantee(bug, tmp_path, tiny_model_dir, monkeypatch):
    monkeypatch.setattr(PoissonSampler, "sample", bug)
    privacy, check, card = train(tmp_path, tiny_model_dir)
    # Breaks if the guard is skipped, its threshold loosened, or it is fed the planned batch size
    # instead of the observed ones: then a false ε would be reported for a non-Poisson run.
    assert check["steps_checked"] == STEPS
    assert check["p_value"] < SAMPLING_P_MIN
    assert privacy["epsilon"] is None and privacy["dp"] is True
    assert "Poisson" in privacy["guarantee_refused"]  # the p-value itself stays private
    assert "No guarantee reported" in card and "Privacy guarantee" not in card


def test_true_sampler_passes(tmp_path, tiny_model_dir):
    privacy, check, card = train(tmp_path, tiny_model_dir)
    # Breaks if the guard fires on honest Poisson batches (a test with no power would pass the
    # bugs above too, so both directions are needed).
    assert check["steps_checked"] == STEPS
    assert check["p_value"] >= 1e-3
    assert "guarantee_refused" not in privacy
    q, sigma = privacy["sample_rate"], privacy["noise_multiplier"]
    assert privacy["epsilon"] == pytest.approx(compute_epsilon(q, sigma, STEPS, 1e-3))
    assert "Privacy guarantee" in card
