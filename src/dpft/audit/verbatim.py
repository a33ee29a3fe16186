"""Verbatim extraction (Carlini et al. 2021): does greedy decoding reproduce a training record?

Each record is split where an attacker would prompt it (`probes.probe_of`): the prompt, the
conversation up to the last assistant turn, or, for text records, the first half of the text's
tokens. The model continues greedily, and its output is compared with the record's true
continuation, cut to `max_new_tokens` tokens:
- exact: the output starts with the whole (cut) continuation;
- lcs: the longest common substring's length over the continuation's length (characters);
- token_overlap: the share of the continuation's whitespace-separated tokens that the output
  also contains (multiset recall).
Members are compared with non-members, whose rates are what a model that learned the data's
form, not its records, reaches.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from difflib import SequenceMatcher

import numpy as np

from dpft.audit.mia import compare_rates
from dpft.audit.probes import probe_of, tokens
from dpft.audit.scoring import greedy_generate

TEXT_PREFIX_FRACTION = 0.5  # a text record's prompt: this share of its tokens
METRICS = ("exact", "lcs", "token_overlap")


def split_for_extraction(tokenizer, fields: dict, max_new_tokens: int) -> tuple[list[int], list[int]] | None:
    """(prompt ids, true continuation ids cut to max_new_tokens), or None when nothing is left to extract."""
    probe = probe_of(tokenizer, fields)
    target = tokens(tokenizer, probe.target)
    if "text" in fields:
        cut = max(1, round(TEXT_PREFIX_FRACTION * len(target)))
        context, target = probe.context + target[:cut], target[cut:]
    else:
        context = probe.context
    if not context or not target:
        return None
    return context, target[:max_new_tokens]


def similarity(generated: str, truth: str) -> dict[str, float]:
    """The three verbatim measures of one output against its true continuation (see module)."""
    lcs = SequenceMatcher(None, generated, truth, autojunk=False).find_longest_match().size
    want, got = Counter(truth.split()), Counter(generated.split())
    return {
        "exact": float(generated.startswith(truth)),
        "lcs": lcs / max(len(truth), 1),
        "token_overlap": sum((want & got).values()) / max(sum(want.values()), 1),
    }


def verbatim_extraction(
    model,
    tokenizer,
    members: Sequence[dict],
    non_members: Sequence[dict],
    *,
    batch_size: int = 16,
    max_new_tokens: int = 32,
    seed: int = 0,
    n_boot: int = 200,
) -> dict | None:
    """Verbatim extraction rates of members and non-members, and the members' advantage.

    Args:
        model: a causal LM.
        tokenizer: its tokenizer.
        members: training records (any format).
        non_members: held-out records.
        batch_size: prompts per batch.
        max_new_tokens: the true continuation is cut to this many tokens, and so many generated.
        seed: bootstrap seed.
        n_boot: bootstrap resamples.

    Returns:
        {"members", "non_members", "max_new_tokens", and per metric {"member", "non_member",
        "advantage", "advantage_ci"}}, or None when either side has no record to extract.
    """
    sides = [_measure(model, tokenizer, recs, batch_size, max_new_tokens) for recs in (members, non_members)]
    mem, non = sides
    if not len(mem["exact"]) or not len(non["exact"]):
        return None
    out: dict = {"members": len(mem["exact"]), "non_members": len(non["exact"]), "max_new_tokens": max_new_tokens}
    for name in METRICS:
        out[name] = compare_rates(mem[name], non[name], n_boot, seed)
    return out


def _measure(model, tokenizer, records: Sequence[dict], batch_size: int, max_new_tokens: int) -> dict[str, np.ndarray]:
    splits = [s for s in (split_for_extraction(tokenizer, r, max_new_tokens) for r in records) if s]
    truths = [tokenizer.decode(target, skip_special_tokens=True) for _, target in splits]
    splits, truths = [s for s, t in zip(splits, truths, strict=True) if t], [t for t in truths if t]
    outputs = greedy_generate(model, tokenizer, [context for context, _ in splits], batch_size, max_new_tokens)
    rows = [similarity(g, t) for g, t in zip(outputs, truths, strict=True)]
    return {name: np.array([r[name] for r in rows]) for name in METRICS}
