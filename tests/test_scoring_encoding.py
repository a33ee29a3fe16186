"""The audit scores records exactly as training encoded them: one encoder, checked per format."""

from __future__ import annotations

import pytest

from dpft.audit.scoring import encode_as_trained, encode_record
from dpft.data.encode import IGNORE_INDEX, encode_records
from dpft.data.records import Record
from test_encode import CHAT, COMPLETION, PROMPT, make_tokenizer

RECORDS = [
    {"prompt": PROMPT, "completion": COMPLETION},
    {"text": PROMPT + " " + COMPLETION},
    {"messages": CHAT},
]


@pytest.mark.parametrize("single", ["<s> $A", "$A", "<s> $A </s>"])  # BOS, none, BOS and EOS
@pytest.mark.parametrize("fields", RECORDS, ids=["prompt_completion", "text", "messages"])
def test_scoring_encodes_as_training(fields, single):
    tokenizer = make_tokenizer(single=single)
    trained = encode_records([Record(fields, "d.jsonl", 1)], tokenizer, 10_000).examples[0]
    ids, start = encode_as_trained(tokenizer, fields)
    assert ids == trained.input_ids
    assert start == next(i for i, label in enumerate(trained.labels) if label != IGNORE_INDEX)


@pytest.mark.parametrize("single", ["<s> $A", "$A", "<s> $A </s>"])
def test_encode_record_is_the_prompt_completion_encoding(single):
    tokenizer = make_tokenizer(single=single)
    trained = encode_records([Record({"prompt": PROMPT, "completion": COMPLETION}, "d", 1)], tokenizer, 10_000)
    ids, start = encode_record(tokenizer, PROMPT, COMPLETION)
    assert ids == trained.examples[0].input_ids
    assert ids[start:] == [label for label in trained.examples[0].labels if label != IGNORE_INDEX]
