"""The generic audit's parts on any record format: probes, secrets, verbatim measures, canaries, evaluate."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from dpft.audit.probes import probe_of
from dpft.audit.scoring import encode_as_trained
from dpft.audit.secret_extraction import SecretSpec, find_secret
from dpft.audit.verbatim import similarity, split_for_extraction
from dpft.cli.main import app
from dpft.data import read_records
from dpft.data.canaries import DESIGNS, audit_prefix, make_canaries
from dpft.data.encode import encode_opening
from dpft.errors import ConfigError
from helpers import tiny_tokenizer

runner = CliRunner()
CHAT = {
    "messages": [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "account of Nora?"},
        {"role": "assistant", "content": '{"account": "48213907"}'},
    ]
}
FORMATS = {
    "prompt_completion": {"prompt": "Client Nora:", "completion": ' account: "48213907"'},
    "text": {"text": "Client Nora has account=48213907 and plan gold."},
    "messages": CHAT,
}


def secret(spec: SecretSpec, text: str) -> str | None:
    found = find_secret(next(iter(spec.finders().values())), text)
    return found[1] if found else None


@pytest.mark.parametrize(
    "text",
    [
        '{"account": "12345678", "x": 1}',
        '{"account": 12345678}',
        'account: "12345678"',
        "account=12345678; plan gold",
        '{ "account" :"12345678"}',
    ],
)
def test_secret_field_syntaxes(text):
    assert secret(SecretSpec(("account",)), text) == "12345678"


def test_secret_field_matches_whole_keys_only():
    assert secret(SecretSpec(("account",)), '{"account_id": "1", "myaccount": "2"}') is None
    assert secret(SecretSpec(("account id",)), '{"account id": "7"}') == "7"


def test_secret_pattern_group_or_whole_match():
    assert secret(SecretSpec(pattern=r"code (\d+)"), "the code 4711 opens") == "4711"
    assert secret(SecretSpec(pattern=r"\d{4}"), "the code 4711 opens") == "4711"
    with pytest.raises(ConfigError, match="--secret-pattern"):
        SecretSpec(pattern="(").finders()
    with pytest.raises(ConfigError, match="--field"):
        SecretSpec(("a(b",)).finders("--field")


def test_probes_stand_where_the_target_starts():
    tok = tiny_tokenizer()
    pc = probe_of(tok, FORMATS["prompt_completion"])
    assert pc.context == encode_opening(tok, "Client Nora:") and pc.target == ' account: "48213907"'
    text = probe_of(tok, FORMATS["text"])
    assert text.context == encode_opening(tok, "") and text.target.startswith("Client Nora")
    chat = probe_of(tok, CHAT)
    rendered = tok.apply_chat_template(CHAT["messages"][:-1], tokenize=False, add_generation_prompt=True)
    assert tok.decode(chat.context) == rendered and chat.target == '{"account": "48213907"}'
    ids, _ = encode_as_trained(tok, CHAT)
    assert ids[: len(chat.context)] == chat.context  # the attacker's prompt is the trained sequence's head


def test_text_records_are_split_in_half_for_verbatim_extraction():
    tok = tiny_tokenizer()
    context, target = split_for_extraction(tok, {"text": "abcdefgh"}, max_new_tokens=3)
    assert tok.decode(context) == "abcd" and tok.decode(target) == "efg"


def test_similarity_measures():
    assert similarity("the code is 42 and more", "the code is 42") == {"exact": 1.0, "lcs": 1.0, "token_overlap": 1.0}
    far = similarity("code 42", "the code is 42")
    assert far["exact"] == 0.0 and far["lcs"] == pytest.approx(5 / 14) and far["token_overlap"] == 0.5


def write(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.mark.parametrize("design", DESIGNS)
@pytest.mark.parametrize("kind", list(FORMATS))
def test_canaries_like_each_format(tmp_path, kind, design):
    tok = tiny_tokenizer()
    like = write(tmp_path / "train.jsonl", [{**FORMATS[kind], "user_id": f"u{i}"} for i in range(3)])
    manifest = make_canaries(
        like, str(tmp_path / "c"), canaries_per_repetition=2, one_run_canaries=12, canary_design=design
    )
    assert manifest["format"] == kind and manifest["randomness"] == "os-entropy"
    assert manifest["canaries"]["one_run_design"] == design and manifest["canaries"]["one_run_calibration"] == 3
    canaries = [json.loads(line) for line in (tmp_path / "c" / "canaries.jsonl").read_text().splitlines()]
    rows = read_records(str(tmp_path / "c" / "canary-records.jsonl"))  # valid records, same format
    assert {r.kind for r in rows} == {kind} and all(r.fields["user_id"].startswith("dpft-canary-") for r in rows)
    assert len(rows) == sum(c["repetitions"] for c in canaries) == manifest["records"]["canary_rows"]
    mixed = read_records(str(tmp_path / "c" / "train-with-canaries.jsonl"))
    assert len(mixed) == 3 + len(rows)
    for c in canaries:  # exposure and one-run score prefix + secret: exactly the trained tokens
        trained, _ = encode_as_trained(tok, {k: v for k, v in c["record"].items() if k != "user_id"})
        scored = encode_opening(tok, audit_prefix(tok, c) + c["secret"])
        assert trained[: len(scored)] == scored
        assert c["design"] == (design if c["kind"] == "one_run" else "name-digits")
    assert {c["kind"] for c in canaries} == {"exposure", "one_run"}
    one_run = [c for c in canaries if c["kind"] == "one_run"]
    assert sorted(c["role"] for c in one_run) == ["audit"] * 9 + ["calibration"] * 3
    if design == "rare-prefix":
        assert len({c["record"].get("prompt") or json.dumps(c["record"]) for c in one_run}) == 12
        if kind == "prompt_completion":  # the secret alone is the completion: the loss falls on it only
            assert all(c["record"]["completion"] == " " + c["secret"] for c in one_run)
    if design != "name-digits":
        assert all(len(c["secret"].split(" ")) == c["secret_length"] == 4 for c in one_run)


def test_canary_options_are_checked_and_one_run_defaults_to_a_thousand(tmp_path):
    import inspect

    like = write(tmp_path / "t.jsonl", [FORMATS["text"]])
    with pytest.raises(ConfigError, match="--canary-design"):
        make_canaries(like, str(tmp_path / "o"), canary_design="emoji")
    assert not (tmp_path / "o").exists()
    assert inspect.signature(make_canaries).parameters["one_run_canaries"].default >= 1000
    res = runner.invoke(app, ["data", "canaries", "--like", like, "--output", str(tmp_path / "d"), "--seed", "1"])
    assert res.exit_code == 0, res.output
    manifest = json.loads((tmp_path / "d" / "manifest.json").read_text())
    assert manifest["canaries"]["one_run"] >= 1000 and manifest["canaries"]["one_run_design"] == "rare-prefix"
    args = ["data", "canaries", "--like", like, "--output", str(tmp_path / "e"), "--one-run-canaries", "40"]
    res = runner.invoke(app, [*args, "--canary-design", "name-digits"])
    assert res.exit_code == 0, res.output
    manifest = json.loads((tmp_path / "e" / "manifest.json").read_text())
    assert manifest["canaries"]["one_run"] == 40 and manifest["canaries"]["one_run_design"] == "name-digits"


def test_canaries_are_secret_unless_seeded(tmp_path):
    like = write(tmp_path / "t.jsonl", [FORMATS["text"]])
    secrets = []
    for name, seed in (("a", None), ("b", None), ("c", 7), ("d", 7)):
        make_canaries(like, str(tmp_path / name), seed=seed, canaries_per_repetition=1, one_run_canaries=4)
        secrets.append((tmp_path / name / "canaries.jsonl").read_text())
    assert secrets[0] != secrets[1] and secrets[2] == secrets[3]
    manifest = json.loads((tmp_path / "c" / "manifest.json").read_text())
    assert manifest["randomness"] == "seeded" and "seed" not in manifest  # whoever knows it knows the secrets
    assert "user_id" not in (tmp_path / "a" / "canary-records.jsonl").read_text()  # the data has none


def test_evaluate_on_generic_prompt_completion_data(tmp_path, tiny_model_dir):
    data = write(
        tmp_path / "h.jsonl", [{"prompt": f"Client {i}:", "completion": f' account: "{i:08d}"'} for i in range(4)]
    )
    res = runner.invoke(app, ["evaluate", "--model", tiny_model_dir, "--data", data, "--field", "account", "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert out["records"] == out["answers"] == 4 and out["fields"] == ["account"]
    assert set(out["exact_match"]) == {"full", "account"} and out["loss"] > 0 and out["perplexity"] > 1


def test_bad_input_is_one_line_with_file_line_field(tmp_path, tiny_model_dir):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "a", "completion": 3}\n')
    for args in (
        ["data", "canaries", "--like", str(bad), "--output", str(tmp_path / "o")],
        ["evaluate", "--model", tiny_model_dir, "--data", str(bad)],
        ["audit", "--model", tiny_model_dir, "--members", str(bad), "--non-members", str(bad), "--output", "x"],
    ):
        res = runner.invoke(app, args)
        assert res.exit_code == 2, args
        assert res.stderr.strip() == f"dpft: error: {bad}:2: field 'completion': must be a string, not a number"
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_generic_audit_never_imports_the_medical_scenario():
    code = (
        "import sys, dpft.audit, dpft.audit.api, dpft.audit.runner, dpft.audit.report, dpft.cli.main\n"
        "print(sorted(m for m in sys.modules if m.startswith('dpft.scenarios.medical') or 'synth_medical' in m))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    assert out.stdout.strip() == "[]"
