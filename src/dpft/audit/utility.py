"""Task utility on held-out records: does the model still do the task it was tuned for?"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

import numpy as np

from dpft.audit.scoring import encode_record, greedy_generate, token_logprobs
from dpft.data.encode import encode_opening
from dpft.errors import DpftError

ANSWER_RE = re.compile(r'\{last_name: "([^"]*)", condition: "([^"]*)"\}')


def parse_answer(text: str) -> tuple[str, str] | None:
    """(last_name, condition) of an answer in the task's exact format, else None.

    Args:
        text: a completion, generated or reference.

    Returns:
        The two fields, or None when the text is not exactly one well-formed answer.
    """
    found = ANSWER_RE.fullmatch(text.strip())
    return found.groups() if found else None


def evaluate_utility(
    model,
    tokenizer,
    records: Sequence[dict],
    *,
    batch_size: int = 16,
    max_new_tokens: int = 32,
) -> dict:
    """Exact-match accuracy of greedy answers and held-out loss on prompt/completion records.

    Args:
        model: a causal LM.
        tokenizer: its tokenizer (needs an eos token).
        records: held-out records with "prompt" and "completion".
        batch_size: prompts per batch.
        max_new_tokens: tokens generated per prompt.

    Returns:
        {"records", "exact_match": {"last_name", "condition", "full"}, "valid_format",
        "loss", "perplexity"}; loss is the mean NLL over all completion tokens (eos included,
        as trained), perplexity its exponential.

    Raises:
        DpftError: if no record has a prompt and a completion.
    """
    recs = [r for r in records if r.get("prompt") and r.get("completion")]
    if not recs:
        raise DpftError("utility evaluation needs records with 'prompt' and 'completion'")
    outs = greedy_generate(
        model, tokenizer, [encode_opening(tokenizer, r["prompt"]) for r in recs], batch_size, max_new_tokens
    )
    got = [parse_answer(o) for o in outs]
    want = [parse_answer(r["completion"]) for r in recs]
    field = {
        name: float(np.mean([g is not None and w is not None and g[i] == w[i] for g, w in zip(got, want, strict=True)]))
        for i, name in enumerate(("last_name", "condition"))
    }
    full = np.mean([o.strip() == r["completion"].strip() for o, r in zip(outs, recs, strict=True)])
    encoded = [encode_record(tokenizer, r["prompt"], r["completion"]) for r in recs]
    lps = token_logprobs(model, [ids for ids, _ in encoded], batch_size)
    # Token t of the completion is predicted at position t - 1.
    nll = np.concatenate([-lp[start - 1 :] for lp, (_, start) in zip(lps, encoded, strict=True)])
    loss = float(nll.mean())
    return {
        "records": len(recs),
        "exact_match": {**field, "full": float(full)},
        "valid_format": float(np.mean([g is not None for g in got])),
        "loss": loss,
        "perplexity": math.exp(loss),
    }
