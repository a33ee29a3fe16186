"""Targeted secrets: the user names what is secret, and the audit tries to extract it.

A secret is found in a record's target (`probes.probe_of`: the completion, the text, or the last
assistant turn), first occurrence only:
- `--secret-field NAME`: a key NAME, bare (`NAME: ...`) or in double quotes (`"NAME": ...`),
  then `:` or `=`, then the value: a double-quoted string (the secret is what lies between the
  quotes, escapes as written) or an unquoted run of characters up to a space, `,`, `;`, `}`,
  `]` or `"`. So `{"account": "12345678"}`, `{"account": 12345678}`, `account: "12345678"` and
  `account=12345678` all give the secret `12345678`.
- `--secret-pattern REGEX`: the first match of REGEX (Python syntax); its first group if it has
  groups, else the whole match.

Two attacks, each on members and non-members (whose secrets the model never saw):
- extraction: prompt with the record up to the secret, decode greedily, and count a hit when the
  output contains the secret;
- rank: score the true secret and candidates drawn from the data (the other records' secrets
  under the same name) by log P(candidate | record up to the secret); rank 1 = most likely.
The secrets themselves never appear in the results, only rates and ranks.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from dpft.audit.mia import compare_rates
from dpft.audit.probes import probe_of, tokens
from dpft.audit.scoring import LIGHT_ROWS_FACTOR, greedy_generate, shared_head_logprobs
from dpft.errors import ConfigError

PATTERN_NAME = "pattern"


@dataclass(frozen=True)
class SecretSpec:
    """What the user calls secret: JSON-style field names and/or one regular expression."""

    fields: tuple[str, ...] = ()
    pattern: str | None = None

    def finders(self, field_flag: str = "--secret-field") -> dict[str, re.Pattern]:
        """One compiled finder per secret name; group 1 (or the whole match) is the secret.

        Args:
            field_flag: the option that named the fields, for error messages.

        Raises:
            ConfigError: a field name that is not a plain key, or an invalid regular expression.
        """
        problems, out = [], {}
        for name in self.fields:
            if not re.fullmatch(r"[\w.\- ]+", name):
                problems.append(f"{field_flag} {name!r}: a field name is letters, digits, '_', '-', '.' or spaces")
                continue
            key = re.escape(name)
            value = r'"((?:[^"\\]|\\.)*)"|([^\s,;}\]"]+)'
            out[name] = re.compile(rf'(?:"{key}"|(?<![\w"]){key}(?![\w"]))\s*[:=]\s*(?:{value})')
        if self.pattern is not None:
            try:
                out[PATTERN_NAME] = re.compile(self.pattern)
            except re.error as err:
                problems.append(f"--secret-pattern is not a valid regular expression ({err})")
        if problems:
            raise ConfigError(problems)
        return out


@dataclass(frozen=True)
class Located:
    """A secret inside a record: the trained context, the target text before it, the secret."""

    context: list[int]
    before: str
    secret: str


def find_secret(finder: re.Pattern, target: str) -> tuple[int, str] | None:
    """(start offset, secret) of the first non-empty secret in target, else None."""
    for match in finder.finditer(target):
        groups = [i for i in range(1, (finder.groups or 0) + 1) if match.group(i) is not None]
        index = groups[0] if groups else 0
        if match.group(index):
            return match.start(index), match.group(index)
    return None


def locate(tokenizer, finder: re.Pattern, records: Sequence[dict]) -> list[Located]:
    """Every record's secret under one finder, with where the attacker stands (records without one skipped)."""
    out = []
    for fields in records:
        probe = probe_of(tokenizer, fields)
        found = find_secret(finder, probe.target)
        if found:
            out.append(Located(probe.context, probe.target[: found[0]], found[1]))
    return out


def secret_extraction(
    model,
    tokenizer,
    members: Sequence[dict],
    non_members: Sequence[dict],
    spec: SecretSpec,
    *,
    batch_size: int = 16,
    num_candidates: int = 100,
    seed: int = 0,
    n_boot: int = 200,
) -> dict:
    """Extraction rate and rank of each named secret, members against non-members.

    Args:
        model: a causal LM.
        tokenizer: its tokenizer.
        members: training records (any format).
        non_members: held-out records.
        spec: the secret fields and/or pattern.
        batch_size: sequences per forward pass.
        num_candidates: other records' secrets scored against each true one, at most.
        seed: seed of the candidate draws and bootstraps.
        n_boot: bootstrap resamples.

    Returns:
        {name: {"members", "non_members", "extraction": {...}, "rank": {...} or None}}.

    Raises:
        ConfigError: a bad spec, or a secret found in no member or no non-member record.
    """
    out, problems = {}, []
    for name, finder in spec.finders().items():
        mem, non = locate(tokenizer, finder, members), locate(tokenizer, finder, non_members)
        if not mem or not non:
            flag = "--secret-pattern" if name == PATTERN_NAME else f"--secret-field {name!r}"
            problems.append(
                f"{flag} is found in {len(mem)} of {len(members)} member and {len(non)} of {len(non_members)} "
                "non-member records; it must be in both (see `dpft audit --help` for the syntax)"
            )
            continue
        rng = np.random.default_rng(seed)
        pool = sorted({x.secret for x in [*mem, *non]})
        out[name] = {
            "members": len(mem),
            "non_members": len(non),
            "extraction": _extraction(model, tokenizer, mem, non, batch_size, seed, n_boot),
            "rank": _ranks(model, tokenizer, mem, non, pool, num_candidates, rng, batch_size, seed, n_boot),
        }
    if problems:
        raise ConfigError(problems)
    return out


def _prompt(tokenizer, x: Located) -> tuple[list[int], int]:
    """Prompt ids (context and the target's tokens before the secret, as tokenized with it) and tokens left."""
    full, own = tokens(tokenizer, x.before + x.secret), tokens(tokenizer, x.before)
    shared = _common_prefix(full, own)
    return x.context + full[:shared], len(full) - shared


def _extraction(model, tokenizer, mem, non, batch_size: int, seed: int, n_boot: int) -> dict:
    def hits(located: list[Located]) -> np.ndarray:
        prompts = [_prompt(tokenizer, x) for x in located]
        usable = [(p, n, x) for (p, n), x in zip(prompts, located, strict=True) if p]
        longest = max((n for _, n, _ in usable), default=1) + 2
        texts = greedy_generate(model, tokenizer, [p for p, _, _ in usable], batch_size, longest)
        return np.array([x.secret in t for (_, _, x), t in zip(usable, texts, strict=True)], float)

    a, b = hits(mem), hits(non)
    return compare_rates(a, b, n_boot, seed)


def _ranks(model, tokenizer, mem, non, pool, num_candidates, rng, batch_size, seed, n_boot) -> dict | None:
    if len(pool) < 2:
        return None  # every record holds the same value: nothing to rank against

    def ranks(located: list[Located]) -> np.ndarray:
        out = []
        for x in located:
            others = [s for s in pool if s != x.secret]
            if len(others) > num_candidates:
                others = [others[i] for i in sorted(rng.choice(len(others), num_candidates, replace=False))]
            scores = _candidate_scores(model, tokenizer, x, [x.secret, *others], batch_size)
            if scores is not None:
                out.append(1 + int(np.sum(scores[1:] > scores[0])))
        return np.array(out, float)

    a, b = ranks(mem), ranks(non)
    if not len(a) or not len(b):
        return None
    gap = compare_rates(a, b, n_boot, seed)
    top1 = compare_rates((a == 1).astype(float), (b == 1).astype(float), n_boot, seed)
    return {
        "candidates": min(len(pool) - 1, num_candidates),
        "member_mean_rank": gap["member"],
        "non_member_mean_rank": gap["non_member"],
        "mean_rank_difference": gap["advantage"],  # members minus non-members: negative = members ranked higher
        "mean_rank_difference_ci": gap["advantage_ci"],
        "member_top1": top1["member"],
        "non_member_top1": top1["non_member"],
        "top1_advantage": top1["advantage"],
        "top1_advantage_ci": top1["advantage_ci"],
    }


def _candidate_scores(model, tokenizer, x: Located, candidates: list[str], batch_size: int) -> np.ndarray | None:
    """log P(candidate | record up to the secret), the shared tokens run once; None without context."""
    seqs = [tokens(tokenizer, x.before + c) for c in candidates]
    shared = min(_common_prefix(tokens(tokenizer, x.before), s) for s in seqs)
    head = x.context + seqs[0][:shared]
    if not head:
        return None
    return shared_head_logprobs(model, head, [s[shared:] for s in seqs], batch_size * LIGHT_ROWS_FACTOR)


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n
