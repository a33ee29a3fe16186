"""privacy.json (public: the guarantee as the code actually ran it) and the private data report."""

from __future__ import annotations

from typing import Any

from dpft.privacy.sampling import batch_size_consistency

# Below this p-value the observed batch sizes cannot come from the Poisson sampler the accountant
# assumes: a sampler bug must not become a false ε, so the guarantee is withheld.
SAMPLING_P_MIN = 1e-6
NEIGHBORING_RELATION = "add_or_remove_one"  # what the accountant's ε is about (dp_accounting's ADD_OR_REMOVE_ONE)


def privacy_report(run: Any, stop_reason: str) -> dict[str, Any]:
    """privacy.json: only public parameters and DP outputs (DESIGN.md's contract).

    Nothing here is computed from the records outside the DP mechanism: N (the number of
    units) is the accepted public parameter; ε is a function of (q, σ, steps, δ) only.
    """
    c, m = run.config, run.step.mechanism
    segments = run.journal.segments() if m.dp else []
    report: dict[str, Any] = {
        "dp": m.dp,
        "epsilon": run.step.epsilon,
        "delta": c.delta if m.dp else None,
        "noise_multiplier": m.noise_multiplier if m.dp else None,
        "max_grad_norm": m.max_grad_norm if m.dp else None,
        "sample_rate": m.sample_rate,
        "expected_batch_size": m.expected_batch_size,
        "steps": sum(s.steps for s in segments) if m.dp else run.steps_done,
        "planned_steps": run.planned_steps,
        "target_epsilon": c.epsilon if m.dp else None,
        "accountant": c.accountant if m.dp else None,
        "segments": [list(s) for s in segments],
        "sampling": "poisson",
        # ε bounds adding or removing one unit (Poisson sampling); N and q·N are public, not protected
        "neighboring_relation": NEIGHBORING_RELATION if m.dp else None,
        "privacy_unit": c.privacy_unit,
        "max_records_per_user": c.max_records_per_user if c.privacy_unit == "user" else None,
        "num_units": len(run.units),
        "randomness": run.randomness.mode,
        "dtype": c.dtype,
        "weights_dtype": c.weights_dtype,
        "stop_reason": stop_reason,
    }
    if m.dp and sampling_p_value(run) < SAMPLING_P_MIN:
        report["guarantee_refused"] = "the sampler's self-check failed (batch sizes disagree with Poisson sampling)"
        report["epsilon"] = None
    return report


def data_report(run: Any) -> dict[str, Any]:
    """private/data.json: statistics of the private records and the sampler self-check."""
    return {
        **run.stats,
        "sampling_check": {"p_value": sampling_p_value(run), "steps_checked": len(run.batch_sizes)},
    }


def sampling_p_value(run: Any) -> float:
    """p-value that the realised batch sizes follow Binomial(N, q) (private: they are realised draws)."""
    return batch_size_consistency(run.batch_sizes, len(run.units), run.step.mechanism.sample_rate)
