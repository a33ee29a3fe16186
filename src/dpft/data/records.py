"""Read training records from JSONL, CSV, Parquet or a `datasets.Dataset`, with their positions.

Every record keeps the file and line it came from, so that any problem is reported as
`file:line: field 'x': problem` — and never by quoting the record, whose text is training data.

Three record formats, decided per record by its keys (a file may mix them):
- `prompt` + `completion`: the loss is on the completion (or on every token with loss_on="all");
- `text`: the loss is on every token;
- `messages`: a chat, a list of {role, content}; the loss is on the assistant turns.
Other keys are ignored, except `user_id`, which names the privacy unit for user-level DP.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dpft.errors import DataError

ROLES = ("system", "user", "assistant")
MAX_LISTED_ERRORS = 10
FORMATS = {".jsonl": "jsonl", ".json": "jsonl", ".csv": "csv", ".parquet": "parquet"}
DATASET_PATH = "<dataset>"


@dataclass(frozen=True)
class Record:
    """One validated record.

    Attributes:
        fields: the record's non-null fields (CSV empty cells and nulls are dropped).
        path: the file it came from, or "<dataset>" for a `datasets.Dataset`.
        line: 1-based physical line of the record's start (Parquet, Dataset: row number + 1).
    """

    fields: dict
    path: str
    line: int

    @property
    def kind(self) -> str:
        """The record's format: "messages", "prompt_completion" or "text"."""
        if "messages" in self.fields:
            return "messages"
        return "prompt_completion" if "prompt" in self.fields else "text"

    @property
    def record_id(self) -> str:
        """A stable id, "path:line", used as the privacy unit at record level."""
        return f"{self.path}:{self.line}"


def read_records(source: str | os.PathLike | Any) -> list[Record]:
    """Read and validate every record of a file or a `datasets.Dataset`.

    Args:
        source: a path ending in .jsonl/.json (one JSON object per line), .csv (header row)
            or .parquet, or a `datasets.Dataset`.

    Returns:
        The records, in file order.

    Raises:
        DataError: the file is missing, unreadable or empty, or records are invalid. Up to
            ten problems are located in one message ("... (and N more: ...)").
    """
    if isinstance(source, str | os.PathLike):
        path = str(source)
        raw, problems = _read_file(path)
    else:
        path = DATASET_PATH
        raw, problems = list(_dataset_rows(source)), []
    if not raw and not problems:
        raise DataError(path, None, None, "no records")
    records = []
    for fields, line in raw:
        record_problems = validate_fields(fields)
        problems.extend(DataError(path, line, f, p) for f, p in record_problems)
        if not record_problems:
            records.append(Record(fields, path, line))
    if not problems:
        problems = _user_id_consistency(records)
    if problems:
        raise _combine(problems)
    return records


def count_duplicates(records: list[Record]) -> int:
    """Count records whose training content repeats an earlier record's.

    Content ignores `user_id` and extra keys: the same text under two privacy units is
    protected only as each copy, which the user should know.

    Args:
        records: validated records.

    Returns:
        The number of records that are copies of an earlier one.
    """
    seen: set[str] = set()
    duplicates = 0
    for record in records:
        content = {k: v for k, v in record.fields.items() if k in _CONTENT_KEYS}
        key = json.dumps(content, sort_keys=True, ensure_ascii=False)
        duplicates += key in seen
        seen.add(key)
    return duplicates


_CONTENT_KEYS = ("prompt", "completion", "text", "messages")


def _read_file(path: str) -> tuple[list[tuple[dict, int]], list[DataError]]:
    file = Path(path)
    fmt = FORMATS.get(file.suffix.lower())
    if fmt is None:
        known = ", ".join(FORMATS)
        raise DataError(path, None, None, f"unknown format '{file.suffix}'; use {known}")
    if not file.exists():
        raise DataError(path, None, None, "no such file")
    if not file.is_file():
        raise DataError(path, None, None, "not a regular file")
    if fmt == "parquet":
        return _read_parquet(path), []
    lines = list(_decoded_lines(path))
    return _parse_jsonl(path, lines) if fmt == "jsonl" else _parse_csv(path, lines)


def _decoded_lines(path: str) -> Iterator[tuple[int, str]]:
    """Yield (line number, text) per physical line; bad UTF-8 is reported by line."""
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, start=1):
            if number == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]  # a UTF-8 BOM, as Excel and Notepad write it
            try:
                yield number, raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                problem = f"not valid UTF-8 (byte {exc.start + 1} of the line)"
                raise DataError(path, number, None, problem) from None


def _parse_jsonl(path: str, lines: list[tuple[int, str]]) -> tuple[list, list[DataError]]:
    rows, problems = [], []
    for number, text in lines:
        if not text.strip():
            continue
        try:
            value = json.loads(text)
        except RecursionError:
            problems.append(DataError(path, number, None, "malformed JSON (nested too deeply)"))
            continue
        except json.JSONDecodeError as exc:
            # exc.msg names the syntax problem only; str(exc) could not quote data either,
            # but the column is all the user needs.
            problem = f"malformed JSON ({exc.msg} at column {exc.colno}); one object per line"
            problems.append(DataError(path, number, None, problem))
            continue
        if not isinstance(value, dict):
            kind = _type_name(value)
            problems.append(DataError(path, number, None, f"is a JSON {kind}, not an object"))
            continue
        rows.append((_non_null(value), number))
    return rows, problems


def _parse_csv(path: str, lines: list[tuple[int, str]]) -> tuple[list, list[DataError]]:
    texts = [text for _, text in lines]
    limit = csv.field_size_limit()
    csv.field_size_limit(2**31 - 1)  # huge cells are legitimate training text
    try:
        reader = csv.reader(texts)
        header = next(reader, None)
        rows = []
        start = reader.line_num + 1
        for cells in reader:
            if any(cell.strip() for cell in cells):
                rows.append((_csv_row(path, start, header, cells), start))
            start = reader.line_num + 1
    except csv.Error as exc:
        raise DataError(path, reader.line_num, None, f"malformed CSV ({exc})") from None
    finally:
        csv.field_size_limit(limit)
    return rows, []


def _csv_row(path: str, line: int, header: list[str], cells: list[str]) -> dict:
    if len(cells) != len(header):
        problem = f"has {len(cells)} cells but the header has {len(header)}"
        raise DataError(path, line, None, problem)
    # CSV cannot tell an empty cell from a missing value: treat both as absent.
    return {name: cell for name, cell in zip(header, cells, strict=True) if cell != ""}


def _read_parquet(path: str) -> list[tuple[dict, int]]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as exc:  # pyarrow raises several types for a corrupt or foreign file
        raise DataError(path, None, None, f"not a readable Parquet file ({type(exc).__name__})") from None
    return [(_non_null(row), i + 1) for i, row in enumerate(table.to_pylist())]


def _dataset_rows(dataset: Any) -> Iterator[tuple[dict, int]]:
    import datasets

    if not isinstance(dataset, datasets.Dataset):
        problem = f"expected a path or a datasets.Dataset, got {type(dataset).__name__}"
        if isinstance(dataset, datasets.DatasetDict):
            problem += "; pick a split, e.g. dataset['train']"
        raise DataError(DATASET_PATH, None, None, problem)
    for i, row in enumerate(dataset):
        yield _non_null(row), i + 1


def _non_null(row: dict) -> dict:
    return {key: value for key, value in row.items() if value is not None}


def validate_fields(fields: dict) -> list[tuple[str | None, str]]:
    """Check one record against its format.

    Args:
        fields: the record's non-null fields.

    Returns:
        (field, problem) pairs; empty when the record is valid.
    """
    problems: list[tuple[str | None, str]] = []
    present = [key for key in ("messages", "prompt", "text") if key in fields]
    if "completion" in fields and "prompt" not in fields:
        present.append("completion")
    if not present:
        return [(None, "needs 'prompt' and 'completion', 'text', or 'messages'")]
    if len(present) > 1:
        return [(present[1], f"a record holds one format; this one also has '{present[0]}'")]
    if present[0] == "messages":
        problems += _check_messages(fields["messages"])
    elif present[0] == "text":
        problems += _check_string(fields, "text")
    else:
        problems += _check_string(fields, "prompt") + _check_string(fields, "completion")
    if "user_id" in fields:
        problems += _check_user_id(fields["user_id"])
    return problems


def _check_string(fields: dict, key: str) -> list[tuple[str, str]]:
    if key not in fields:
        return [(key, "missing")]
    value = fields[key]
    if not isinstance(value, str):
        return [(key, f"must be a string, not a {_type_name(value)}")]
    if not value.strip():
        return [(key, "is empty")]
    if not _encodable(value):
        return [(key, "is not valid Unicode text (lone surrogate escape)")]
    return []


def _encodable(text: str) -> bool:
    """JSON may carry lone surrogates (\\ud800) that no tokenizer can encode."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _check_messages(messages: Any) -> list[tuple[str, str]]:
    if not isinstance(messages, list):
        return [("messages", f"must be a list of {{role, content}}, not a {_type_name(messages)}")]
    for i, message in enumerate(messages):
        problem = _check_message(message)
        if problem:  # one problem per conversation is enough to locate it
            return [(f"messages[{i}]{problem[0]}", problem[1])]
    if not any(message["role"] == "assistant" for message in messages):
        return [("messages", "has no assistant turn, so nothing to learn")]
    return []


def _check_message(message: Any) -> tuple[str, str] | None:
    if not isinstance(message, dict):
        return "", f"must be an object with role and content, not a {_type_name(message)}"
    role, content = message.get("role"), message.get("content")
    if role is None:
        return ".role", "missing"
    if role not in ROLES:
        return ".role", "must be one of " + ", ".join(ROLES)
    if content is None:
        return ".content", "missing"
    if not isinstance(content, str):
        return ".content", f"must be a string, not a {_type_name(content)}"
    if role == "assistant" and not content.strip():
        return ".content", "is empty"
    if not _encodable(content):
        return ".content", "is not valid Unicode text (lone surrogate escape)"
    return None


def _check_user_id(user_id: Any) -> list[tuple[str, str]]:
    if isinstance(user_id, bool) or not isinstance(user_id, str | int):
        return [("user_id", f"must be a string or an integer, not a {_type_name(user_id)}")]
    if isinstance(user_id, str) and not user_id.strip():
        return [("user_id", "is empty")]
    return []


def _user_id_consistency(records: list[Record]) -> list[DataError]:
    with_id = [r for r in records if "user_id" in r.fields]
    if not with_id or len(with_id) == len(records):
        return []
    has_first = "user_id" in records[0].fields
    odd = next(r for r in records if ("user_id" in r.fields) != has_first)
    lacking = len(records) - len(with_id)
    state = "missing here" if has_first else "present here"
    problem = (
        f"{state} but not in other records ({lacking} of {len(records)} lack it): the privacy unit would be ambiguous"
    )
    return [DataError(odd.path, odd.line, "user_id", problem)]


def _combine(problems: list[DataError]) -> DataError:
    first = problems[0]
    if len(problems) == 1:
        return first
    listed = ", ".join(_location(p) for p in problems[1:MAX_LISTED_ERRORS])
    unlisted = len(problems) - MAX_LISTED_ERRORS
    tail = ", ..." if unlisted > 0 else ""
    problem = f"{first.problem} (and {len(problems) - 1} more: {listed}{tail})"
    return DataError(first.path, first.line, first.field, problem)


def _location(error: DataError) -> str:
    where = f"line {error.line}" if error.line is not None else error.path
    return f"{where} field '{error.field}'" if error.field else where


def _type_name(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, dict):
        return "object"
    if isinstance(value, list | tuple):
        return "list"
    return "string" if isinstance(value, str) else type(value).__name__
