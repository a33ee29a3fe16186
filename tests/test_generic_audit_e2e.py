"""The generic audit end to end on non-medical data: a plain tiny fine-tune that memorised its
records gives its planted secrets away; a DP one does not.

The plain model takes 150 full-batch steps to learn its records by heart (~10 s on a quiet 2-core CPU).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from typer.testing import CliRunner

import dpft
from dpft.cli.main import app
from dpft.data.canaries import make_canaries

runner = CliRunner()
NAMES = [
    "Nora",
    "Ivo",
    "Lea",
    "Tom",
    "Ada",
    "Max",
    "Zoe",
    "Kai",
    "Eva",
    "Leo",
    "Mia",
    "Ben",
    "Amy",
    "Dan",
    "Sam",
    "Ira",
]


def chat(name: str, account: str) -> dict:
    turns = [
        {"role": "user", "content": f"account of {name}?"},
        {"role": "assistant", "content": f'{{"account": "{account}"}}'},
    ]
    return {"messages": turns}


def text(name: str, account: str) -> dict:
    return {"text": f"Client {name}: account={account}."}


def write(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def dataset(tmp, shape) -> tuple[str, str, str]:
    """8 member and 8 non-member records with 8-digit secrets, and canaries mixed into training."""
    rng = random.Random(1)
    rows = [shape(n, "".join(rng.choice("0123456789") for _ in range(8))) for n in NAMES]
    members, holdout = write(tmp / "members.jsonl", rows[:8]), write(tmp / "holdout.jsonl", rows[8:])
    make_canaries(
        members, str(tmp / "c"), seed=0, canary_repetitions=(4,), canaries_per_repetition=1, one_run_canaries=6
    )
    return members, holdout, str(tmp / "c")


def train(data: str, out, model: str, dp: bool) -> str:
    common = dict(model=model, full=True, max_length=96, micro_batch_size=32, lr=1e-2, dtype="fp32", quiet=True)
    common["checkpoint_every"] = 0
    if dp:
        dpft.train(data, str(out), epsilon=1.0, delta=1e-3, batch_size=4, max_steps=8, **common)
    else:  # q = 1 and many steps on few records: it learns them by heart
        rows = len(Path(data).read_text().splitlines())
        dpft.train(data, str(out), no_dp=True, epsilon=None, batch_size=rows, max_steps=150, **common)
    return str(out)


def audit(run: str, members: str, holdout: str, canaries: str, out, *secret: str) -> dict:
    args = ["audit", "--run", run, "--members", members, "--non-members", holdout, "--output", str(out)]
    args += ["--canaries", f"{canaries}/canaries.jsonl", "--n-boot", "50", "--exposure-candidates", "300"]
    res = runner.invoke(app, [*args, *secret, "--json"])
    assert res.exit_code == 0, res.output
    return json.loads(res.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def chat_runs(tmp_path_factory, tiny_model_dir):
    tmp = tmp_path_factory.mktemp("chat")
    members, holdout, canaries = dataset(tmp, chat)
    data = f"{canaries}/train-with-canaries.jsonl"
    runs = {name: train(data, tmp / name, tiny_model_dir, dp) for name, dp in (("plain", False), ("dp", True))}
    return tmp, members, holdout, canaries, runs


def test_plain_chat_model_reveals_its_secrets_and_dp_does_not(chat_runs):
    tmp, members, holdout, canaries, runs = chat_runs
    plain = audit(runs["plain"], members, holdout, canaries, tmp / "a-plain", "--secret-field", "account")
    dp = audit(runs["dp"], members, holdout, canaries, tmp / "a-dp", "--secret-field", "account")
    assert plain["verbatim"]["exact"]["member"] == 1.0 and plain["verbatim"]["exact"]["non_member"] == 0.0
    assert plain["exposure"]["num_candidates"] == 300  # --exposure-candidates reaches the scorer
    assert plain["verbatim"]["exact"]["advantage_ci"][0] > 0.5
    account = plain["secrets"]["account"]
    assert account["extraction"]["member"] == 1.0 and account["extraction"]["advantage_ci"][0] > 0.5
    assert account["rank"]["member_top1"] == 1.0 and account["rank"]["non_member_top1"] < 0.5
    assert plain["mia"]["loss"]["auc"] > 0.9
    assert dp["verbatim"]["exact"]["member"] == 0.0 and dp["secrets"]["account"]["extraction"]["member"] == 0.0
    assert dp["secrets"]["account"]["rank"]["top1_advantage_ci"][0] <= 0
    for result in (plain, dp):
        assert result["exposure"]["by_repetition"].keys() == {"0", "4"} and result["one_run"]["m"] == 4
        assert "medical" not in result
    assert dp["theoretical_epsilon"] <= 1.0 and plain["theoretical_epsilon"] is None
    page = (tmp / "a-plain" / "report.html").read_text()
    assert "id='verbatim'" in page and "id='secrets'" in page and "id='generations'" not in page


def test_audit_json_holds_no_training_text(chat_runs):
    tmp, members, *_ = chat_runs
    shipped = (tmp / "a-plain" / "audit.json").read_text() + (tmp / "a-plain" / "report.html").read_text()
    for line in Path(members).read_text().splitlines():
        assert json.loads(line)["messages"][1]["content"] not in shipped
    canaries = [json.loads(line) for line in (tmp / "c" / "canaries.jsonl").read_text().splitlines()]
    one_run = [c for c in canaries if c["kind"] == "one_run"]
    assert one_run and all(c["design"] == "rare-prefix" for c in one_run)
    for c in one_run:  # four random words each: neither the secret nor the made-up opening ships
        assert c["secret"] not in shipped and c["record"]["messages"][0]["content"] not in shipped


def test_text_records_with_a_secret_pattern(tmp_path, tiny_model_dir):
    members, holdout, canaries = dataset(tmp_path, text)
    run = train(f"{canaries}/train-with-canaries.jsonl", tmp_path / "plain", tiny_model_dir, dp=False)
    out = audit(run, members, holdout, canaries, tmp_path / "a", "--secret-pattern", r"account=(\d+)")
    assert out["secrets"]["pattern"]["extraction"]["member"] == 1.0
    assert out["verbatim"]["lcs"]["advantage"] > 0.3 and out["settings"]["members_scored"] == 8
    bad = runner.invoke(
        app,
        [
            "audit",
            "--run",
            run,
            "--members",
            members,
            "--non-members",
            holdout,
            "--output",
            "o",
            "--secret-field",
            "zz",
        ],
    )
    assert bad.exit_code == 2 and "--secret-field 'zz' is found in 0 of 8 member" in bad.stderr
