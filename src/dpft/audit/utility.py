"""Task utility on held-out records: does the model still do the task it was tuned for?

Works on any records: the held-out loss and perplexity cover every record's trained tokens (as
`dpft.data.encode` marks them); the answers cover records with one (prompt/completion: the
completion; chat: the last assistant turn), each generated greedily from its prompt. Named
fields (`--field`, same syntax as `--secret-field`) are compared one by one.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from dpft.audit.probes import probe_of, tokens
from dpft.audit.scoring import greedy_generate, token_logprobs
from dpft.audit.secret_extraction import SecretSpec, find_secret
from dpft.data.encode import ENCODERS, IGNORE_INDEX
from dpft.data.records import Record
from dpft.errors import DpftError

MAX_ANSWER_TOKENS = 256


def evaluate_utility(
    model,
    tokenizer,
    records: Sequence[dict],
    *,
    fields: Sequence[str] = (),
    batch_size: int = 16,
    max_new_tokens: int | None = None,
    per_record: bool = False,
) -> dict:
    """Held-out loss and perplexity, and exact match of greedy answers, whole and per field.

    Args:
        model: a causal LM.
        tokenizer: its tokenizer (needs an eos token).
        records: held-out records (any format).
        fields: field names compared one by one (`key: "value"` or JSON `"key": value`).
        batch_size: sequences per batch.
        max_new_tokens: tokens generated per prompt; default: the longest answer's, plus 2.
        per_record: also return each answered record's matches (for paired comparisons of models).

    Returns:
        {"records", "answers", "fields", "exact_match": {"full", <field>...}, "valid_format",
        "loss", "perplexity"}; loss is the mean NLL over all trained tokens (eos included),
        perplexity its exponential; exact_match and valid_format (every named field found in the
        answer) are None without records that have an answer, valid_format also without fields.
        With per_record: "per_record": {"full", <field>...}, one bool per answered record, in order.

    Raises:
        DpftError: if there are no records.
        ConfigError: a field name that is not a plain key.
    """
    if not records:
        raise DpftError("utility evaluation needs at least one record")
    finders = SecretSpec(tuple(fields)).finders("--field")
    loss = _held_out_loss(model, tokenizer, records, batch_size)
    answered = [r for r in records if "text" not in r]
    probes = [probe_of(tokenizer, r) for r in answered]
    longest = max((len(tokens(tokenizer, p.target)) for p in probes), default=0) + 2
    outs = greedy_generate(
        model, tokenizer, [p.context for p in probes], batch_size, max_new_tokens or min(longest, MAX_ANSWER_TOKENS)
    )
    matches = {"full": [o.strip() == p.target.strip() for o, p in zip(outs, probes, strict=True)]}
    found = {name: [find_secret(f, o) for o in outs] for name, f in finders.items()}
    for name, finder in finders.items():
        want = [find_secret(finder, p.target) for p in probes]
        matches[name] = [
            g is not None and w is not None and g[1] == w[1] for g, w in zip(found[name], want, strict=True)
        ]
    exact = {name: _mean(values) for name, values in matches.items()}
    valid = _mean([all(found[n][i] is not None for n in finders) for i in range(len(outs))]) if finders else None
    result = {
        "records": len(records),
        "answers": len(probes),
        "fields": list(finders),
        "exact_match": exact,
        "valid_format": valid,
        "loss": loss,
        "perplexity": math.exp(loss),
    }
    if per_record:
        result["per_record"] = {name: [bool(v) for v in values] for name, values in matches.items()}
    return result


def _held_out_loss(model, tokenizer, records: Sequence[dict], batch_size: int) -> float:
    """Mean NLL over the tokens training puts a loss on (default --loss-on completion)."""
    encoded = [ENCODERS[rec.kind](rec, tokenizer, "completion") for rec in (Record(r, "<eval>", 0) for r in records)]
    lps = token_logprobs(model, [ids for ids, _ in encoded], batch_size)
    # Token t is predicted at position t - 1.
    nll = [-lp[t - 1] for lp, (_, labels) in zip(lps, encoded, strict=True) for t in _targets(labels)]
    return float(np.mean(nll))


def _targets(labels: list[int]) -> list[int]:
    return [t for t, label in enumerate(labels) if label != IGNORE_INDEX]


def _mean(values: list[bool]) -> float | None:
    return float(np.mean(values)) if values else None
