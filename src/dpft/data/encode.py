"""Encode validated records into training examples, each attached to its privacy unit.

Labels follow the Hugging Face convention: aligned with input_ids (the model shifts them) and
-100 where there is no loss. Which tokens carry a loss depends on the record's format:
- prompt/completion: the completion and the EOS token (every token with loss_on="all");
- text: every token;
- messages: each assistant turn as the chat template renders it, end-of-turn marker included
  (every token with loss_on="all").
The first token is never a target: nothing before it predicts it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from dpft.data.records import Record, count_duplicates
from dpft.errors import ConfigError, DataError

IGNORE_INDEX = -100
PRIVACY_UNITS = ("record", "user")
LOSS_ON = ("completion", "all")


@dataclass(frozen=True)
class Example:
    """One tokenized training sequence.

    Attributes:
        input_ids: token ids, at most max_length of them.
        labels: the target of each position (aligned with input_ids), -100 where no loss.
    """

    input_ids: list[int]
    labels: list[int]


@dataclass
class EncodedDataset:
    """The examples, grouped by privacy unit, and what encoding had to change.

    Attributes:
        examples: the usable examples.
        unit_ids: one id per privacy unit: "path:line" per record, or the user id.
        unit_examples: for each unit, the indices of its examples.
        num_truncated: examples cut to max_length and kept.
        num_dropped: records whose example had no target token left after truncation.
        num_duplicates: records whose content repeats an earlier record's.
    """

    examples: list[Example]
    unit_ids: list[str]
    unit_examples: list[list[int]]
    num_truncated: int
    num_dropped: int
    num_duplicates: int
    _unit_index: dict[str, int] = field(default_factory=dict, repr=False)

    def add(self, unit: str, example: Example) -> None:
        """Append an example to its privacy unit (a new unit gets the next index)."""
        if unit not in self._unit_index:
            self._unit_index[unit] = len(self.unit_ids)
            self.unit_ids.append(unit)
            self.unit_examples.append([])
        self.unit_examples[self._unit_index[unit]].append(len(self.examples))
        self.examples.append(example)


def encode_records(
    records: Sequence[Record],
    tokenizer: Any,
    max_length: int,
    privacy_unit: str = "record",
    loss_on: str = "completion",
) -> EncodedDataset:
    """Tokenize records, mark their targets, truncate, and group them by privacy unit.

    Args:
        records: validated records (from `read_records`).
        tokenizer: a Hugging Face tokenizer; it needs an EOS token for prompt/completion and
            text records, and a chat template for messages records.
        max_length: the longest sequence kept, in tokens; longer ones are cut at the end.
        privacy_unit: "record" (each record is a unit) or "user" (records grouped by user_id).
        loss_on: "completion" or "all" (every token, for prompt/completion and chat records).

    Returns:
        The encoded dataset; units whose examples were all dropped are left out.

    Raises:
        ConfigError: a bad option, or the tokenizer lacks what the records need.
        DataError: the chat template fails on a record, or no usable example is left.
    """
    _check_options(records, tokenizer, max_length, privacy_unit, loss_on)
    dataset = EncodedDataset([], [], [], 0, 0, count_duplicates(list(records)))
    for record in records:
        ids, labels = ENCODERS[record.kind](record, tokenizer, loss_on)
        truncated = len(ids) > max_length
        ids, labels = ids[:max_length], labels[:max_length]
        if all(label == IGNORE_INDEX for label in labels):
            dataset.num_dropped += 1
            continue
        dataset.num_truncated += truncated
        unit = str(record.fields["user_id"]) if privacy_unit == "user" else record.record_id
        dataset.add(unit, Example(ids, labels))
    if not dataset.examples:
        left = f"{dataset.num_dropped} had no target token left within --max-length {max_length}"
        raise DataError(records[0].path, None, None, f"no usable examples ({left})")
    return dataset


def collate(examples: Sequence[Example], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad examples into a batch.

    Args:
        examples: the examples of one micro-batch (may be empty).
        pad_token_id: the id written into padding positions.

    Returns:
        "input_ids", "attention_mask" (0 on padding) and "labels" (-100 on padding), each a
        long tensor of shape (len(examples), longest example).
    """
    width = max((len(example.input_ids) for example in examples), default=0)
    shape = (len(examples), width)
    input_ids = torch.full(shape, pad_token_id, dtype=torch.long)
    labels = torch.full(shape, IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros(shape, dtype=torch.long)
    for row, example in enumerate(examples):
        length = len(example.input_ids)
        input_ids[row, :length] = torch.tensor(example.input_ids, dtype=torch.long)
        labels[row, :length] = torch.tensor(example.labels, dtype=torch.long)
        attention_mask[row, :length] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def _check_options(records: Sequence[Record], tokenizer: Any, max_length: int, privacy_unit: str, loss_on: str) -> None:
    problems = []
    if privacy_unit not in PRIVACY_UNITS:
        problems.append(f"--privacy-unit must be 'record' or 'user', not '{privacy_unit}'")
    if loss_on not in LOSS_ON:
        problems.append(f"--loss-on must be 'completion' or 'all', not '{loss_on}'")
    if max_length < 2:
        problems.append(f"--max-length must be at least 2 tokens, not {max_length}")
    kinds = {record.kind for record in records}
    if kinds - {"messages"} and tokenizer.eos_token_id is None:
        problems.append("the tokenizer has no EOS token: the model could not learn to stop")
    if "messages" in kinds and not getattr(tokenizer, "chat_template", None):
        problems.append("chat ('messages') records need a tokenizer with a chat template")
    lacking = next((r for r in records if "user_id" not in r.fields), None)
    if privacy_unit == "user" and lacking is not None:
        problems.append(
            f"--privacy-unit user needs a 'user_id' in every record, and {lacking.record_id} "
            "has none: add user ids, or use --privacy-unit record"
        )
    if problems:
        raise ConfigError(problems)


def _tokenize(tokenizer: Any, text: str, special: bool) -> list[int]:
    return list(tokenizer(text, add_special_tokens=special)["input_ids"])


def encode_opening(tokenizer: Any, text: str) -> list[int]:
    """Tokens of text that starts a sequence: the tokenizer's BOS if it adds one, no EOS."""
    ids = _tokenize(tokenizer, text, special=True)
    eos = tokenizer.eos_token_id
    # Some tokenizers also append EOS; here the sequence goes on, so that EOS must go.
    if ids and ids[-1] == eos and _tokenize(tokenizer, text, special=False)[-1:] != [eos]:
        ids = ids[:-1]
    return ids


def _targets(ids: list[int]) -> list[int]:
    return [IGNORE_INDEX, *ids[1:]]


def _encode_prompt_completion(record: Record, tokenizer: Any, loss_on: str) -> tuple[list[int], list[int]]:
    prompt = encode_opening(tokenizer, record.fields["prompt"])
    completion = _tokenize(tokenizer, record.fields["completion"], special=False)
    completion.append(tokenizer.eos_token_id)
    ids = prompt + completion
    if loss_on == "all":
        return ids, _targets(ids)
    return ids, _targets([IGNORE_INDEX] * len(prompt) + completion)


def _encode_text(record: Record, tokenizer: Any, loss_on: str) -> tuple[list[int], list[int]]:
    ids = [*encode_opening(tokenizer, record.fields["text"]), tokenizer.eos_token_id]
    return ids, _targets(ids)


def _encode_messages(record: Record, tokenizer: Any, loss_on: str) -> tuple[list[int], list[int]]:
    ids: list[int] = []
    labels: list[int] = []
    for text, is_target in _chat_segments(record, tokenizer):
        # Tokenizing each segment alone puts a token boundary where the assistant turn
        # starts, exactly as at generation time (prompt tokenized, then answer generated).
        piece = _tokenize(tokenizer, text, special=False)
        ids += piece
        labels += piece if is_target or loss_on == "all" else [IGNORE_INDEX] * len(piece)
    return ids, _targets(labels)


def _chat_segments(record: Record, tokenizer: Any) -> list[tuple[str, bool]]:
    """Split the rendered chat into (text, is_assistant_turn) pieces.

    An assistant turn spans from the end of the conversation before it, rendered with the
    generation prompt, to the end of the conversation including it. This works for any
    template that renders earlier turns the same whatever follows them; others are refused.
    """
    messages = [{"role": m["role"], "content": m["content"]} for m in record.fields["messages"]]
    full = _render(record, tokenizer, messages, generation_prompt=False)
    segments, cursor = [], 0
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        through = _render(record, tokenizer, messages[: i + 1], generation_prompt=False)
        before = (
            _render(record, tokenizer, messages[:i], generation_prompt=True)
            if i > 0  # templates refuse an empty conversation: find the content instead
            else through[: max(through.find(message["content"]), 0)]
        )
        if not (through.startswith(before) and full.startswith(through)) or len(before) < cursor:
            problem = "the chat template renders earlier turns differently once later turns "
            raise DataError(record.path, record.line, f"messages[{i}]", problem + "follow")
        segments += [(full[cursor : len(before)], False), (full[len(before) : len(through)], True)]
        cursor = len(through)
    segments.append((full[cursor:], False))
    return [(text, is_target) for text, is_target in segments if text]


def _render(record: Record, tokenizer: Any, messages: list[dict], generation_prompt: bool) -> str:
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    except Exception as exc:  # a template may raise anything; its message names no data
        problem = f"the tokenizer's chat template failed ({type(exc).__name__}: {exc})"
        raise DataError(record.path, record.line, "messages", problem[:300]) from None


ENCODERS: dict[str, Callable[[Record, Any, str], tuple[list[int], list[int]]]] = {
    "prompt_completion": _encode_prompt_completion,
    "text": _encode_text,
    "messages": _encode_messages,
}
