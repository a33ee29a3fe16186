"""Canary exposure (Carlini et al. 2019, "The Secret Sharer").

exposure = log2 |R| - log2 rank(secret), where R is every possible secret and the rank orders
them by log-perplexity given the canary's prefix (rank 1 = most likely). Scoring all 10^6
six-digit secrets is too slow, so, as in the paper's extrapolation, a skew-normal is fitted to
the log-perplexities of a random sample of candidates and its CDF at the secret's value
estimates the fraction of R ranked above the secret.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from scipy.stats import skewnorm

from dpft.audit.scoring import suffix_logprobs


def exposure_from_rank(rank: float, space_size: float) -> float:
    """Exposure of a secret from its (possibly fractional, estimated) rank.

    Args:
        rank: rank of the secret among all candidates, 1 = most likely; clamped to [1, |R|].
        space_size: |R|, the number of possible secrets.

    Returns:
        log2 |R| - log2 rank, in [0, log2 |R|].
    """
    return math.log2(space_size) - math.log2(min(max(rank, 1.0), space_size))


def exact_exposure(secret_logppl: float, all_logppl: np.ndarray) -> float:
    """Exposure from the exact rank among every candidate's log-perplexity.

    Args:
        secret_logppl: log-perplexity of the secret.
        all_logppl: log-perplexities of all other secrets in R.

    Returns:
        The exact exposure; ties count in the secret's favour.
    """
    rank = 1 + int(np.sum(all_logppl < secret_logppl))
    return exposure_from_rank(rank, len(all_logppl) + 1)


def estimated_exposure(secret_logppl: float, sample_logppl: np.ndarray, space_size: float) -> float:
    """Exposure from a skew-normal fitted to a random sample of candidates' log-perplexities.

    Args:
        secret_logppl: log-perplexity of the secret.
        sample_logppl: log-perplexities of randomly drawn candidates (hundreds or more).
        space_size: |R|, the number of possible secrets.

    Returns:
        log2 |R| - log2 max(1, |R| * CDF(secret_logppl)).
    """
    a, loc, scale = skewnorm.fit(sample_logppl)
    # logcdf keeps precision deep in the left tail, where a memorised secret lies.
    log2_cdf = skewnorm.logcdf(secret_logppl, a, loc, scale) / math.log(2)
    return math.log2(space_size) - max(0.0, math.log2(space_size) + log2_cdf)


def sample_candidates(
    alphabet: str,
    length: int,
    n: int,
    exclude: str,
    rng: np.random.Generator,
) -> list[str]:
    """Distinct random secrets, drawn uniformly from alphabet^length without `exclude`.

    Args:
        alphabet: the secret's characters, e.g. "0123456789".
        length: the secret's length.
        n: how many candidates (capped at |R| - 1).
        exclude: the true secret, never drawn.
        rng: the random generator.

    Returns:
        The candidate strings.
    """
    n = min(n, len(alphabet) ** length - 1)
    out: set[str] = set()
    while len(out) < n:
        draw = "".join(alphabet[i] for i in rng.integers(0, len(alphabet), length))
        if draw != exclude:
            out.add(draw)
    return sorted(out)


def secret_logppl(
    model,
    tokenizer,
    prefix: str,
    secrets: Sequence[str],
    batch_size: int = 16,
) -> np.ndarray:
    """Log-perplexity (-sum of token log-probs, in nats) of each secret given the prefix.

    Args:
        model: a causal LM.
        tokenizer: its tokenizer.
        prefix: the canary's prefix (the training text is prefix + secret).
        secrets: the strings to score.
        batch_size: sequences per forward pass.

    Returns:
        Array of log-perplexities, one per secret.

    Raises:
        DpftError: if the prefix encodes to no tokens.
    """
    return -suffix_logprobs(model, tokenizer, [(prefix, secrets)], batch_size)[0]


def canary_exposures(
    model,
    tokenizer,
    canaries: Sequence[dict],
    num_candidates: int = 2000,
    seed: int = 0,
    batch_size: int = 16,
) -> dict:
    """Exposure of each canary, and its mean by number of insertions (0 = never inserted).

    The exact rank is used when the whole secret space fits in `num_candidates`; otherwise
    the skew-normal estimate.

    Args:
        model: a causal LM.
        tokenizer: its tokenizer.
        canaries: canary dicts (canary_id, prefix, secret, secret_alphabet, secret_length,
            repetitions).
        num_candidates: random candidates scored per canary.
        seed: seed of the candidate draws.
        batch_size: sequences per forward pass.

    Returns:
        {"per_canary": [{"canary_id", "repetitions", "exposure"}], "by_repetition":
        {"<reps>": {"canaries", "mean_exposure"}}, "max_exposure", "num_candidates", "method"}.
    """
    rng = np.random.default_rng(seed)
    rows, max_exposure, methods = [], 0.0, set()
    for c in canaries:
        space = len(c["secret_alphabet"]) ** int(c["secret_length"])
        cands = sample_candidates(c["secret_alphabet"], int(c["secret_length"]), num_candidates, c["secret"], rng)
        logppl = secret_logppl(model, tokenizer, c["prefix"], [c["secret"], *cands], batch_size)
        if len(cands) == space - 1:
            exposure, method = exact_exposure(logppl[0], logppl[1:]), "exact"
        else:
            exposure, method = estimated_exposure(logppl[0], logppl[1:], space), "skewnorm"
        methods.add(method)
        max_exposure = max(max_exposure, math.log2(space))
        rows.append({"canary_id": c["canary_id"], "repetitions": int(c["repetitions"]), "exposure": exposure})
    by_rep: dict[str, dict] = {}
    for reps in sorted({r["repetitions"] for r in rows}):
        vals = [r["exposure"] for r in rows if r["repetitions"] == reps]
        by_rep[str(reps)] = {"canaries": len(vals), "mean_exposure": float(np.mean(vals))}
    return {
        "per_canary": rows,
        "by_repetition": by_rep,
        "max_exposure": max_exposure,
        "num_candidates": num_candidates,
        "method": "+".join(sorted(methods)),
    }
