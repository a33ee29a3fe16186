"""The generic audit on non-medical data: a plain vs a DP fine-tune, then `dpft audit` on both.

Customer-support records, each answering with an 8-digit account number (the named secret), split
into members and non-members; canaries shaped like the records are mixed into training. Both models
are audited through `dpft audit` (verbatim and secret extraction, MIA, exposure, one-run bound).

--model tiny: chats, a tiny random Llama fully fine-tuned, the plain one full-batch until it has the
records by heart, the DP one at ε = 8 per record (δ = 1e-4: about 180 records, and δ ≤ 0.1/N).
--model embedded: support tickets as prompt/completion records, SmolLM2-135M-Instruct with the demo's
LoRA (r = 16, all linear layers of the last 15 blocks, loss on every token), plain 3 epochs vs DP
ε = 8 per record (δ = 1e-5), 5 epochs.

    PYTHONPATH=src:tests python benchmarks/generic_audit.py --model tiny --output /tmp/generic-audit   # ~2 min
    python benchmarks/generic_audit.py --model embedded --output /tmp/generic-audit-smollm             # ~10 min, 2 cores
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import dpft
from dpft.audit.api import audit
from dpft.data.canaries import make_canaries

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


def tickets(n: int, rng: random.Random) -> list[dict]:
    """Support tickets: a customer's name and issue in the prompt, their account number in the answer."""
    names = sorted({"".join(rng.choice(SYLLABLES) for _ in range(3)).capitalize() for _ in range(4 * n)})[:n]
    rng.shuffle(names)
    issues = ["cannot log in", "was charged twice", "wants to close the account", "lost the card", "moved house"]
    out = []
    for name in names:
        account = "".join(rng.choice("0123456789") for _ in range(8))
        prompt = f"Ticket from {name} {rng.choice(SYLLABLES).capitalize()}: {rng.choice(issues)}."
        out.append({"prompt": prompt, "completion": f' {{"account": "{account}"}}'})
    return out


def write(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", default="/tmp/generic-audit")
    parser.add_argument("--model", choices=["tiny", "embedded"], default="tiny")
    parser.add_argument("--records", type=int, default=None, help="members, and as many non-members (64 / 400)")
    parser.add_argument("--plain-steps", type=int, default=300, help="tiny only")
    parser.add_argument("--dp-steps", type=int, default=200, help="tiny only")
    args = parser.parse_args()
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    tiny = args.model == "tiny"
    n = args.records or (64 if tiny else 400)
    rows = (chats if tiny else tickets)(2 * n, random.Random(0))
    members = write(out / "members.jsonl", rows[:n])
    holdout = write(out / "holdout.jsonl", rows[n:])
    make_canaries(
        members, str(out / "can"), canary_repetitions=(1, 4, 16), canaries_per_repetition=4, one_run_canaries=64
    )
    data = str(out / "can" / "train-with-canaries.jsonl")
    settings = _tiny_settings(out, data, args) if tiny else _embedded_settings()
    runs = {"plain": out / "plain", "dp": out / "dp"}
    for name, run in runs.items():
        if not (run / "privacy.json").is_file():
            dpft.train(data, str(run), checkpoint_every=0, quiet=True, **settings["common"], **settings[name])
    for name, run in runs.items():
        result = audit(
            members,
            holdout,
            str(out / f"audit-{name}"),
            run=str(run),
            canaries=str(out / "can" / "canaries.jsonl"),
            secret_fields=("account",),
            max_records=None if tiny else 100,
            exposure_candidates=2000 if tiny else 300,
            dtype=settings["common"]["dtype"],
        )
        print(json.dumps({name: summary(result)}))


def _tiny_settings(out: Path, data: str, args: argparse.Namespace) -> dict:
    from helpers import tiny_llama, tiny_tokenizer  # tests/helpers.py: run with PYTHONPATH=src:tests

    model = out / "tiny"
    tiny_llama().save_pretrained(model)
    tiny_tokenizer().save_pretrained(model)
    units = len(Path(data).read_text().splitlines())
    return {
        "common": dict(model=str(model), full=True, max_length=96, micro_batch_size=64, lr=1e-2, dtype="fp32"),
        "plain": dict(no_dp=True, epsilon=None, batch_size=units, max_steps=args.plain_steps),
        "dp": dict(epsilon=8.0, delta=1e-4, batch_size=32, max_steps=args.dp_steps),  # δ ≤ 0.1/N
    }


def _embedded_settings() -> dict:
    common = dict(
        lora_r=16,
        lora_alpha=32,
        lora_targets="all-linear",
        lora_layers=15,
        loss_on="all",
        max_length=96,
        micro_batch_size=32,
        lr_schedule="linear",
        lr=1e-2,
        dtype="auto",
    )
    return {
        "common": common,
        "plain": dict(no_dp=True, epsilon=None, batch_size=16, epochs=3.0),
        "dp": dict(epsilon=8.0, delta=1e-5, batch_size=64, epochs=5.0),
    }


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
