"""Medical conditions for the synthetic data set, from most to least frequent.

Frequencies follow a Zipf law over this order (weight 1/rank). Pancreatic cancer sits near
the rare end on purpose: if it were common, a model completing "Dupont" with it would only
be repeating the prior, not leaking a training record (FACTS.md).
"""

from __future__ import annotations

CONDITIONS = (
    "hypertension",
    "type 2 diabetes",
    "asthma",
    "seasonal allergies",
    "migraine",
    "hypothyroidism",
    "gastroesophageal reflux disease",
    "osteoarthritis",
    "major depressive disorder",
    "generalized anxiety disorder",
    "hyperlipidemia",
    "chronic obstructive pulmonary disease",
    "atrial fibrillation",
    "psoriasis",
    "rheumatoid arthritis",
    "chronic kidney disease",
    "coeliac disease",
    "epilepsy",
    "heart failure",
    "Crohn's disease",
    "multiple sclerosis",
    "Parkinson's disease",
    "systemic lupus erythematosus",
    "hepatitis C",
    "tuberculosis",
    "HIV infection",
    "cystic fibrosis",
    "pancreatic cancer",
    "amyotrophic lateral sclerosis",
    "Huntington's disease",
)

ZIPF_EXPONENT = 1.0


def condition_frequencies() -> dict[str, float]:
    """The probability of each condition for a generated patient.

    Returns:
        Condition name → probability, in CONDITIONS order; the values sum to 1.
    """
    weights = [1.0 / rank**ZIPF_EXPONENT for rank in range(1, len(CONDITIONS) + 1)]
    total = sum(weights)
    return {name: weight / total for name, weight in zip(CONDITIONS, weights, strict=True)}
