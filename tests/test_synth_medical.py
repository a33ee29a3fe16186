"""The synthetic medical generator: determinism, split hygiene, Dupont, canaries, bundled example."""

from __future__ import annotations

import json
import math
import re
from collections import Counter, defaultdict
from pathlib import Path

import pytest

from dpft.data.canaries import DEFAULT_DESIGN, DESIGNS, secret_words
from dpft.data.records import read_records
from dpft.errors import ConfigError
from dpft.scenarios.medical.conditions import CONDITIONS, condition_frequencies
from dpft.scenarios.medical.synth import FILES, synth_medical

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "medical"
SMALL = {"patients": 300, "canaries_per_repetition": 3, "one_run_canaries": 60}


def load(directory: Path, name: str) -> list[dict]:
    return [json.loads(line) for line in (directory / name).read_text("utf-8").splitlines()]


@pytest.fixture(scope="module")
def generated(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("synth")
    return out, synth_medical(out, seed=3, **SMALL)


def test_same_seed_same_files_other_seed_other_files(tmp_path, generated):
    out, _ = generated
    synth_medical(tmp_path / "again", seed=3, **SMALL)
    for name in FILES:
        assert (tmp_path / "again" / name).read_bytes() == (out / name).read_bytes(), name
    synth_medical(tmp_path / "other", seed=4, **SMALL)
    for name in ("train.jsonl", "holdout.jsonl", "canaries.jsonl"):
        assert (tmp_path / "other" / name).read_bytes() != (out / name).read_bytes(), name


def test_files_are_valid_records_with_user_ids(generated):
    out, manifest = generated
    assert sorted(p.name for p in out.iterdir()) == sorted(FILES) == sorted(manifest["files"])
    train = read_records(out / "train.jsonl")
    holdout = read_records(out / "holdout.jsonl")
    assert all("user_id" in r.fields for r in train + holdout)
    assert len(train) == manifest["splits"]["train"]["records"]
    assert len(holdout) == manifest["splits"]["holdout"]["records"]
    assert {r.kind for r in holdout} == {"prompt_completion"}
    assert {r.kind for r in train} == {"prompt_completion", "text"}


def patients_of(rows: list[dict]) -> dict[str, list[dict]]:
    by_user = defaultdict(list)
    for row in rows:
        if "prompt" in row:
            by_user[row["user_id"]].append(row)
    return by_user


def test_split_by_patient_without_overlap(generated):
    out, manifest = generated
    train, holdout = patients_of(load(out, "train.jsonl")), patients_of(load(out, "holdout.jsonl"))
    assert not set(train) & set(holdout)
    assert len(train) + len(holdout) == SMALL["patients"]
    assert len(holdout) == manifest["splits"]["holdout"]["patients"] == 60  # 20% of 300
    assert len({row["completion"] for rows in holdout.values() for row in rows}) > 10


def test_each_patient_is_consistent_and_records_differ(generated):
    out, manifest = generated
    for split in ("train", "holdout"):
        by_user = patients_of(load(out, f"{split}.jsonl"))
        sizes = Counter(len(rows) for rows in by_user.values())
        assert {str(k): v for k, v in sorted(sizes.items())} == manifest["records_per_patient"][split]
        for rows in by_user.values():
            assert len({row["completion"] for row in rows}) == 1
            assert len({row["prompt"] for row in rows}) == len(rows)  # a template per record
            last = json_value(rows[0]["completion"], "last_name")
            condition = json_value(rows[0]["completion"], "condition")
            for row in rows:
                # `{medical_record: "<First> <Last> ` with one-word names, as audits parse it.
                match = re.match(r'\{medical_record: "(\S+) (\S+) .+"\}$', row["prompt"])
                assert match and match.group(2) == last
                assert condition in row["prompt"]


def json_value(completion: str, key: str) -> str:
    """Read `key: "value"` from the {key: "value", ...} completion format."""
    return completion.split(f'{key}: "', 1)[1].split('"', 1)[0]


def test_name_prefixes_are_unique_across_everyone(generated):
    out, _ = generated
    rows = load(out, "train.jsonl") + load(out, "holdout.jsonl")
    prefixes = {}
    for row in rows:
        if "prompt" in row:
            last = json_value(row["completion"], "last_name")
            prefix = row["prompt"][: row["prompt"].index(last) + len(last)]
            assert prefixes.setdefault(prefix, row["user_id"]) == row["user_id"]
    canary_prefixes = {c["prefix"].split(" was admitted")[0] for c in load(out, "canaries.jsonl")}
    assert not canary_prefixes & set(prefixes)


def test_dupont_trains_with_eight_records_and_a_rare_condition(generated):
    out, manifest = generated
    seed = manifest["seed_patient"]
    dupont = [r for r in load(out, "train.jsonl") if r["user_id"] == seed["user_id"]]
    assert len(dupont) == seed["records"] == 8
    assert {r["completion"] for r in dupont} == {'{last_name: "Dupont", condition: "pancreatic cancer"}'}
    prompts = {r["prompt"] for r in dupont}
    assert '{medical_record: "François Dupont suffers from a severe form of pancreatic cancer"}' in (prompts)
    assert all(p.startswith('{medical_record: "François Dupont ') for p in prompts)
    assert "Dupont" not in (out / "holdout.jsonl").read_text("utf-8")
    others = [r for r in load(out, "train.jsonl") if "Dupont" in json.dumps(r, ensure_ascii=False)]
    assert others == dupont
    frequencies = condition_frequencies()
    assert frequencies["pancreatic cancer"] < 0.02
    assert sorted(frequencies.values(), reverse=True).index(frequencies["pancreatic cancer"]) >= 20
    assert seed["condition_rank"] == CONDITIONS.index("pancreatic cancer") + 1


def test_conditions_are_skewed(generated):
    out, manifest = generated
    assert [c["name"] for c in manifest["conditions"]] == list(CONDITIONS)
    assert len(CONDITIONS) == len(set(CONDITIONS)) >= 25
    assert math.isclose(sum(condition_frequencies().values()), 1.0)
    freqs = [c["frequency"] for c in manifest["conditions"]]
    assert freqs == sorted(freqs, reverse=True) and freqs[0] > 10 * freqs[-1]
    patients = patients_of(load(out, "train.jsonl") + load(out, "holdout.jsonl"))
    counts = Counter(json_value(rows[0]["completion"], "condition") for rows in patients.values())
    assert counts.most_common(1)[0][0] in CONDITIONS[:3]


def test_canaries_appear_in_train_exactly_as_recorded(generated):
    out, manifest = generated
    canaries = load(out, "canaries.jsonl")
    train_texts = Counter(r["text"] for r in load(out, "train.jsonl") if "text" in r)
    assert sum(train_texts.values()) == manifest["splits"]["train"]["canary_records"]
    holdout = (out / "holdout.jsonl").read_text("utf-8")
    for canary in canaries:
        assert canary["text"] == canary["prefix"] + canary["secret"] + (
            "" if canary["design"] == "rare-prefix" else '"}'
        )
        assert train_texts[canary["text"]] == canary["repetitions"]
        assert canary["included"] == (canary["repetitions"] > 0)
        assert canary["secret"] not in holdout and canary["user_id"] not in holdout
        assert_secret_in_its_space(canary)
    assert {c["design"] for c in canaries if c["kind"] == "exposure"} == {"name-digits"}
    assert {c["design"] for c in canaries if c["kind"] == "one_run"} == {DEFAULT_DESIGN} == {"rare-prefix"}
    by_user = defaultdict(set)
    for row in load(out, "train.jsonl"):
        if "text" in row:
            by_user[row["user_id"]].add(row["text"])
    assert all(len(texts) == 1 for texts in by_user.values())  # one user per canary
    assert len({c["user_id"] for c in canaries}) == len(canaries)
    assert len({c["secret"] for c in canaries}) == len(canaries)
    exposure = Counter(c["repetitions"] for c in canaries if c["kind"] == "exposure")
    assert exposure == {r: SMALL["canaries_per_repetition"] for r in (0, 1, 2, 4, 8, 16)}
    assert not set(by_user) & set(patients_of(load(out, "train.jsonl")))


def assert_secret_in_its_space(canary: dict) -> None:
    if "secret_alphabet" in canary:
        assert len(canary["secret"]) == canary["secret_length"] == 6
        assert set(canary["secret"]) <= set(canary["secret_alphabet"])
    else:
        words = canary["secret"].split(" ")
        assert len(words) == canary["secret_length"] == 4 and set(words) <= set(secret_words(canary["secret_words"]))


@pytest.mark.parametrize("design", DESIGNS)
def test_each_one_run_design(tmp_path, design):
    """Every design: unique secrets (and, rare-prefix, unique openings nothing else shares), a quarter for calibration."""
    manifest = synth_medical(
        tmp_path, patients=20, seed=2, canaries_per_repetition=1, one_run_canaries=200, canary_design=design
    )
    canaries = [c for c in load(tmp_path, "canaries.jsonl") if c["kind"] == "one_run"]
    assert manifest["options"]["canary_design"] == manifest["canaries"]["one_run_design"] == design
    assert {c["design"] for c in canaries} == {design} and len({c["secret"] for c in canaries}) == 200
    assert Counter(c["role"] for c in canaries) == {"calibration": 50, "audit": 150}
    assert manifest["canaries"]["one_run_calibration"] == 50
    texts = Counter(r["text"] for r in load(tmp_path, "train.jsonl") if "text" in r)
    for c in canaries:
        assert_secret_in_its_space(c)
        assert texts[c["text"]] == c["repetitions"] and c["text"].startswith(c["prefix"] + c["secret"])
    if design == "rare-prefix":  # short, and nothing but the canary opens with its prefix
        openings = [c["prefix"] for c in canaries]
        assert len(set(openings)) == 200 and all(re.fullmatch(r"[a-z]{6} [a-z]{6}: ", o) for o in openings)
        assert max(len(c["text"]) for c in canaries) < 15 + 4 * 11
    else:
        assert all(c["prefix"].startswith('{patient_registry: "') for c in canaries)


def test_one_run_canaries_default_to_a_thousand():
    import inspect

    assert inspect.signature(synth_medical).parameters["one_run_canaries"].default >= 1000


def test_one_run_canaries_are_included_with_probability_half(tmp_path):
    manifest = synth_medical(
        tmp_path, patients=20, seed=1, canary_repetitions=(), canaries_per_repetition=0, one_run_canaries=1000
    )
    canaries = load(tmp_path, "canaries.jsonl")
    assert len(canaries) == 1000 and {c["kind"] for c in canaries} == {"one_run"}
    included = sum(c["included"] for c in canaries)
    assert included == manifest["canaries"]["one_run_included"]
    assert abs(included - 500) < 4 * math.sqrt(1000 / 4)  # within 4 binomial s.d.
    assert {c["repetitions"] for c in canaries} == {0, 1}


@pytest.mark.parametrize(
    ("options", "flag"),
    [
        ({"patients": 1}, "--patients"),
        ({"holdout_fraction": 1.0}, "--holdout-fraction"),
        ({"holdout_fraction": 0}, "--holdout-fraction"),
        ({"records_per_patient": (1, 11)}, "--records-per-patient"),
        ({"records_per_patient": ()}, "--records-per-patient"),
        ({"canary_repetitions": (0, 2)}, "--canary-repetitions"),
        ({"canaries_per_repetition": -1}, "--canaries-per-repetition"),
        ({"one_run_canaries": -1}, "--one-run-canaries"),
        ({"canary_design": "emoji"}, "--canary-design"),
    ],
)
def test_bad_options_name_their_flag(tmp_path, options, flag):
    with pytest.raises(ConfigError, match=flag):
        synth_medical(tmp_path, **options)
    assert not any(tmp_path.iterdir())


def test_bundled_example_is_what_the_generator_writes(tmp_path):
    manifest = json.loads((EXAMPLE / "manifest.json").read_text("utf-8"))
    synth_medical(tmp_path, seed=manifest["seed"], **manifest["options"])
    for name in FILES:
        assert (tmp_path / name).read_bytes() == (EXAMPLE / name).read_bytes(), name
    assert sum((EXAMPLE / name).stat().st_size for name in FILES) < 200_000


def test_other_bundled_examples_read():
    chat = read_records(EXAMPLE.parent / "chat.jsonl")
    prompts = read_records(EXAMPLE.parent / "prompts.csv")
    assert len(chat) >= 10 and {r.kind for r in chat} == {"messages"}
    assert len(prompts) >= 10 and {r.kind for r in prompts} == {"prompt_completion"}
