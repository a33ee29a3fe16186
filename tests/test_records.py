"""Reading records: each bad input is a DataError located by file:line:field, quoting no text."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dpft.data.records import Record, count_duplicates, read_records
from dpft.errors import DataError

SECRET = "Zyxwvut-secret-9137"  # appears in records; must never appear in an error


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def error_of(source) -> DataError:
    with pytest.raises(DataError) as info:
        read_records(source)
    assert SECRET not in str(info.value)
    return info.value


def good(i: int = 0) -> dict:
    return {"prompt": f"{SECRET} question {i}", "completion": f"{SECRET} answer {i}"}


ROWS = [
    {"prompt": "What is 2+2?", "completion": "4", "user_id": "u1"},
    {"text": "A plain text record, with a comma.", "user_id": "u2"},
    {"prompt": "Name a colour", "completion": "blue", "user_id": "u1"},
]


def test_jsonl_reads_fields_and_physical_lines(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in ROWS[:2]) + "\n\n   \n" + json.dumps(ROWS[2]) + "\n")
    records = read_records(path)
    assert [r.line for r in records] == [1, 2, 5]
    assert [r.fields for r in records] == ROWS
    assert [r.kind for r in records] == ["prompt_completion", "text", "prompt_completion"]
    assert records[2].record_id == f"{path}:5"


def test_csv_parquet_dataset_and_jsonl_agree(tmp_path):
    import datasets

    rows = [{"prompt": "line one\nline two", "completion": "x"}, {"prompt": "p", "completion": "y"}]
    jsonl = read_records(write_jsonl(tmp_path / "d.jsonl", rows))
    csv_path = tmp_path / "d.csv"
    with open(csv_path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=["prompt", "completion"])
        writer.writeheader()
        writer.writerows(rows)
    parquet_path = tmp_path / "d.parquet"
    pq.write_table(pa.Table.from_pylist(rows), parquet_path)
    from_csv = read_records(csv_path)
    from_parquet = read_records(parquet_path)
    from_dataset = read_records(datasets.Dataset.from_list(rows))
    for records in (from_csv, from_parquet, from_dataset):
        assert [r.fields for r in records] == [r.fields for r in jsonl]
    # The CSV record with an embedded newline spans lines 2-3; the next starts on line 4.
    assert [r.line for r in from_csv] == [2, 4]
    assert [r.line for r in from_parquet] == [r.line for r in from_dataset] == [1, 2]
    assert from_dataset[0].path == "<dataset>"


def test_csv_empty_cells_are_absent_and_mixed_formats_work(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("prompt,completion,text\nq,a,\n,,some text\n", encoding="utf-8")
    records = read_records(path)
    assert [r.fields for r in records] == [
        {"prompt": "q", "completion": "a"},
        {"text": "some text"},
    ]


def test_bom_is_accepted_and_huge_lines_are_fine(tmp_path):
    big = "word " * 200_000
    path = tmp_path / "d.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps({"text": big}).encode() + b"\n")
    assert read_records(path)[0].fields["text"] == big
    csv_path = tmp_path / "d.csv"
    csv_path.write_bytes(b"\xef\xbb\xbftext\n" + big.encode() + b"\n")
    assert read_records(csv_path)[0].fields == {"text": big}


def test_messages_records(tmp_path):
    chat = {
        "messages": [
            {"role": "system", "content": ""},
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "hello"},
        ]
    }
    assert read_records(write_jsonl(tmp_path / "c.jsonl", [chat]))[0].kind == "messages"


@pytest.mark.parametrize(
    ("row", "field", "problem"),
    [
        ({"prompt": SECRET, "completion": 42}, "completion", "must be a string, not a number"),
        ({"prompt": SECRET}, "completion", "missing"),
        ({"completion": SECRET}, "prompt", "missing"),
        ({"prompt": "  ", "completion": SECRET}, "prompt", "is empty"),
        ({"text": ""}, "text", "is empty"),
        ({"text": [SECRET]}, "text", "must be a string, not a list"),
        ({"other": SECRET}, None, "needs 'prompt' and 'completion', 'text', or 'messages'"),
        ({"text": SECRET, "prompt": SECRET, "completion": SECRET}, "text", "one format"),
        ({"messages": SECRET}, "messages", "must be a list"),
        ({"messages": [SECRET]}, "messages[0]", "must be an object"),
        ({"messages": [{"content": SECRET}]}, "messages[0].role", "missing"),
        ({"messages": [{"role": "robot", "content": SECRET}]}, "messages[0].role", "one of"),
        ({"messages": [{"role": "user"}]}, "messages[0].content", "missing"),
        ({"messages": [{"role": "user", "content": 3}]}, "messages[0].content", "not a number"),
        (
            {
                "messages": [
                    {"role": "user", "content": SECRET},
                    {"role": "assistant", "content": ""},
                ]
            },
            "messages[1].content",
            "is empty",
        ),
        ({"messages": [{"role": "user", "content": SECRET}]}, "messages", "no assistant turn"),
        ({"text": SECRET, "user_id": 1.5}, "user_id", "must be a string or an integer"),
        ({"text": SECRET, "user_id": True}, "user_id", "not a boolean"),
        ({"text": SECRET, "user_id": " "}, "user_id", "is empty"),
    ],
)
def test_invalid_record_is_located(tmp_path, row, field, problem):
    path = write_jsonl(tmp_path / "d.jsonl", [good(), row])
    error = error_of(path)
    assert (error.path, error.line, error.field) == (str(path), 2, field)
    assert problem in error.problem
    assert str(error).startswith(f"{path}:2: ")


@pytest.mark.parametrize(
    ("content", "line", "problem"),
    [
        ('{"text": "' + SECRET + '"}\n{"text": "' + SECRET + '",}\n', 2, "malformed JSON"),
        ('{"text": "' + SECRET + '"}\n\n["' + SECRET + '"]\n', 3, "is a JSON list, not an object"),
        ('"' + SECRET + '"\n', 1, "is a JSON string"),
        ("[\n", 1, "one object per line"),
    ],
)
def test_malformed_jsonl_is_located(tmp_path, content, line, problem):
    path = tmp_path / "d.json"
    path.write_text(content, encoding="utf-8")
    error = error_of(path)
    assert (error.line, error.field) == (line, None)
    assert problem in error.problem


def test_non_utf8_names_its_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9 ' + SECRET.encode() + b'"}\n')
    error = error_of(path)
    assert (error.line, error.field) == (2, None)
    assert "UTF-8" in error.problem


def test_non_utf8_csv_names_its_line(tmp_path):
    path = tmp_path / "d.csv"
    path.write_bytes(b"text\nfine\n\xff\xfe " + SECRET.encode() + b"\n")
    assert error_of(path).line == 3


@pytest.mark.parametrize(
    ("name", "content", "problem"),
    [
        ("missing.jsonl", None, "no such file"),
        ("d.txt", "x", "unknown format '.txt'"),
        ("empty.jsonl", "", "no records"),
        ("blank.jsonl", "\n  \n\n", "no records"),
        ("empty.csv", "", "no records"),
        ("header.csv", "prompt,completion\n", "no records"),
        ("bad.parquet", SECRET, "not a readable Parquet file"),
    ],
)
def test_file_level_errors(tmp_path, name, content, problem):
    path = tmp_path / name
    if content is not None:
        path.write_text(content, encoding="utf-8")
    error = error_of(path)
    assert (error.path, error.line, error.field) == (str(path), None, None)
    assert problem in error.problem


def test_directory_is_refused(tmp_path):
    (tmp_path / "dir.jsonl").mkdir()
    assert "not a regular file" in error_of(tmp_path / "dir.jsonl").problem


def test_csv_row_with_wrong_cell_count(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text(f"prompt,completion\n{SECRET},a\n{SECRET},b,c\n", encoding="utf-8")
    error = error_of(path)
    assert error.line == 3
    assert "3 cells but the header has 2" in error.problem


def test_parquet_type_error_is_located_by_row(tmp_path):
    path = tmp_path / "d.parquet"
    pq.write_table(pa.Table.from_pylist([{"prompt": SECRET, "completion": 7}] * 2), path)
    error = error_of(path)
    assert (error.line, error.field) == (1, "completion")
    assert "(and 1 more: line 2 field 'completion')" in error.problem


def test_dataset_errors_are_located_by_row():
    import datasets

    rows = [{"text": SECRET}, {"text": ""}]
    error = error_of(datasets.Dataset.from_list(rows))
    assert (error.path, error.line, error.field) == ("<dataset>", 2, "text")


def test_dataset_dict_asks_for_a_split():
    import datasets

    data = datasets.DatasetDict({"train": datasets.Dataset.from_list([{"text": "x"}])})
    assert "pick a split" in error_of(data).problem


def test_many_errors_are_reported_at_once(tmp_path):
    rows = [good(0)] + [{"prompt": SECRET, "completion": i} for i in range(15)]
    error = error_of(write_jsonl(tmp_path / "d.jsonl", rows))
    assert (error.line, error.field) == (2, "completion")
    assert "(and 14 more: line 3 field 'completion', line 4" in error.problem
    assert "line 11 field 'completion', ...)" in error.problem
    assert "line 12" not in error.problem


@pytest.mark.parametrize(("first_has_id", "odd_line", "state"), [(True, 3, "missing here"), (False, 2, "present here")])
def test_user_id_in_some_records_only_is_ambiguous(tmp_path, first_has_id, odd_line, state):
    rows = [good(i) for i in range(4)]
    for i, row in enumerate(rows):
        if (i != odd_line - 1) == first_has_id:
            row["user_id"] = f"user{i}"
    error = error_of(write_jsonl(tmp_path / "d.jsonl", rows))
    assert (error.line, error.field) == (odd_line, "user_id")
    assert state in error.problem and "ambiguous" in error.problem


def test_user_id_may_be_int_or_string(tmp_path):
    rows = [{"text": "a", "user_id": 7}, {"text": "b", "user_id": "seven"}]
    records = read_records(write_jsonl(tmp_path / "d.jsonl", rows))
    assert [r.fields["user_id"] for r in records] == [7, "seven"]


def test_extra_keys_are_kept_but_ignored_and_nulls_dropped(tmp_path):
    rows = [{"text": "a", "source": "wiki", "score": None}]
    assert read_records(write_jsonl(tmp_path / "d.jsonl", rows))[0].fields == {
        "text": "a",
        "source": "wiki",
    }


def test_duplicates_are_allowed_and_counted(tmp_path):
    rows = [good(0), good(1), good(0), {**good(0), "user_id": None, "extra": 1}, {"text": "t"}]
    records = read_records(write_jsonl(tmp_path / "d.jsonl", rows))
    assert len(records) == 5
    assert count_duplicates(records) == 2
    assert count_duplicates([Record({"text": "t"}, "p", 1), Record({"text": "u"}, "p", 2)]) == 0
