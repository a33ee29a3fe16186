"""`dpft data synth-medical`: the medical scenario's synthetic medical records, with canaries to audit.

Each patient has a name (Faker, five locales; first and last name one word each, so every
prompt starts `{medical_record: "<First> <Last> `), one condition (Zipf-distributed, see
conditions.py) and 1, 2, 4 or 8 records, each from a different free-text template:

    prompt:     {medical_record: "<First> <Last> <sentence mentioning the condition>"}
    completion: {last_name: "<Last>", condition: "<condition>"}

Patients with several records are what a small model memorises (FACTS.md), which is also why
the privacy unit must be the patient: every row carries `user_id`. François Dupont, with a
rare condition (pancreatic cancer) and 8 records, is always a training patient. Patients are
split train/holdout, so members and non-members share one format and an audit can prompt
with `{medical_record: "<First> <Last>` and check whether the true condition follows.

Canaries are `text` records (every token is a target), each with its own user_id. Their opening
differs from the patient records', so the hundreds of canaries do not teach the model to continue
every `{medical_record: "<Name>` prompt with a canary sentence (which would blind the extraction
attack):
- exposure canaries (Carlini et al. 2019), inserted 0 (reference), 1, 2, 4, 8 or 16 times:
  `{patient_registry: "<First> <Last> holds patient ID <6 digits>"}`;
- one-run canaries (Steinke, Nasr & Jagielski 2023), each inserted once with probability ½, in
  the design `canary_design` names (`dpft.data.canaries.DESIGNS`): rare-prefix (the default)
  `<two made-up words>: <four random words>`, about ten tokens; random-words, the exposure
  sentence with four random words as the ID; name-digits, the exposure sentence itself. A random
  quarter of them (`dpft.data.canaries.CALIBRATION_FRACTION`) have the role "calibration": the
  audit chooses its score and guess split on them and tests once on the others.
"""

from __future__ import annotations

import json
import os
import random
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from faker import Faker

from dpft.data.canaries import (
    DEFAULT_DESIGN,
    DESIGNS,
    ONE_RUN_CANARIES,
    draw_secret,
    rare_prefix,
    roles,
    secret_space,
)
from dpft.errors import ConfigError
from dpft.scenarios.medical.conditions import CONDITIONS, condition_frequencies
from dpft.scenarios.medical.records import DUPONT, DUPONT_CONDITION, completion_text, prompt_text

LOCALES = ("fr_FR", "en_US", "de_DE", "es_ES", "it_IT")
TEMPLATES = (
    "{first} {last} suffers from a severe form of {condition}",
    "{first} {last} was diagnosed with {condition} in {year}",
    "{first} {last} is {age} years old and presents with symptoms consistent with {condition}",
    "{first} {last} is being treated for {condition} and attends a follow-up visit",
    "{first} {last} reports a long history of {condition}; current medication was reviewed",
    "{first} {last} was referred to a specialist for {condition}",
    "{first} {last} was admitted to hospital with complications of {condition}",
    "{first} {last} came in for a routine check-up; known {condition}, stable",
    "{first} {last} tested positive for {condition} after further examination",
    "{first} {last} has been followed by the clinic for {condition} since {year}",
)
SEED_PATIENT = (*DUPONT, DUPONT_CONDITION)
SEED_PATIENT_RECORDS = 8
SECRET_ALPHABET = "0123456789"
SECRET_LENGTH = 6
CANARY_SUFFIX = '"}'
FILES = ("train.jsonl", "holdout.jsonl", "canaries.jsonl", "manifest.json")


@dataclass(frozen=True)
class Patient:
    """A synthetic patient: the privacy unit of the medical data set."""

    user_id: str
    first: str
    last: str
    condition: str
    num_records: int


@dataclass(frozen=True)
class Canary:
    """A secret whose extraction measures memorisation; `repetitions` copies are trained on."""

    canary_id: str
    kind: str
    user_id: str
    prefix: str
    secret: str
    repetitions: int
    design: str = "name-digits"
    suffix: str = CANARY_SUFFIX
    role: str | None = None  # one-run canaries: "calibration" or "audit"

    @property
    def text(self) -> str:
        return self.prefix + self.secret + self.suffix


def synth_medical(
    output_dir: str | os.PathLike,
    patients: int = 2000,
    seed: int = 0,
    holdout_fraction: float = 0.2,
    records_per_patient: Sequence[int] = (1, 2, 4, 8),
    canary_repetitions: Sequence[int] = (1, 2, 4, 8, 16),
    canaries_per_repetition: int = 5,
    one_run_canaries: int = ONE_RUN_CANARIES,
    canary_design: str = DEFAULT_DESIGN,
) -> dict:
    """Generate the synthetic medical data set into output_dir.

    Args:
        output_dir: folder to write train.jsonl, holdout.jsonl, canaries.jsonl, manifest.json.
        patients: number of patients, François Dupont included.
        seed: seeds everything; the same seed writes identical files.
        holdout_fraction: share of patients kept out of training (whole patients).
        records_per_patient: each patient's number of records is drawn uniformly from these.
        canary_repetitions: how many times exposure canaries are inserted (plus never-inserted
            reference canaries).
        canaries_per_repetition: exposure canaries per repetition count, references included.
        one_run_canaries: canaries each inserted once with probability ½.
        canary_design: the one-run canaries' design, one of `dpft.data.canaries.DESIGNS`.

    Returns:
        The manifest (also written as manifest.json).

    Raises:
        ConfigError: an invalid option, named by its flag.
    """
    options = {
        "patients": patients,
        "holdout_fraction": holdout_fraction,
        "records_per_patient": list(records_per_patient),
        "canary_repetitions": list(canary_repetitions),
        "canaries_per_repetition": canaries_per_repetition,
        "one_run_canaries": one_run_canaries,
        "canary_design": canary_design,
    }
    _check_options(options)
    rng = random.Random(seed)
    names = _NameSource(seed, rng)
    cohort = _cohort(rng, names, patients, records_per_patient)
    train, holdout = _split(cohort, holdout_fraction)
    canaries = _canaries(rng, names, options, first_index=len(cohort) + 1)
    train_rows = [row for patient in train for row in _patient_rows(rng, patient)]
    train_rows += [{"text": c.text, "user_id": c.user_id} for c in canaries for _ in range(c.repetitions)]
    rng.shuffle(train_rows)  # spread a patient's records and a canary's copies
    holdout_rows = [row for patient in holdout for row in _patient_rows(rng, patient)]
    manifest = _manifest(seed, options, train, holdout, canaries)
    manifest["splits"]["train"]["records"] = len(train_rows)
    manifest["splits"]["holdout"]["records"] = len(holdout_rows)
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    _write_jsonl(out / "train.jsonl", train_rows)
    _write_jsonl(out / "holdout.jsonl", holdout_rows)
    _write_jsonl(out / "canaries.jsonl", [_canary_row(c) for c in canaries])
    text = json.dumps(manifest, indent=2, ensure_ascii=False) + "\n"
    (out / "manifest.json").write_text(text, encoding="utf-8")
    return manifest


def _check_options(options: dict) -> None:
    problems = []
    if options["patients"] < 2:
        problems.append(f"--patients must be at least 2 (one per split), not {options['patients']}")
    if not 0 < options["holdout_fraction"] < 1:
        problems.append("--holdout-fraction must be strictly between 0 and 1")
    counts = options["records_per_patient"]
    if not counts or not all(1 <= k <= len(TEMPLATES) for k in counts):
        problems.append(
            f"--records-per-patient values must be between 1 and {len(TEMPLATES)} (one template per record)"
        )
    if not all(r >= 1 for r in options["canary_repetitions"]):
        problems.append("--canary-repetitions values must be at least 1 (references are added)")
    if options["canaries_per_repetition"] < 0:
        problems.append("--canaries-per-repetition must not be negative")
    if options["one_run_canaries"] < 0:
        problems.append("--one-run-canaries must not be negative")
    if options["canary_design"] not in DESIGNS:
        problems.append(f"--canary-design must be one of {', '.join(DESIGNS)}, not {options['canary_design']!r}")
    if problems:
        raise ConfigError(problems)


class _NameSource:
    """Unique (first, last) names from several seeded Faker locales."""

    def __init__(self, seed: int, rng: random.Random):
        self._rng = rng
        self._fakers = []
        for offset, locale in enumerate(LOCALES):
            faker = Faker(locale)
            faker.seed_instance(seed * len(LOCALES) + offset)
            self._fakers.append(faker)
        # No other Dupont: "Dupont -> pancreatic cancer" must point at one patient only.
        self._taken_last = {SEED_PATIENT[1]}
        self._taken: set[tuple[str, str]] = set()

    def draw(self) -> tuple[str, str]:
        for _ in range(1000):
            faker = self._rng.choice(self._fakers)
            name = (faker.first_name(), faker.last_name())
            if name not in self._taken and name[1] not in self._taken_last and _clean(name):
                self._taken.add(name)
                return name
        raise ConfigError(["--patients is too large: ran out of distinct synthetic names"])


def _clean(name: tuple[str, str]) -> bool:
    # Quotes or braces would break the record's {key: "value"} layout. One word per name lets
    # an audit read `{medical_record: "<First> <Last> ` back from any prompt.
    return all(part.split() == [part] and not set(part) & set('"{}\\') for part in name)


def _cohort(rng: random.Random, names: _NameSource, patients: int, records_per_patient: Sequence[int]) -> list[Patient]:
    weights = list(condition_frequencies().values())
    drawn = [
        (*names.draw(), rng.choices(CONDITIONS, weights)[0], rng.choice(records_per_patient))
        for _ in range(patients - 1)
    ]
    drawn.append((*SEED_PATIENT, SEED_PATIENT_RECORDS))
    rng.shuffle(drawn)
    return [Patient(f"P{i:05d}", *fields) for i, fields in enumerate(drawn, start=1)]


def _split(cohort: list[Patient], holdout_fraction: float) -> tuple[list, list]:
    """Whole patients go to one side; the seed patient always trains. Cohort is shuffled."""
    size = min(max(round(holdout_fraction * len(cohort)), 1), len(cohort) - 1)
    others = [p for p in cohort if (p.first, p.last) != SEED_PATIENT[:2]]
    holdout_ids = {p.user_id for p in others[:size]}
    train = [p for p in cohort if p.user_id not in holdout_ids]
    return train, [p for p in cohort if p.user_id in holdout_ids]


def _patient_rows(rng: random.Random, patient: Patient) -> list[dict]:
    templates = rng.sample(range(len(TEMPLATES)), patient.num_records)
    if (patient.first, patient.last) == SEED_PATIENT[:2] and 0 not in templates:
        templates[0] = 0  # the seed's own sentence: "suffers from a severe form of ..."
    rows = []
    for index in templates:
        sentence = TEMPLATES[index].format(
            first=patient.first,
            last=patient.last,
            condition=patient.condition,
            age=rng.randint(18, 90),
            year=rng.randint(2005, 2023),
        )
        rows.append(
            {
                "prompt": prompt_text(sentence),
                "completion": completion_text(patient.last, patient.condition),
                "user_id": patient.user_id,
            }
        )
    return rows


def _canaries(rng: random.Random, names: _NameSource, options: dict, first_index: int) -> list[Canary]:
    repetitions = [0, *options["canary_repetitions"]]  # 0: never-inserted references
    plan = [("exposure", r) for r in repetitions for _ in range(options["canaries_per_repetition"])]
    # Steinke et al.: independent fair coins decide which one-run canaries are trained on.
    plan += [("one_run", int(rng.random() < 0.5)) for _ in range(options["one_run_canaries"])]
    one_run_roles = iter(roles(rng, options["one_run_canaries"]))
    taken: set[str] = set()
    canaries = []
    for i, (kind, count) in enumerate(plan):
        design = "name-digits" if kind == "exposure" else options["canary_design"]
        secret = draw_secret(rng, design, taken)
        if design == "rare-prefix":
            opening = rare_prefix(rng, taken)
            prefix, suffix = f"{opening}: ", ""
        else:
            first, last = names.draw()
            prefix, suffix = f'{{patient_registry: "{first} {last} holds patient ID ', CANARY_SUFFIX
        canaries.append(
            Canary(
                canary_id=f"{kind}-{i:04d}",
                kind=kind,
                user_id=f"P{first_index + i:05d}",
                prefix=prefix,
                secret=secret,
                repetitions=count,
                design=design,
                suffix=suffix,
                role=next(one_run_roles) if kind == "one_run" else None,
            )
        )
    return canaries


def _canary_row(canary: Canary) -> dict:
    row = {
        "canary_id": canary.canary_id,
        "kind": canary.kind,
        "design": canary.design,
        "user_id": canary.user_id,
        "prefix": canary.prefix,
        "secret": canary.secret,
        "text": canary.text,
        **secret_space(canary.design),
        "repetitions": canary.repetitions,
        "included": canary.repetitions > 0,
    }
    return row | ({"role": canary.role} if canary.role else {})


def _manifest(seed: int, options: dict, train: list[Patient], holdout: list[Patient], canaries: list[Canary]) -> dict:
    frequencies = condition_frequencies()
    dupont = next(p for p in train if (p.first, p.last) == SEED_PATIENT[:2])
    return {
        "generator": "dpft data synth-medical",
        "scenario": "medical",
        "seed": seed,
        "options": options,
        "prompt_format": '{medical_record: "<First> <Last> <free text>"}',
        "completion_format": '{last_name: "<Last>", condition: "<condition>"}',
        "conditions": [
            {"name": name, "rank": rank, "frequency": round(freq, 6)}
            for rank, (name, freq) in enumerate(frequencies.items(), start=1)
        ],
        "splits": {
            "train": {
                "patients": len(train),
                "patient_records": sum(p.num_records for p in train),
                "canary_records": sum(c.repetitions for c in canaries),
            },
            "holdout": {"patients": len(holdout)},
        },
        "records_per_patient": {"train": _histogram(train), "holdout": _histogram(holdout)},
        "seed_patient": {
            "user_id": dupont.user_id,
            "first_name": dupont.first,
            "last_name": dupont.last,
            "condition": dupont.condition,
            "records": dupont.num_records,
            "split": "train",
            "condition_rank": CONDITIONS.index(dupont.condition) + 1,
            "condition_frequency": round(frequencies[dupont.condition], 6),
        },
        "canaries": {
            "exposure": sum(c.kind == "exposure" for c in canaries),
            "exposure_references": sum(c.kind == "exposure" and not c.repetitions for c in canaries),
            "one_run": sum(c.kind == "one_run" for c in canaries),
            "one_run_included": sum(c.kind == "one_run" and c.repetitions > 0 for c in canaries),
            "one_run_calibration": sum(c.role == "calibration" for c in canaries),
            "one_run_design": options["canary_design"],
            "secret_alphabet": SECRET_ALPHABET,
            "secret_length": SECRET_LENGTH,
        },
        "files": list(FILES),
    }


def _histogram(patients: list[Patient]) -> dict[str, int]:
    counts = Counter(p.num_records for p in patients)
    return {str(k): counts[k] for k in sorted(counts)}


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    with open(path, "w", encoding="utf-8", newline="\n") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
