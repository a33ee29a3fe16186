"""DESIGN.md invariant 7: no training text in logs, metrics, checkpoints, reports or error messages.

Records carry unique marker strings in their prompts, completions and user ids (user ids are
identifiers, often emails: treated as text, they must not be written either). A DP run and a
--no-dp run are trained, evaluated and audited through the CLI; then every byte the CLI printed
and every file it wrote (run directories, checkpoints, journal, ledger, audit.json, report.html)
is searched for the markers. The only place generated text may appear is the medical scenario's
explicit `dupont_completion`, absent here (no synth-medical manifest). The audit names the
condition as secret: its extraction and ranks must report rates, never the values.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from dpft.cli.main import app

pytestmark = pytest.mark.usefixtures("one_torch_thread")


runner = CliRunner()
FIRST, LAST, COND, USER = "Zqxfirst4471", "Zqxlast9902", "zqxcond5813", "zqxuser3370"
MARKERS = (FIRST, LAST, COND, USER)


def medical(i: int, cond: str) -> dict:
    last = f"{LAST}{i}"
    return {
        "prompt": f'{{medical_record: "{FIRST} {last} has {cond}."}}',
        "completion": f'{{last_name: "{last}", condition: "{cond}"}}',
        "user_id": f"{USER}{i % 6}@example.org",
    }


def write(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def invoke(args: list[str], transcript: list[str], code: int = 0):
    res = runner.invoke(app, args)
    transcript += [res.stdout, res.stderr]
    assert res.exit_code == code, (res.stdout, res.stderr, res.exception)
    return res


def leaks_in(root: Path) -> list[str]:
    """Every file under root whose bytes contain a marker (binary files included: a pickled
    optimizer or a sqlite ledger could hold text too)."""
    found = []
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        blob = path.read_bytes()
        found += [f"{path.relative_to(root)}: {m}" for m in MARKERS if m.encode() in blob or m.lower().encode() in blob]
    return found


@pytest.fixture
def world(tmp_path, tiny_model_dir, monkeypatch):
    monkeypatch.setenv("DPFT_LEDGER", str(tmp_path / "out" / "ledger.sqlite"))
    conds = [f"{COND}{k}" for k in range(3)]
    data = tmp_path / "data"
    data.mkdir()
    train = write(data / "train.jsonl", [medical(i, conds[i % 3]) for i in range(18)])
    held = write(data / "held.jsonl", [medical(100 + i, conds[i % 3]) for i in range(6)])
    return tmp_path / "out", train, held, tiny_model_dir


def test_no_marker_outside_explicit_generation(world):
    out, train, held, model = world
    said: list[str] = []
    common = ["--data", train, "--model", model, "--batch-size", "4", "--micro-batch-size", "4"]
    common += ["--max-steps", "3", "--max-length", "96", "--delta", "1e-3", "--checkpoint-every", "2"]
    # Not --quiet: the progress line (loss, ε, speed) is a log too.
    invoke(["train", *common, "--output", str(out / "dp"), "--privacy-unit", "user", "--json"], said)
    invoke(["train", *common, "--output", str(out / "nodp"), "--no-dp", "--quiet"], said)
    assert (out / "dp" / "private" / "checkpoints" / "latest").is_file()  # checkpoint metadata is searched too
    invoke(["evaluate", "--run", str(out / "dp"), "--data", held, "--batch-size", "8"], said)
    invoke(["evaluate", "--model", model, "--data", held, "--json"], said)
    audit = ["--members", train, "--non-members", held, "--max-records", "6", "--batch-size", "8"]
    audit += ["--secret-field", "condition", "--n-boot", "20"]
    invoke(["audit", "--run", str(out / "nodp"), *audit, "--output", str(out / "audit-run")], said)
    invoke(["audit", "--model", model, *audit, "--output", str(out / "audit-model"), "--json"], said)
    invoke(["ledger", "show", "--data", train, "--delta", "1e-3", "--json"], said)
    for run in ("dp", "nodp"):
        assert (out / run / "privacy.json").is_file() and (out / run / "model" / "README.md").is_file()
    for folder in ("audit-run", "audit-model"):
        result = json.loads((out / folder / "audit.json").read_text())
        assert "medical" not in result and result["secrets"]["condition"]["members"] == 6
        assert (out / folder / "report.html").is_file()
    assert (out / "ledger.sqlite").is_file()
    # Breaks if any artifact or log line carries record text: e.g. a data summary quoting a record,
    # a checkpoint storing the unit ids, the ledger storing the data path's content, a report
    # listing condition names or patients.
    assert leaks_in(out) == []
    text = "\n".join(said)
    assert [m for m in MARKERS if m in text or m.lower() in text] == []


@pytest.mark.parametrize(
    "bad",
    [
        '{"prompt": "Zqxfirst4471 has", "completion": 5}',
        '{"prompt": "Zqxfirst4471 has", "completion": "x"',
        '{"messages": [{"role": "wizard", "content": "Zqxfirst4471"}]}',
        '{"prompt": "Zqxfirst4471 has", "completion": " x", "user_id": ["zqxuser3370"]}',
    ],
    ids=["wrong_type", "malformed", "bad_role", "bad_user_id"],
)
def test_errors_do_not_echo_the_record(bad, world):
    out, train, _, model = world
    said: list[str] = []
    data = Path(train).with_name("bad.jsonl")
    data.write_text(Path(train).read_text() + bad + "\n")
    args = ["--data", str(data), "--model", model, "--max-steps", "1", "--delta", "1e-3", "--quiet"]
    res = invoke(["train", *args, "--output", str(out / "bad")], said, code=2)
    assert "bad.jsonl:19" in res.stderr  # it locates the record (breaks if the message were vague) ...
    res = invoke(["evaluate", "--model", model, "--data", str(data)], said, code=2)
    assert "bad.jsonl:19" in res.stderr
    # ... and never quotes it (breaks if a message interpolated the record or a field value).
    text = "\n".join(said)
    assert [m for m in MARKERS if m in text or m.lower() in text] == []
    assert not (out / "bad").exists()
