"""Fuzzed bad input through the real CLI: a one-line error and exit code 2, never a traceback, and
never a run directory presented as complete.

Property-based (hypothesis) over the data file (malformed JSON, wrong types, missing fields,
non-UTF-8 bytes, BOM, huge lines, empty completions, duplicates, NaN) and the numeric flags
(ε ≤ 0, δ ≥ 1, batch > units, NaN/inf, ...), in process with typer's CliRunner, plus a few
real subprocesses. Valid-but-odd files (BOM on line 1, duplicates, CRLF, blank lines, extra keys)
must train; a huge line must train (truncated) or be refused cleanly.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from dpft.cli.main import app

pytestmark = pytest.mark.usefixtures("one_torch_thread")


runner = CliRunner()
MARK = "QZXFUZZ"  # in every generated text: an error message must never echo it
N_UNITS = 12
COUNTS = {"records": 0, "numbers": 0}


@pytest.fixture(scope="module", autouse=True)
def _report_counts():
    yield
    print(f"\nhypothesis examples run: data files {COUNTS['records']}, flag sets {COUNTS['numbers']}")


_text = st.text(alphabet=st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=12).map(
    lambda s: f"{MARK} {s}"
)


def _good(prompt: str, completion: str) -> str:
    return json.dumps({"prompt": prompt, "completion": completion})


# Each bad kind must be refused on its own.
BAD_LINES = {
    "truncated_json": lambda p, c: _good(p, c)[:-3],
    "json_list": lambda p, c: json.dumps([p, c]),
    "json_number": lambda p, c: "42",
    "missing_completion": lambda p, c: json.dumps({"prompt": p}),
    "completion_only": lambda p, c: json.dumps({"completion": c}),
    "int_prompt": lambda p, c: json.dumps({"prompt": 7, "completion": c}),
    "list_completion": lambda p, c: json.dumps({"prompt": p, "completion": [c]}),
    "nan_completion": lambda p, c: '{"prompt": ' + json.dumps(p) + ', "completion": NaN}',
    "empty_completion": lambda p, c: json.dumps({"prompt": p, "completion": "  "}),
    "two_formats": lambda p, c: json.dumps({"prompt": p, "completion": c, "text": p}),
    "bad_messages": lambda p, c: json.dumps({"messages": [{"role": "robot", "content": c}]}),
    "bool_user_id": lambda p, c: json.dumps({"prompt": p, "completion": c, "user_id": True}),
    "bom_mid_file": lambda p, c: "\ufeff" + _good(p, c),
}
GOOD_LINES = {
    "plain": _good,
    "text": lambda p, c: json.dumps({"text": p + c}),
    "chat": lambda p, c: json.dumps(
        {"messages": [{"role": "user", "content": p}, {"role": "assistant", "content": c}]}
    ),
    "extra_keys": lambda p, c: json.dumps({"prompt": p, "completion": c, "source": "x", "n": 1}),
    "non_ascii": lambda p, c: _good(p + " é—ß", c + " ✓"),
}


@st.composite
def data_files(draw) -> tuple[bytes, bool, bool]:
    """(file bytes, must be refused, may be refused)."""
    p, c = draw(_text), draw(_text)
    n_good = draw(st.integers(min_value=2, max_value=6))
    lines = [GOOD_LINES[draw(st.sampled_from(sorted(GOOD_LINES)))](f"{p}{i}", f"{c}{i}") for i in range(n_good)]
    if draw(st.booleans()):
        lines += [lines[0]] * draw(st.integers(1, 3))  # duplicates: legal, counted
    huge = draw(st.sampled_from([False, False, False, True]))
    if huge:  # 200 k characters on one line: truncated to --max-length (or cleanly refused)
        lines.append(_good(p + "a" * 200_000, c))
    # Bad lines go after line 1: a BOM on line 1 is legal, so 'bom_mid_file' must not land there.
    bad = draw(st.sampled_from([None, None, *sorted(BAD_LINES), "non_utf8"]))
    encoded = [line.encode() for line in lines]
    if bad == "non_utf8":
        encoded.insert(draw(st.integers(1, len(encoded))), _good(p, c).encode()[:5] + b"\xff\xfe\x80" + b'"}')
    elif bad is not None:
        encoded.insert(draw(st.integers(1, len(encoded))), BAD_LINES[bad](p, c).encode())
    sep = draw(st.sampled_from([b"\n", b"\r\n", b"\n\n"]))
    blob = sep.join(encoded) + draw(st.sampled_from([b"", b"\n"]))
    if draw(st.booleans()):
        blob = b"\xef\xbb\xbf" + blob  # a BOM on line 1, as Excel writes it: legal
    return blob, bad is not None, huge


def sigma_config(tmp: Path) -> Path:
    cfg = tmp / "sigma.yaml"  # σ given, no target ε (no calibration: fast)
    cfg.write_text(yaml.safe_dump({"epsilon": None, "noise_multiplier": 1.0}))
    return cfg


def check_refused(res, out: Path) -> None:
    """Exit 2, one `dpft: error:` line on stderr, no traceback, no record text, no complete run."""
    assert res.exit_code == 2, (res.exit_code, res.stderr, res.exception)
    errors = [line for line in res.stderr.strip().splitlines() if line.startswith("dpft: error:")]
    assert len(errors) == 1 and "Traceback" not in res.stderr + res.stdout
    assert MARK not in res.stderr + res.stdout  # the message locates, never quotes
    assert not (out / "privacy.json").exists()


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=data_files())
def test_fuzzed_data_files(data, tiny_model_dir):
    blob, must_refuse, may_refuse = data
    COUNTS["records"] += 1
    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        (tmp / "d.jsonl").write_bytes(blob)
        out = tmp / "run"
        args = ["train", "--config", str(sigma_config(tmp)), "--data", str(tmp / "d.jsonl"), "--output", str(out)]
        args += ["--model", tiny_model_dir, "--batch-size", "1", "--max-steps", "1", "--max-length", "96"]
        res = runner.invoke(app, [*args, "--delta", "1e-3", "--checkpoint-every", "0", "--quiet"])
        # Breaks if a bad record slips through (exit 0), crashes (exit 1 + traceback), or a legal
        # file (BOM, duplicates, CRLF, blank lines) is refused.
        if must_refuse or (may_refuse and res.exit_code != 0):
            check_refused(res, out)
        else:
            assert res.exit_code == 0, (res.stderr, res.exception)
            privacy = json.loads((out / "privacy.json").read_text())
            stats = json.loads((out / "private" / "data.json").read_text())
            assert privacy["steps"] == 1 and stats["records"] >= 2


FLOATS = st.one_of(
    st.sampled_from([0.0, -1.0, math.nan, math.inf, -math.inf, 1e-300]), st.floats(-10, 10, allow_nan=False)
)


def _valid(name: str, v) -> bool:
    """The independent spec of each flag (what the fuzzed config must obey)."""
    finite = isinstance(v, int) or math.isfinite(v)
    return {
        "--epsilon": finite and v > 0,
        "--delta": 0 < v <= 0.1 / N_UNITS,  # "well below 1/N"
        "--lr": finite and v > 0,
        "--max-grad-norm": finite and v > 0,
        "--noise-multiplier": finite and v > 0,
        "--batch-size": 0 < v <= N_UNITS,
        "--micro-batch-size": v > 0,
        "--max-length": v > 0,
        "--max-steps": v > 0,
        "--lora-r": v > 0,
        "--checkpoint-every": v >= 0,
    }[name]


INTS = st.integers(-3, 2 * N_UNITS)
FLAG_VALUES = {
    "--epsilon": FLOATS,
    "--delta": st.one_of(FLOATS, st.sampled_from([1.0, 2.0, 1e-3, 0.05])),  # 0.05: below 1/N, above 0.1/N
    "--lr": FLOATS.filter(lambda v: v != math.inf),  # known bug, see test_known_bad_numbers
    "--max-grad-norm": FLOATS,
    "--noise-multiplier": FLOATS,
    "--batch-size": INTS,
    "--micro-batch-size": INTS,
    "--max-length": INTS,
    "--max-steps": INTS,
    "--lora-r": INTS,
    "--checkpoint-every": INTS,
}


@st.composite
def bad_flags(draw) -> dict:
    """A few flags with fuzzed values, at least one of them invalid."""
    names = draw(st.lists(st.sampled_from(sorted(FLAG_VALUES)), min_size=1, max_size=4, unique=True))
    values = {n: draw(FLAG_VALUES[n]) for n in names}
    if all(_valid(n, v) for n, v in values.items()):
        name = draw(st.sampled_from(names))
        values[name] = draw(FLAG_VALUES[name].filter(lambda v: not _valid(name, v)))
    return values


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(flags=bad_flags())
def test_fuzzed_numbers_are_refused_up_front(flags, tiny_model_dir, tmp_path_factory):
    COUNTS["numbers"] += 1
    tmp = tmp_path_factory.mktemp("flags")
    rows = [{"prompt": f"{MARK} {i}", "completion": f" c{i}"} for i in range(N_UNITS)]
    (tmp / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp / "run"
    args = ["train", "--data", str(tmp / "d.jsonl"), "--output", str(out), "--model", tiny_model_dir, "--quiet"]
    args += ["--delta", "1e-3", "--max-steps", "1", "--batch-size", "4"]
    for name, value in flags.items():
        args += [name, repr(value) if isinstance(value, float) else str(value)]
    res = runner.invoke(app, args)
    # Breaks if an invalid number is accepted (exit 0: a run with a meaningless or false ε) or
    # crashes somewhere deep (exit 1, traceback).
    check_refused(res, out)
    # Validation happens before anything is written: no half-created run directory to clean up.
    assert not out.exists()


KNOWN_BAD = [
    # Proposed fix in src/dpft/config.py `_check_numbers`: require finite values
    # (`math.isfinite`) for --lr and --lora-alpha, and `weight_decay >= 0 and isfinite`.
    (["--lr", "inf"], "lr"),
    (["--lora-alpha", "inf"], "lora_alpha"),
    (["--weight-decay", "nan"], "weight_decay"),
]


@pytest.mark.parametrize("flags,_name", KNOWN_BAD, ids=[n for _, n in KNOWN_BAD])
def test_known_bad_numbers(flags, _name, tmp_path, tiny_model_dir):
    rows = [{"prompt": f"p{i}", "completion": f" c{i}"} for i in range(N_UNITS)]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "run"
    args = ["train", "--data", str(tmp_path / "d.jsonl"), "--output", str(out), "--model", tiny_model_dir]
    res = runner.invoke(app, [*args, "--quiet", "--delta", "1e-3", "--max-steps", "1", "--batch-size", "4", *flags])
    check_refused(res, out)


KNOWN_BAD_DATA = {
    # Proposed fix in src/dpft/data/records.py `_parse_jsonl`: catch RecursionError with
    # JSONDecodeError ("nested too deeply").
    "deep_nesting": "[" * 100_000 + "]" * 100_000,
    # Proposed fix in records.py `_check_string`/`_check_message`: refuse strings that do not
    # encode as UTF-8 (lone surrogates): the tokenizer raises a TypeError on them.
    "lone_surrogate": '{"prompt": "a\\ud800", "completion": " b"}',
}


@pytest.mark.parametrize("kind", sorted(KNOWN_BAD_DATA))
def test_known_bad_records(kind, tmp_path, tiny_model_dir):
    good = "".join(_good(f"p{i}", f" c{i}") + "\n" for i in range(4))
    (tmp_path / "d.jsonl").write_text(good + KNOWN_BAD_DATA[kind] + "\n")
    out = tmp_path / "run"
    args = ["train", "--data", str(tmp_path / "d.jsonl"), "--output", str(out), "--model", tiny_model_dir]
    res = runner.invoke(app, [*args, "--quiet", "--delta", "1e-3", "--max-steps", "1", "--batch-size", "1"])
    check_refused(res, out)


@pytest.mark.parametrize(
    "content,flags",
    [
        (b'{"prompt": "QZXFUZZ a", "completion": " b"}\n{"prompt": "QZXFUZZ \xff\xfe"}\n', []),
        (b'{"prompt": "QZXFUZZ a", "completion": " b"}\n' * 4, ["--epsilon", "0"]),
    ],
    ids=["non_utf8", "epsilon_zero"],
)
def test_real_subprocess_errors(content, flags, tmp_path, tiny_model_dir):
    """The real entry point (no CliRunner): stderr is exactly one line, exit code 2."""
    (tmp_path / "d.jsonl").write_bytes(content)
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "dpft.cli.main", "train", "--data", str(tmp_path / "d.jsonl"), "--output", str(out)]
    cmd += ["--model", tiny_model_dir, "--quiet", "--batch-size", "1", *flags]
    res = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=120)
    assert res.returncode == 2, res.stderr
    assert res.stderr.count("\n") == 1 and res.stderr.startswith("dpft: error:"), res.stderr
    assert MARK not in res.stderr + res.stdout and not out.exists()
