"""`dpft data canaries --like FILE`: canaries in the format of the user's own data.

A canary is a sentence "The access code of <name> is <6 digits>." with a made-up name, written
as the data's records are (the most common format in FILE):
- prompt/completion: prompt "What is the access code of <name>?", completion " The access code
  of <name> is <secret>.";
- text: the sentence alone;
- messages: a user turn asking the question and an assistant turn answering it.
Exposure canaries (Carlini et al. 2019) are inserted 0 (references), 1, 2, 4, 8 or 16 times;
one-run canaries (Steinke, Nasr & Jagielski 2023) once each with probability ½. Secrets, names
and coins come from OS entropy unless a seed is given: whoever knows the seed knows the secrets.

canaries.jsonl rows are what `dpft audit --canaries` reads (`audit/exposure.py`,
`audit/one_run.py`): canary_id, kind, prefix, secret, secret_alphabet, secret_length,
repetitions, included, and the training row under "record". A chat canary's prefix is the
assistant's words before the secret; `audit_prefix` prepends the conversation as the audited
model's chat template renders it.
"""

from __future__ import annotations

import json
import random
import secrets
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from dpft.data.records import read_records
from dpft.errors import ConfigError

SECRET_ALPHABET = "0123456789"
SECRET_LENGTH = 6
FILES = ("canaries.jsonl", "canary-records.jsonl", "train-with-canaries.jsonl", "manifest.json")
_SYLLABLES = [c + v for c in "bdfgklmnprstvz" for v in "aeiou"]


def make_canaries(
    like: str,
    output_dir: str,
    seed: int | None = None,
    canary_repetitions: Sequence[int] = (1, 2, 4, 8, 16),
    canaries_per_repetition: int = 5,
    one_run_canaries: int = 200,
) -> dict:
    """Write canaries shaped like the records of `like` into output_dir.

    Args:
        like: the training file whose format the canaries take (read and validated).
        output_dir: folder for canaries.jsonl (for the audit), canary-records.jsonl (the rows to
            train on), train-with-canaries.jsonl (like's records with the canary rows mixed in)
            and manifest.json.
        seed: None draws from OS entropy (the default: canaries are secrets); an integer makes
            the canaries reproducible, and the manifest says "seeded" (the seed is not written).
        canary_repetitions: insertion counts of exposure canaries (never-inserted references added).
        canaries_per_repetition: exposure canaries per count, references included.
        one_run_canaries: canaries each inserted once with probability ½.

    Returns:
        The manifest (also written as manifest.json).

    Raises:
        ConfigError: an invalid option, named by its flag.
        DataError: `like` cannot be read or holds an invalid record (file:line:field).
    """
    _check(canary_repetitions, canaries_per_repetition, one_run_canaries)
    records = read_records(like)
    kind = Counter(r.kind for r in records).most_common(1)[0][0]
    with_users = "user_id" in records[0].fields
    rng: random.Random = random.Random(seed) if seed is not None else secrets.SystemRandom()
    canaries = _draw(rng, kind, with_users, canary_repetitions, canaries_per_repetition, one_run_canaries)
    rows = [c["record"] for c in canaries for _ in range(c["repetitions"])]
    mixed = [r.fields for r in records]
    for row in rows:  # each canary row at a random place, as if it were one more record
        mixed.insert(rng.randint(0, len(mixed)), row)
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    _write_jsonl(out / "canaries.jsonl", canaries)
    _write_jsonl(out / "canary-records.jsonl", rows)
    _write_jsonl(out / "train-with-canaries.jsonl", mixed)
    manifest = _manifest(like, kind, seed, canaries, len(rows), len(records))
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return manifest


def audit_prefix(tokenizer, canary: dict) -> str:
    """The text before the secret as the model was trained on it (chat: rendered by `tokenizer`)."""
    record = canary.get("record") or {}
    if "messages" not in record:
        return canary["prefix"]
    before = tokenizer.apply_chat_template(record["messages"][:-1], tokenize=False, add_generation_prompt=True)
    return before + canary["prefix"]


def _check(repetitions: Sequence[int], per_repetition: int, one_run: int) -> None:
    problems = []
    if not all(r >= 1 for r in repetitions):
        problems.append("--canary-repetitions values must be at least 1 (references are added)")
    if per_repetition < 0:
        problems.append("--canaries-per-repetition must not be negative")
    if one_run < 0:
        problems.append("--one-run-canaries must not be negative")
    if per_repetition == 0 and one_run == 0:
        problems.append("no canaries asked for: --canaries-per-repetition and --one-run-canaries are both 0")
    if problems:
        raise ConfigError(problems)


def _draw(rng: random.Random, kind: str, with_users: bool, repetitions, per_repetition: int, one_run: int) -> list:
    plan = [("exposure", r) for r in [0, *repetitions] for _ in range(per_repetition)]
    plan += [("one_run", int(rng.random() < 0.5)) for _ in range(one_run)]
    values = rng.sample(range(len(SECRET_ALPHABET) ** SECRET_LENGTH), len(plan))
    names: set[str] = set()
    while len(names) < len(plan):
        names.add(" ".join(_word(rng).capitalize() for _ in range(2)))
    out = []
    for i, ((kind_of, count), value, name) in enumerate(
        zip(plan, values, rng.sample(sorted(names), len(plan)), strict=True)
    ):
        secret = f"{value:0{SECRET_LENGTH}d}"
        prefix, record = _shape(kind, name, secret)
        canary_id = f"{kind_of}-{i:04d}"
        if with_users:
            record["user_id"] = f"dpft-canary-{canary_id}"
        out.append(
            {
                "canary_id": canary_id,
                "kind": kind_of,
                "prefix": prefix,
                "secret": secret,
                "secret_alphabet": SECRET_ALPHABET,
                "secret_length": SECRET_LENGTH,
                "repetitions": count,
                "included": count > 0,
                "record": record,
            }
        )
    return out


def _word(rng: random.Random) -> str:
    return "".join(rng.choice(_SYLLABLES) for _ in range(3))


def _shape(kind: str, name: str, secret: str) -> tuple[str, dict]:
    """(prefix before the secret, training row) of one canary in the data's format."""
    question = f"What is the access code of {name}?"
    answer = f"The access code of {name} is "
    if kind == "prompt_completion":
        return question + " " + answer, {"prompt": question, "completion": f" {answer}{secret}."}
    if kind == "messages":
        turns = [{"role": "user", "content": question}, {"role": "assistant", "content": f"{answer}{secret}."}]
        return answer, {"messages": turns}
    return answer, {"text": f"{answer}{secret}."}


def _manifest(like: str, kind: str, seed: int | None, canaries: list[dict], rows: int, records: int) -> dict:
    exposure = [c for c in canaries if c["kind"] == "exposure"]
    one_run = [c for c in canaries if c["kind"] == "one_run"]
    return {
        "generator": "dpft data canaries",
        "like": Path(like).name,
        "format": kind,
        "randomness": "seeded" if seed is not None else "os-entropy",
        "canaries": {
            "exposure": len(exposure),
            "exposure_references": sum(not c["repetitions"] for c in exposure),
            "repetitions": sorted({c["repetitions"] for c in exposure}),
            "one_run": len(one_run),
            "one_run_included": sum(c["included"] for c in one_run),
            "secret_alphabet": SECRET_ALPHABET,
            "secret_length": SECRET_LENGTH,
        },
        "records": {"like": records, "canary_rows": rows, "mixed": records + rows},
        "files": list(FILES),
    }


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    with open(path, "w", encoding="utf-8", newline="\n") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
