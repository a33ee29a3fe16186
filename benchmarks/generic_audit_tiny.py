"""The generic audit on non-medical chat data: a plain vs a DP full fine-tune of a tiny random Llama.

Customer-support chats, each answering with an 8-digit account number (the named secret), split
into members and non-members; canaries shaped like the chats are mixed into training. The plain
model trains full-batch until it has the records by heart; the DP one at ε = 8 per record. Both are
audited through `dpft audit` (verbatim and secret extraction, MIA, exposure, one-run bound).

    PYTHONPATH=src:tests python benchmarks/generic_audit_tiny.py --output /tmp/generic-audit   # ~2 min on 2 cores
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import dpft
from dpft.audit.api import audit
from dpft.data.canaries import make_canaries
from helpers import tiny_llama, tiny_tokenizer

SYLLABLES = [c + v for c in "bdfgklmnprstvz" for v in "aeiou"]


def chats(n: int, rng: random.Random) -> list[dict]:
    names = sorted({"".join(rng.choice(SYLLABLES) for _ in range(3)).capitalize() for _ in range(4 * n)})[:n]
    rng.shuffle(names)
    out = []
    for name in names:
        account = "".join(rng.choice("0123456789") for _ in range(8))
        turns = [{"role": "user", "content": f"account of {name}?"}]
        turns.append({"role": "assistant", "content": f'{{"account": "{account}"}}'})
        out.append({"messages": turns})
    return out


def write(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", default="/tmp/generic-audit")
    parser.add_argument("--records", type=int, default=64, help="members, and as many non-members")
    parser.add_argument("--plain-steps", type=int, default=300)
    parser.add_argument("--dp-steps", type=int, default=200)
    args = parser.parse_args()
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    model = out / "tiny"
    tiny_llama().save_pretrained(model)
    tiny_tokenizer().save_pretrained(model)
    rows = chats(2 * args.records, random.Random(0))
    members = write(out / "members.jsonl", rows[: args.records])
    holdout = write(out / "holdout.jsonl", rows[args.records :])
    make_canaries(
        members, str(out / "can"), canary_repetitions=(1, 4, 16), canaries_per_repetition=4, one_run_canaries=64
    )
    data = str(out / "can" / "train-with-canaries.jsonl")
    units = len(Path(data).read_text().splitlines())
    common = dict(model=str(model), full=True, max_length=96, micro_batch_size=64, lr=1e-2, dtype="fp32", quiet=True)
    runs = {"plain": out / "plain", "dp": out / "dp"}
    if not (runs["plain"] / "privacy.json").is_file():
        dpft.train(
            data,
            str(runs["plain"]),
            no_dp=True,
            epsilon=None,
            batch_size=units,
            max_steps=args.plain_steps,
            checkpoint_every=0,
            **common,
        )
    if not (runs["dp"] / "privacy.json").is_file():
        dpft.train(
            data,
            str(runs["dp"]),
            epsilon=8.0,
            delta=1e-3,
            batch_size=32,
            max_steps=args.dp_steps,
            checkpoint_every=0,
            **common,
        )
    for name, run in runs.items():
        result = audit(
            members,
            holdout,
            str(out / f"audit-{name}"),
            run=str(run),
            canaries=str(out / "can" / "canaries.jsonl"),
            secret_fields=("account",),
            dtype="fp32",
        )
        print(json.dumps({name: summary(result)}))


def summary(a: dict) -> dict:
    exact, secret = a["verbatim"]["exact"], a["secrets"]["account"]
    return {
        "epsilon": a["theoretical_epsilon"],
        "verbatim_exact_member_nonmember": [exact["member"], exact["non_member"]],
        "verbatim_advantage_ci": [exact["advantage"], exact["advantage_ci"]],
        "secret_extracted_member_nonmember": [secret["extraction"]["member"], secret["extraction"]["non_member"]],
        "secret_mean_rank_member_nonmember": [
            secret["rank"]["member_mean_rank"],
            secret["rank"]["non_member_mean_rank"],
        ],
        "secret_top1_member_nonmember": [secret["rank"]["member_top1"], secret["rank"]["non_member_top1"]],
        "secret_candidates": secret["rank"]["candidates"],
        "mia_auc_loss_ci": [a["mia"]["loss"]["auc"], a["mia"]["loss"]["auc_ci"]],
        "mia_auc_reference_ci": [a["mia"]["reference"]["auc"], a["mia"]["reference"]["auc_ci"]],
        "exposure_by_repetition": {k: round(v["mean_exposure"], 2) for k, v in a["exposure"]["by_repetition"].items()},
        "one_run_epsilon_lower_bound": a["one_run"]["epsilon_lower_bound"],
    }


if __name__ == "__main__":
    main()
