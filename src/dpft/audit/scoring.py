"""Model queries the audit needs: token log-probs, continuation scores, batched greedy decoding.

Records are encoded exactly as training concatenates them, without the chat template:
ids = tok(prompt) + tok(completion) + [eos]. Likelihood passes pad on the right; generation pads
on the left so that every prompt ends at the same position and new tokens line up.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from dpft.data.encode import ENCODERS, IGNORE_INDEX, encode_opening
from dpft.data.records import Record
from dpft.errors import DpftError

# A pass over cached tails, or one greedy decoding step, runs a few tokens per row instead of a
# whole sequence; such passes take this many times more rows, because at these sizes the fixed
# cost of a call through every layer dominates (the audit ran 2-3x faster on CPU).
LIGHT_ROWS_FACTOR = 8


def encode_as_trained(tokenizer, fields: dict) -> tuple[list[int], int]:
    """Ids of a record exactly as training encodes it, and where its loss starts.

    Uses the training encoder itself (`dpft.data.encode.ENCODERS`), so what the audit scores
    is what the model was trained on, for any record format.

    Args:
        tokenizer: a Hugging Face tokenizer (with an eos token; a chat template for chat records).
        fields: the record's fields: prompt and completion, text, or messages.

    Returns:
        (ids, start): the untruncated training ids, and the position of the first token that
        training puts a loss on (with the default --loss-on completion).

    Raises:
        DataError: if a chat template fails on the record.
    """
    record = Record(fields, "<audit>", 0)
    ids, labels = ENCODERS[record.kind](record, tokenizer, "completion")
    return ids, next(i for i, label in enumerate(labels) if label != IGNORE_INDEX)


def encode_record(tokenizer, prompt: str, completion: str) -> tuple[list[int], int]:
    """Ids of a prompt/completion record as trained, and where the completion starts.

    Args:
        tokenizer: a Hugging Face tokenizer with an eos token.
        prompt: the record's prompt.
        completion: the record's completion.

    Returns:
        (ids, start) with ids = tok(prompt) + tok(completion) + [eos] and start = len(tok(prompt)).
    """
    return encode_as_trained(tokenizer, {"prompt": prompt, "completion": completion})


def _pad_id(tokenizer) -> int:
    pad = tokenizer.pad_token_id
    return tokenizer.eos_token_id if pad is None else pad


def _device(model) -> torch.device:
    return next(model.parameters()).device


def token_logprobs(
    model,
    sequences: Sequence[Sequence[int]],
    batch_size: int = 16,
) -> list[np.ndarray]:
    """Log-probability of every token given its past, for each sequence.

    Args:
        model: a causal LM.
        sequences: token id lists (each at least 2 long).
        batch_size: sequences per forward pass.

    Returns:
        One float64 array per sequence, of length len(seq) - 1:
        entry t is log P(seq[t+1] | seq[:t+1]).
    """
    device = _device(model)
    # Sorting by length keeps padding, hence wasted compute, small within each batch.
    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))
    out: list[np.ndarray] = [np.empty(0)] * len(sequences)
    with torch.inference_mode():
        for lo in range(0, len(order), batch_size):
            idx = order[lo : lo + batch_size]
            width = max(len(sequences[i]) for i in idx)
            ids = torch.zeros(len(idx), width, dtype=torch.long)
            mask = torch.zeros(len(idx), width, dtype=torch.long)
            for row, i in enumerate(idx):
                ids[row, : len(sequences[i])] = torch.tensor(sequences[i])
                mask[row, : len(sequences[i])] = 1
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
            logp = F.log_softmax(logits[:, :-1].float(), dim=-1)
            picked = logp.gather(-1, ids[:, 1:].to(device).unsqueeze(-1)).squeeze(-1).cpu()
            for row, i in enumerate(idx):
                out[i] = picked[row, : len(sequences[i]) - 1].double().numpy()
    return out


def continuation_logprob(
    model,
    contexts: Sequence[Sequence[int]],
    continuations: Sequence[Sequence[int]],
    batch_size: int = 16,
) -> np.ndarray:
    """Total log-probability of each continuation given its context (sum over its tokens).

    Args:
        model: a causal LM.
        contexts: non-empty context id lists.
        continuations: non-empty continuation id lists, one per context.
        batch_size: sequences per forward pass.

    Returns:
        Array of log P(continuation | context), one per pair.
    """
    seqs = [list(c) + list(x) for c, x in zip(contexts, continuations, strict=True)]
    lps = token_logprobs(model, seqs, batch_size)
    return np.array([lp[len(c) - 1 :].sum() for lp, c in zip(lps, contexts, strict=True)])


def suffix_logprobs(
    model,
    tokenizer,
    items: Sequence[tuple[str, Sequence[str]]],
    batch_size: int = 16,
) -> list[np.ndarray]:
    """Total log-probability of each suffix given its context, with text tokenized whole.

    `context + suffix` is encoded as one text, as in training, so a tokenizer that merges across
    the boundary is handled: for each context, the tokens shared by all its candidates'
    encodings (and the context's own) form the conditioning part and the rest is scored. Within
    one context, suffixes of different token lengths are thus compared on the same condition.

    Args:
        model: a causal LM.
        tokenizer: its tokenizer.
        items: (context, suffixes) pairs; every context must encode to at least one token.
        batch_size: sequences per full forward pass (cached tails: LIGHT_ROWS_FACTOR times more).

    Returns:
        One array per item: log P(suffix | context) for each of its suffixes.

    Raises:
        DpftError: if a context encodes to no tokens.
    """
    out: list[np.ndarray] = [np.empty(0)] * len(items)
    singles: list[tuple[int, list[int], int]] = []  # (item, ids, first scored token)
    for k, (context, suffixes) in enumerate(items):
        if not suffixes:
            continue
        seqs = [encode_opening(tokenizer, context + s) for s in suffixes]
        own = encode_opening(tokenizer, context)
        shared = min(_common_prefix(own, s) for s in seqs)
        if shared == 0:
            raise DpftError("a scoring context encodes to no tokens; it must be non-empty")
        if len(seqs) == 1:  # nothing to share: batched with the other single-suffix items
            singles.append((k, seqs[0], shared))
        else:
            out[k] = shared_head_logprobs(
                model, seqs[0][:shared], [s[shared:] for s in seqs], batch_size * LIGHT_ROWS_FACTOR
            )
    lps = token_logprobs(model, [ids for _, ids, _ in singles], batch_size)
    for (k, _, shared), lp in zip(singles, lps, strict=True):
        out[k] = np.array([lp[shared - 1 :].sum()])
    return out


def shared_head_logprobs(
    model, head: Sequence[int], tails: Sequence[Sequence[int]], batch_size: int = 16
) -> np.ndarray:
    """log P(tail | head) for many tails of one head, running the head once (its KV cache reused).

    Exposure scores thousands of candidate secrets after the same canary prefix: encoding the
    prefix once and only the few secret tokens per candidate is several times cheaper.

    Args:
        model: a causal LM.
        head: the shared context ids (non-empty).
        tails: continuation id lists (each non-empty).
        batch_size: tails per forward pass.

    Returns:
        Array of log P(tail | head), one per tail.
    """
    device = _device(model)
    result = np.empty(len(tails))
    order = sorted(range(len(tails)), key=lambda i: len(tails[i]))
    with torch.inference_mode():
        first = model(input_ids=torch.tensor([list(head)], device=device), use_cache=True)
        head_logp = F.log_softmax(first.logits[0, -1].float(), dim=-1).cpu()
        for lo in range(0, len(order), batch_size):
            idx = order[lo : lo + batch_size]
            width = max(len(tails[i]) for i in idx)
            ids = torch.zeros(len(idx), width, dtype=torch.long)
            for row, i in enumerate(idx):
                ids[row, : len(tails[i])] = torch.tensor(tails[i])
            cache = copy.deepcopy(first.past_key_values)
            cache.batch_repeat_interleave(len(idx))
            # Right padding needs no mask: under causal attention no real token sees a pad.
            logits = model(input_ids=ids.to(device), past_key_values=cache, use_cache=True).logits
            logp = F.log_softmax(logits[:, :-1].float(), dim=-1)
            picked = logp.gather(-1, ids[:, 1:].to(device).unsqueeze(-1)).squeeze(-1).cpu().double()
            for row, i in enumerate(idx):
                n = len(tails[i])
                result[i] = head_logp[tails[i][0]].item() + picked[row, : n - 1].sum().item()
    return result


class ReferenceScores:
    """A reference model whose scores are computed once, however many models are audited against it.

    The calibrated MIA and one-run scores subtract the base model's log-probs of the same records
    and canaries from each audited model's; the demo audits two models against one base, and
    scoring the base twice cost a sixth of its audit time.
    """

    def __init__(self, model) -> None:
        self.model = model.eval()
        self._memo: dict[tuple, list[np.ndarray]] = {}

    def token_logprobs(self, sequences: Sequence[Sequence[int]], batch_size: int = 16) -> list[np.ndarray]:
        key = ("tokens", tuple(map(tuple, sequences)))
        if key not in self._memo:
            self._memo[key] = token_logprobs(self.model, sequences, batch_size)
        return self._memo[key]

    def suffix_logprobs(
        self, tokenizer, items: Sequence[tuple[str, Sequence[str]]], batch_size: int = 16
    ) -> list[np.ndarray]:
        key = ("suffixes", tuple((context, tuple(suffixes)) for context, suffixes in items))
        if key not in self._memo:
            self._memo[key] = suffix_logprobs(self.model, tokenizer, items, batch_size)
        return self._memo[key]


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def greedy_generate(
    model,
    tokenizer,
    prompts: Sequence[Sequence[int]],
    batch_size: int = 16,
    max_new_tokens: int = 24,
) -> list[str]:
    """Greedy continuations of many prompts, batched with left padding.

    Args:
        model: a causal LM.
        tokenizer: its tokenizer (for pad/eos ids and decoding).
        prompts: prompt token id lists.
        batch_size: sequences per full forward pass; a generate call takes LIGHT_ROWS_FACTOR times
            more prompts (each decoding step runs one token per row).
        max_new_tokens: tokens generated per prompt at most.

    Returns:
        The decoded new text of each prompt, special tokens removed.
    """
    device, pad = _device(model), _pad_id(tokenizer)
    out: list[str] = [""] * len(prompts)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    rows = batch_size * LIGHT_ROWS_FACTOR
    with torch.inference_mode():
        for lo in range(0, len(order), rows):
            idx = order[lo : lo + rows]
            width = max(len(prompts[i]) for i in idx)
            ids = torch.full((len(idx), width), pad, dtype=torch.long)
            mask = torch.zeros(len(idx), width, dtype=torch.long)
            for row, i in enumerate(idx):
                ids[row, width - len(prompts[i]) :] = torch.tensor(prompts[i])
                mask[row, width - len(prompts[i]) :] = 1
            gen = model.generate(
                input_ids=ids.to(device),
                attention_mask=mask.to(device),
                do_sample=False,
                max_new_tokens=max_new_tokens,
                pad_token_id=pad,
                eos_token_id=tokenizer.eos_token_id,
            )
            for row, i in enumerate(idx):
                out[i] = tokenizer.decode(gen[row, width:], skip_special_tokens=True)
    return out
