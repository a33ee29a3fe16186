"""privacy.json: the guarantee as the code actually ran it (DESIGN.md's contract)."""

from __future__ import annotations

from typing import Any

from dpft.privacy.sampling import batch_size_consistency

# Below this p-value the observed batch sizes cannot come from the Poisson sampler the accountant
# assumes: a sampler bug must not become a false ε, so the guarantee is withheld.
SAMPLING_P_MIN = 1e-6


def privacy_report(s, accountant, steps_touched: int, batch_sizes: list[int], stop_reason: str) -> dict[str, Any]:
    """Build privacy.json from the setup, the accountant and the observed batch sizes."""
    c = s.config
    dp = s.noise_multiplier is not None
    report: dict[str, Any] = {
        "dp": dp,
        "epsilon": accountant.epsilon(c.delta) if dp else None,
        "delta": c.delta if dp else None,
        "noise_multiplier": s.noise_multiplier,
        "max_grad_norm": c.max_grad_norm if dp else None,
        "sample_rate": s.sample_rate,
        "expected_batch_size": c.batch_size,
        "steps": steps_touched,
        "planned_steps": s.planned_steps,
        "target_epsilon": c.epsilon if dp else None,
        "accountant": c.accountant if dp else None,
        "sampling": "poisson",
        "privacy_unit": c.privacy_unit,
        "max_records_per_user": c.max_records_per_user if c.privacy_unit == "user" else None,
        "num_units": len(s.unit_examples),
        "noise_mode": "secure (OS entropy, not reproducible)"
        if c.secure_noise
        else f"seeded (seed {c.seed}, reproducible)",
        "stop_reason": stop_reason,
        "data": s.stats,
        "sampling_check": None,
    }
    if dp and batch_sizes:
        p_value = batch_size_consistency(batch_sizes, len(s.unit_examples), s.sample_rate)
        report["sampling_check"] = {"p_value": p_value, "steps_checked": len(batch_sizes)}
        if p_value < SAMPLING_P_MIN:
            report["guarantee_refused"] = (
                f"observed batch sizes disagree with Poisson sampling (p = {p_value:.2g}); ε withheld"
            )
            report["epsilon"] = None
    return report
