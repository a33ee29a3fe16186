"""Where an attacker stands in a record: the trained context, and the text that follows it.

Every record format has one *target*, the trained text an extraction attack tries to recover:
- prompt/completion: the completion, after the prompt;
- text: the whole text, after nothing (a BOS token if the tokenizer adds one);
- messages: the last assistant turn's content, after the conversation up to it (rendered by the
  chat template, generation prompt included).
The context ids are the training encoder's own (`dpft.data.encode.ENCODERS`), so an attack
prompts the model with exactly what it was trained on.
"""

from __future__ import annotations

from dataclasses import dataclass

from dpft.data.encode import ENCODERS, IGNORE_INDEX, encode_opening
from dpft.data.records import Record


@dataclass(frozen=True)
class Probe:
    """One record seen by an extraction attack.

    Attributes:
        context: token ids as trained, up to where the target starts (may be empty for text).
        target: the trained text that follows the context.
    """

    context: list[int]
    target: str


def probe_of(tokenizer, fields: dict) -> Probe:
    """The context and target of a record (see the module docstring).

    Args:
        tokenizer: the audited model's tokenizer (a chat template for messages records).
        fields: the record's fields.

    Returns:
        The record's Probe.

    Raises:
        DataError: if a chat template fails on the record.
    """
    record = Record(fields, "<audit>", 0)
    if record.kind == "prompt_completion":
        return Probe(encode_opening(tokenizer, fields["prompt"]), fields["completion"])
    if record.kind == "text":
        return Probe(encode_opening(tokenizer, ""), fields["text"])
    ids, labels = ENCODERS["messages"](record, tokenizer, "completion")
    return Probe(ids[: _last_target_run(labels)], _last_assistant(fields["messages"]))


def trained_text(fields: dict) -> str:
    """The record's text content, as one string (for zlib lengths and secret search)."""
    if "messages" in fields:
        return "\n".join(m["content"] for m in fields["messages"])
    if "text" in fields:
        return fields["text"]
    return fields["prompt"] + fields["completion"]


def tokens(tokenizer, text: str) -> list[int]:
    """Ids of text inside a sequence: no BOS, no EOS (as the encoders tokenize a completion)."""
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _last_assistant(messages: list[dict]) -> str:
    return next(m["content"] for m in reversed(messages) if m["role"] == "assistant")


def _last_target_run(labels: list[int]) -> int:
    """Start of the last run of target labels: where the last assistant turn begins."""
    end = max(i for i, label in enumerate(labels) if label != IGNORE_INDEX)
    start = end
    while start > 0 and labels[start - 1] != IGNORE_INDEX:
        start -= 1
    return start
