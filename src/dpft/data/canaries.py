"""`dpft data canaries --like FILE`: canaries in the format of the user's own data.

Exposure canaries (Carlini et al. 2019) are inserted 0 (references), 1, 2, 4, 8 or 16 times; they
are a sentence "The access code of <name> is <6 digits>." with a made-up name, because exposure
ranks the secret among every possible one. One-run canaries (Steinke, Nasr & Jagielski 2023) are
each inserted once with probability ½, in one of these designs (`--canary-design`):
- `rare-prefix` (the default): a unique prefix of two made-up words ("zuvoka kelipa:"), which
  nothing else in the data resembles, then a secret of SECRET_WORDS words drawn uniformly from
  WORD_LIST (ordinary English words, each one token with its leading space in BPE vocabularies
  such as SmolLM2's, which holds all 825: the secret is four random tokens, unlikely under a model's
  prior). In prompt/completion data the prefix is
  the prompt and the secret alone the completion, so training (`--loss-on completion`, the
  default) puts its loss on the secret only. Short: about ten tokens.
- `random-words`: the exposure sentence with the random-words secret instead of the digits.
- `name-digits`: the exposure sentence itself (dpft's one-run canaries before this option).
"Privacy auditing of large language models" (Panda et al., ICLR 2025), as we read its ideas:
canaries whose secret is made of random or new tokens, unlikely under the model's prior, are
memorised from far fewer insertions than natural-looking ones, and a loss on the secret alone
strengthens the signal. The designs here are that idea within the data's own format and the
tokenizer's existing vocabulary (no new tokens; the data layer has no tokenizer, so ordinary words
stand in for random tokens). `benchmarks/one_run_power.py` compares the designs.

Each one-run canary also gets a role: a random CALIBRATION_FRACTION of them are "calibration"
canaries, on which the audit chooses its score and guess split, and the rest are "audit"
canaries, on which it tests once (`audit/one_run.py`).

Formats (the most common in FILE):
- prompt/completion: prompt "What is the access code of <name>?", completion " The access code
  of <name> is <secret>." (rare-prefix: prompt "<prefix>:", completion " <secret>");
- text: the sentence alone (rare-prefix: "<prefix>: <secret>");
- messages: a user turn asking the question and an assistant turn answering it (rare-prefix: the
  prefix as the user turn, the secret as the assistant's).
Secrets, names, prefixes, coins and roles come from OS entropy unless a seed is given: whoever
knows the seed knows the secrets.

canaries.jsonl rows are what `dpft audit --canaries` reads (`audit/exposure.py`,
`audit/one_run.py`): canary_id, kind, design, prefix, secret, its space (secret_alphabet or
secret_words, and secret_length), repetitions, included, role (one-run canaries), and the
training row under "record". A chat canary's prefix is the assistant's words before the secret;
`audit_prefix` prepends the conversation as the audited model's chat template renders it.
"""

from __future__ import annotations

import json
import random
import re
import secrets
from collections import Counter
from collections.abc import Sequence
from functools import cache
from pathlib import Path

from dpft.data.records import read_records
from dpft.errors import ConfigError

SECRET_ALPHABET = "0123456789"
SECRET_LENGTH = 6
DESIGNS = ("rare-prefix", "random-words", "name-digits")
DEFAULT_DESIGN = "rare-prefix"
ONE_RUN_CANARIES = 1000
CALIBRATION_FRACTION = 0.25
WORD_LIST = "faker-lorem-en_US"  # the name canaries.jsonl gives the secret words' list
SECRET_WORDS = 4  # 825 words: 825^4 ≈ 4.6e11 secrets (38.6 bits; six digits are 19.9)
PREFIX_WORDS = 2
FILES = ("canaries.jsonl", "canary-records.jsonl", "train-with-canaries.jsonl", "manifest.json")
_SYLLABLES = [c + v for c in "bdfgklmnprstvz" for v in "aeiou"]


def make_canaries(
    like: str,
    output_dir: str,
    seed: int | None = None,
    canary_repetitions: Sequence[int] = (1, 2, 4, 8, 16),
    canaries_per_repetition: int = 5,
    one_run_canaries: int = ONE_RUN_CANARIES,
    canary_design: str = DEFAULT_DESIGN,
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
        canary_design: the one-run canaries' design, one of DESIGNS.

    Returns:
        The manifest (also written as manifest.json).

    Raises:
        ConfigError: an invalid option, named by its flag.
        DataError: `like` cannot be read or holds an invalid record (file:line:field).
    """
    check_options(canary_repetitions, canaries_per_repetition, one_run_canaries, canary_design)
    records = read_records(like)
    kind = Counter(r.kind for r in records).most_common(1)[0][0]
    with_users = "user_id" in records[0].fields
    rng: random.Random = random.Random(seed) if seed is not None else secrets.SystemRandom()
    plan = [("exposure", r) for r in [0, *canary_repetitions] for _ in range(canaries_per_repetition)]
    plan += [("one_run", int(rng.random() < 0.5)) for _ in range(one_run_canaries)]
    canaries = _draw(rng, kind, with_users, plan, canary_design)
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


@cache
def secret_words(name: str = WORD_LIST) -> tuple[str, ...] | None:
    """The words of a named secret word list (None for a name this version does not know).

    faker-lorem-en_US: Faker's English lorem words of 4 to 10 lower-case letters (825 in Faker 40),
    ordinary words that common BPE vocabularies hold as one token each (with their leading space).
    """
    if name != WORD_LIST:
        return None
    from faker.providers.lorem.en_US import Provider

    return tuple(sorted({w for w in Provider.word_list if re.fullmatch("[a-z]{4,10}", w)}))


def random_words(rng: random.Random, count: int = SECRET_WORDS) -> str:
    """`count` words drawn uniformly and independently from the secret word list, space-separated."""
    words = secret_words()
    return " ".join(rng.choice(words) for _ in range(count))


def rare_prefix(rng: random.Random, taken: set[str]) -> str:
    """Two made-up words of three syllables each ("zuvoka kelipa"), not in `taken` (added to it):
    rare strings, cut into rare tokens, and unique, so nothing else in the data starts this way."""
    while True:
        opening = " ".join(made_up_word(rng) for _ in range(PREFIX_WORDS))
        if opening not in taken:
            taken.add(opening)
            return opening


def made_up_word(rng: random.Random) -> str:
    return "".join(rng.choice(_SYLLABLES) for _ in range(3))


def secret_space(design: str) -> dict:
    """The canaries.jsonl fields that say where a design's secret was drawn from."""
    if design == "name-digits":
        return {"secret_alphabet": SECRET_ALPHABET, "secret_length": SECRET_LENGTH}
    return {"secret_words": WORD_LIST, "secret_length": SECRET_WORDS}


def draw_secret(rng: random.Random, design: str, taken: set[str]) -> str:
    """A secret of the design not in `taken` (added to it)."""
    while True:
        if design == "name-digits":
            secret = f"{rng.randrange(len(SECRET_ALPHABET) ** SECRET_LENGTH):0{SECRET_LENGTH}d}"
        else:
            secret = random_words(rng)
        if secret not in taken:
            taken.add(secret)
            return secret


def roles(rng: random.Random, count: int) -> list[str]:
    """ "calibration" for a random CALIBRATION_FRACTION of `count` one-run canaries, "audit" for the rest."""
    calibration = set(rng.sample(range(count), round(CALIBRATION_FRACTION * count)))
    return ["calibration" if i in calibration else "audit" for i in range(count)]


def check_options(repetitions: Sequence[int], per_repetition: int, one_run: int, design: str) -> None:
    problems = []
    if not all(r >= 1 for r in repetitions):
        problems.append("--canary-repetitions values must be at least 1 (references are added)")
    if per_repetition < 0:
        problems.append("--canaries-per-repetition must not be negative")
    if one_run < 0:
        problems.append("--one-run-canaries must not be negative")
    if per_repetition == 0 and one_run == 0:
        problems.append("no canaries asked for: --canaries-per-repetition and --one-run-canaries are both 0")
    if design not in DESIGNS:
        problems.append(f"--canary-design must be one of {', '.join(DESIGNS)}, not {design!r}")
    if problems:
        raise ConfigError(problems)


def _draw(rng: random.Random, kind: str, with_users: bool, plan: list[tuple[str, int]], design: str) -> list:
    taken: set[str] = set()
    names: set[str] = set()
    while len(names) < len(plan):
        names.add(" ".join(made_up_word(rng).capitalize() for _ in range(2)))
    one_run_roles = iter(roles(rng, sum(kind_of == "one_run" for kind_of, _ in plan)))
    out = []
    for i, ((kind_of, count), name) in enumerate(zip(plan, rng.sample(sorted(names), len(plan)), strict=True)):
        shape = "name-digits" if kind_of == "exposure" else design
        secret = draw_secret(rng, shape, taken)
        if shape == "rare-prefix":
            opening = rare_prefix(rng, taken)
            prefix, record = _shape_rare(kind, opening, secret)
        else:
            prefix, record = _shape(kind, name, secret)
        canary_id = f"{kind_of}-{i:04d}"
        if with_users:
            record["user_id"] = f"dpft-canary-{canary_id}"
        row = {"canary_id": canary_id, "kind": kind_of, "design": shape, "prefix": prefix, "secret": secret}
        row |= secret_space(shape) | {"repetitions": count, "included": count > 0}
        if kind_of == "one_run":
            row["role"] = next(one_run_roles)
        out.append(row | {"record": record})
    return out


def _shape(kind: str, name: str, secret: str) -> tuple[str, dict]:
    """(prefix before the secret, training row) of one sentence canary in the data's format."""
    question = f"What is the access code of {name}?"
    answer = f"The access code of {name} is "
    if kind == "prompt_completion":
        return question + " " + answer, {"prompt": question, "completion": f" {answer}{secret}."}
    if kind == "messages":
        turns = [{"role": "user", "content": question}, {"role": "assistant", "content": f"{answer}{secret}."}]
        return answer, {"messages": turns}
    return answer, {"text": f"{answer}{secret}."}


def _shape_rare(kind: str, opening: str, secret: str) -> tuple[str, dict]:
    """(prefix before the secret, training row) of a rare-prefix canary: "<opening>: <secret>"."""
    if kind == "prompt_completion":  # the secret alone is the completion: the loss is on it only
        return f"{opening}: ", {"prompt": f"{opening}:", "completion": f" {secret}"}
    if kind == "messages":
        return "", {"messages": [{"role": "user", "content": f"{opening}:"}, {"role": "assistant", "content": secret}]}
    return f"{opening}: ", {"text": f"{opening}: {secret}"}


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
            "one_run_calibration": sum(c["role"] == "calibration" for c in one_run),
            "one_run_design": one_run[0]["design"] if one_run else None,
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
