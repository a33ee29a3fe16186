"""dpft: differentially private fine-tuning of LLMs, with audits that show what a model leaks.

The Python API mirrors the CLI. Heavy imports (torch, transformers) happen inside the functions,
so `import dpft` stays cheap.
"""

from __future__ import annotations

from typing import Any

from dpft.errors import BudgetExceededError, CheckpointError, ConfigError, DataError, DpftError

__version__ = "0.1.0"


def train(data: str, output: str, **options: Any) -> dict[str, Any]:
    """Fine-tune with DP-SGD; options are `TrainConfig` fields (same names as the CLI flags).

    Returns:
        The run's privacy report (the content of `privacy.json`).
    Raises:
        DpftError: invalid options or data, or a refused run.
    """
    from dpft.training.config import TrainConfig
    from dpft.training.recipe import train as run

    return run(TrainConfig(data=data, output=output, **options))


def audit(members: str, non_members: str, output: str, **options: Any) -> dict[str, Any]:
    """Audit a model (`run=` a dpft run directory, or `model=` any id/path) for what it leaks.

    Options mirror `dpft audit`: canaries, manifest, reference, max_records, batch_size, seed, bf16.
    Writes audit.json and report.html into `output` and returns the audit.
    """
    from dpft.audit.api import audit as run

    return run(members, non_members, output, **options)


def evaluate(data: str, **options: Any) -> dict[str, Any]:
    """Task utility of a model (`run=` or `model=`) on held-out prompt/completion records."""
    from dpft.audit.api import evaluate as run

    return run(data, **options)


def compute_epsilon(
    sample_rate: float, noise_multiplier: float, steps: int, delta: float, accountant: str = "pld"
) -> float:
    """ε of `steps` Poisson-sampled Gaussian steps (see `dpft.privacy.accounting`)."""
    from dpft.privacy.accounting import compute_epsilon as compute

    return compute(sample_rate, noise_multiplier, steps, delta, accountant)


def calibrate_noise(
    sample_rate: float, steps: int, delta: float, target_epsilon: float, accountant: str = "pld"
) -> float:
    """Smallest noise multiplier σ whose ε after `steps` steps is at most `target_epsilon`."""
    from dpft.privacy.accounting import calibrate_noise as calibrate

    return calibrate(sample_rate, steps, delta, target_epsilon, accountant)


__all__ = [
    "BudgetExceededError",
    "CheckpointError",
    "ConfigError",
    "DataError",
    "DpftError",
    "audit",
    "calibrate_noise",
    "compute_epsilon",
    "evaluate",
    "train",
]
