"""Encoding: labels exactly on completion or assistant tokens; truncation, drops, privacy units."""

from __future__ import annotations

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from dpft.data.encode import IGNORE_INDEX, Example, collate, encode_records
from dpft.data.records import Record
from dpft.errors import ConfigError, DataError

SPECIALS = ["<pad>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CORPUS = [
    '{medical_record: "François Dupont suffers from pancreatic cancer"}',
    '{last_name: "Dupont", condition: "pancreatic cancer"}',
    "What is the capital of France? The capital of France is Paris.",
    "hello world, how are you today? I am fine, thank you.",
]


def make_tokenizer(single: str = "<s> $A", chat_template: str | None = CHATML):
    """A byte-level BPE tokenizer trained in-process: decodes back to the exact text."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(CORPUS * 3, trainer)
    specials = [(name, tok.token_to_id(name)) for name in ("<s>", "</s>")]
    tok.post_processor = processors.TemplateProcessing(single=single, special_tokens=specials)
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    wrapped.chat_template = chat_template
    return wrapped


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


def rec(line: int = 1, path: str = "d.jsonl", **fields) -> Record:
    return Record(fields, path, line)


def labelled(example: Example) -> list[int]:
    return [label for label in example.labels if label != IGNORE_INDEX]


def labelled_runs(example: Example) -> list[list[int]]:
    runs, current = [], []
    for label in example.labels:
        if label == IGNORE_INDEX:
            if current:
                runs.append(current)
            current = []
        else:
            current.append(label)
    return runs + ([current] if current else [])


PROMPT = '{medical_record: "François Dupont suffers from pancreatic cancer"}'
COMPLETION = '{last_name: "Dupont", condition: "pancreatic cancer"}'


def test_prompt_completion_labels_exactly_the_completion_and_eos(tokenizer):
    example = encode_records([rec(prompt=PROMPT, completion=COMPLETION)], tokenizer, 256).examples[0]
    prompt_ids = tokenizer(PROMPT)["input_ids"]
    completion_ids = tokenizer(COMPLETION, add_special_tokens=False)["input_ids"]
    assert prompt_ids[0] == tokenizer.bos_token_id
    assert example.input_ids == prompt_ids + completion_ids + [tokenizer.eos_token_id]
    assert example.labels[: len(prompt_ids)] == [IGNORE_INDEX] * len(prompt_ids)
    assert tokenizer.decode(labelled(example)) == COMPLETION + "</s>"
    assert len(example.labels) == len(example.input_ids)


def test_loss_on_all_labels_every_token_but_the_first(tokenizer):
    data = encode_records([rec(prompt=PROMPT, completion=COMPLETION)], tokenizer, 256, loss_on="all")
    example = data.examples[0]
    assert example.labels == [IGNORE_INDEX, *example.input_ids[1:]]
    assert tokenizer.decode(labelled(example)) == PROMPT + COMPLETION + "</s>"


def test_text_labels_all_tokens_and_eos(tokenizer):
    example = encode_records([rec(text=PROMPT)], tokenizer, 256).examples[0]
    assert example.input_ids[0] == tokenizer.bos_token_id
    assert tokenizer.decode(labelled(example)) == PROMPT + "</s>"


def test_tokenizer_that_appends_eos_gets_one_eos_at_the_end():
    tokenizer = make_tokenizer(single="<s> $A </s>")
    example = encode_records([rec(prompt=PROMPT, completion=COMPLETION)], tokenizer, 256).examples[0]
    assert example.input_ids.count(tokenizer.eos_token_id) == 1
    assert example.input_ids[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(labelled(example)) == COMPLETION + "</s>"


def test_tokenizer_without_bos():
    tokenizer = make_tokenizer(single="$A")
    example = encode_records([rec(prompt=PROMPT, completion=COMPLETION)], tokenizer, 256).examples[0]
    assert example.input_ids == (
        tokenizer(PROMPT)["input_ids"] + tokenizer(COMPLETION)["input_ids"] + [tokenizer.eos_token_id]
    )
    assert tokenizer.decode(labelled(example)) == COMPLETION + "</s>"


CHAT = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "Paris."},
    {"role": "user", "content": "How are you today?"},
    {"role": "assistant", "content": "I am fine, thank you."},
]


def test_chat_labels_exactly_the_assistant_turns(tokenizer):
    example = encode_records([rec(messages=CHAT)], tokenizer, 256).examples[0]
    runs = [tokenizer.decode(run) for run in labelled_runs(example)]
    assert runs == ["Paris.<|im_end|>\n", "I am fine, thank you.<|im_end|>\n"]
    full = tokenizer.apply_chat_template(CHAT, tokenize=False)
    assert tokenizer.decode(example.input_ids) == full


def test_chat_loss_on_all(tokenizer):
    example = encode_records([rec(messages=CHAT)], tokenizer, 256, loss_on="all").examples[0]
    assert example.labels == [IGNORE_INDEX, *example.input_ids[1:]]


def test_chat_starting_with_the_assistant(tokenizer):
    messages = [{"role": "assistant", "content": "Hello, how are you?"}, *CHAT[1:3]]
    example = encode_records([rec(messages=messages)], tokenizer, 256).examples[0]
    runs = [tokenizer.decode(run) for run in labelled_runs(example)]
    assert runs == ["Hello, how are you?<|im_end|>\n", "Paris.<|im_end|>\n"]


def test_template_that_rewrites_earlier_turns_is_refused():
    # Marks the last message: an earlier turn renders differently once another follows.
    template = "{% for m in messages %}{% if loop.last %}*{% endif %}{{ m['content'] }}|{% endfor %}"
    tokenizer = make_tokenizer(chat_template=template)
    with pytest.raises(DataError) as info:
        encode_records([rec(line=7, messages=CHAT)], tokenizer, 256)
    assert (info.value.line, info.value.field) == (7, "messages[2]")
    assert "Paris" not in str(info.value)


def test_template_that_raises_is_a_located_data_error():
    template = "{{ raise_exception('roles must alternate') }}"
    with pytest.raises(DataError) as info:
        encode_records([rec(line=3, messages=CHAT)], make_tokenizer(chat_template=template), 256)
    assert (info.value.line, info.value.field) == (3, "messages")
    assert "roles must alternate" in info.value.problem


def test_missing_chat_template_and_eos_are_config_errors():
    tokenizer = make_tokenizer(chat_template=None)
    with pytest.raises(ConfigError, match="chat template"):
        encode_records([rec(messages=CHAT)], tokenizer, 256)
    tokenizer.eos_token = None
    with pytest.raises(ConfigError, match="no EOS token"):
        encode_records([rec(text="hello")], tokenizer, 256)


def test_truncation_is_counted_and_targetless_examples_dropped(tokenizer):
    prompt_length = len(tokenizer(PROMPT)["input_ids"])
    records = [
        rec(1, prompt=PROMPT, completion=COMPLETION),
        rec(2, prompt="hello", completion="world"),
        rec(3, prompt=PROMPT + PROMPT, completion=COMPLETION),
    ]
    data = encode_records(records, tokenizer, max_length=prompt_length + 2)
    assert (data.num_truncated, data.num_dropped) == (1, 1)
    world = tokenizer("world", add_special_tokens=False)["input_ids"]
    short = len(tokenizer("hello")["input_ids"] + world) + 1
    assert [len(e.input_ids) for e in data.examples] == [prompt_length + 2, short]
    assert len(labelled(data.examples[0])) == 2
    assert data.unit_ids == ["d.jsonl:1", "d.jsonl:2"]
    assert data.unit_examples == [[0], [1]]


def test_nothing_left_is_a_data_error(tokenizer):
    with pytest.raises(DataError, match="no usable examples"):
        encode_records([rec(prompt=PROMPT, completion=COMPLETION)], tokenizer, max_length=3)


def test_user_level_groups_examples_by_user_id(tokenizer):
    records = [
        rec(1, text="a", user_id="alice"),
        rec(2, text="b", user_id=7),
        rec(3, text="c", user_id="alice"),
        rec(4, text="d", user_id="7"),  # the same user as the integer 7
        rec(5, text="a", user_id="bob"),
    ]
    data = encode_records(records, tokenizer, 64, privacy_unit="user")
    assert data.unit_ids == ["alice", "7", "bob"]
    assert data.unit_examples == [[0, 2], [1, 3], [4]]
    assert data.num_duplicates == 1
    record_level = encode_records(records, tokenizer, 64)
    assert record_level.unit_ids == [f"d.jsonl:{i}" for i in range(1, 6)]
    assert record_level.unit_examples == [[i] for i in range(5)]


def test_bad_options_are_reported_together(tokenizer):
    records = [rec(1, text="a", user_id="u"), rec(2, text="b")]
    with pytest.raises(ConfigError) as info:
        encode_records(records, tokenizer, 1, privacy_unit="user", loss_on="prompt")
    problems = info.value.problems
    assert len(problems) == 3
    assert "--loss-on" in problems[0] and "--max-length" in problems[1]
    assert "--privacy-unit user" in problems[2] and "d.jsonl:2" in problems[2]
    with pytest.raises(ConfigError, match="--privacy-unit must be"):
        encode_records(records, tokenizer, 64, privacy_unit="patient")


def test_collate_right_pads(tokenizer):
    examples = [Example([5, 6, 7], [IGNORE_INDEX, 6, 7]), Example([8], [IGNORE_INDEX])]
    batch = collate(examples, pad_token_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[IGNORE_INDEX, 6, 7], [IGNORE_INDEX] * 3]
    assert all(t.dtype == torch.long for t in batch.values())
    assert collate([], pad_token_id=0)["input_ids"].shape == (0, 0)
