"""A Trainer's `train_dataset` as dpft examples grouped by privacy unit.

Two kinds of dataset are accepted:
- records (`prompt`/`completion`, `text` or `messages` columns): encoded exactly as `dpft train`
  encodes them (`dpft.data.encode_records`: loss on completions / assistant turns);
- pre-tokenized rows (`input_ids`, optional `labels` aligned with them, -100 where no loss).
"""

from __future__ import annotations

from typing import Any

from dpft.data import encode_records, read_records
from dpft.data.encode import IGNORE_INDEX, EncodedDataset, Example
from dpft.errors import ConfigError
from dpft.hf.arguments import PrivacyArguments


def encode_dataset(dataset: Any, tokenizer: Any, privacy: PrivacyArguments, max_length: int) -> EncodedDataset:
    """The dataset's examples and units (record level: one unit per row; user level: per user).

    Raises:
        ConfigError: no dataset, or user-level DP without the user column.
        DataError: invalid records (located by row, never quoted).
    """
    if dataset is None:
        raise ConfigError(["DPTrainer needs a train_dataset"])
    rows = dataset if hasattr(dataset, "column_names") else _as_dataset(dataset)
    columns = set(rows.column_names)
    user = privacy.privacy_unit == "user"
    if user and privacy.user_column not in columns:
        raise ConfigError(
            [f"privacy_unit='user' needs the column '{privacy.user_column}' naming each row's user (user_column)"]
        )
    if "input_ids" in columns:
        return _pretokenized(rows, privacy, max_length)
    if user and privacy.user_column != "user_id":
        rows = rows.map(lambda r: {"user_id": str(r[privacy.user_column])})
    records = read_records(rows)
    return encode_records(records, tokenizer, max_length, privacy.privacy_unit, privacy.loss_on)


def _as_dataset(rows: Any) -> Any:
    from datasets import Dataset

    rows = [dict(r) for r in rows]
    columns = sorted(set().union(*rows)) if rows else []
    return Dataset.from_list([{c: r.get(c) for c in columns} for r in rows])  # absent fields: None, dropped


def _pretokenized(rows: Any, privacy: PrivacyArguments, max_length: int) -> EncodedDataset:
    out = EncodedDataset([], [], [], 0, 0, 0)
    for i, row in enumerate(rows):
        ids = [int(t) for t in row["input_ids"]]
        labels = [int(t) for t in (row["labels"] if row.get("labels") is not None else ids)]
        out.num_truncated += len(ids) > max_length
        ids, labels = ids[:max_length], labels[:max_length]
        if all(label == IGNORE_INDEX for label in labels[1:]):  # position 0 is never a target
            out.num_dropped += 1
            continue
        unit = str(row[privacy.user_column]) if privacy.privacy_unit == "user" else f"row:{i}"
        out.add(unit, Example(ids, labels))
    if not out.examples:
        raise ConfigError([f"train_dataset: no usable example ({out.num_dropped} rows have no target token)"])
    return out
