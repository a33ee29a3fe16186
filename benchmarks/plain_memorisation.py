"""How much the demo's plain model memorises: its fine-tune with TrainConfig fields changed, then the
name → condition extraction on every member and non-member patient.

    dpft demo --output /tmp/demo                    # once: the demo's data (and its two runs)
    python benchmarks/plain_memorisation.py --data /tmp/demo/data --output /tmp/mem \\
        --variant base: --variant w16:warmup_steps=16 --variant l8e6:lora_layers=8,epochs=6,warmup_steps=16

Each variant is trained once into `<output>/<NAME>` (reused on a re-run); one JSON line per variant
goes to stdout and `<output>/results.jsonl`. Results: docs/dp-utility.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from dp_settings import parse_variant
from dpft.demo import DemoOptions, demo_config
from dpft.models.embedded import EMBEDDED_NAME
from dpft.models.precision import autocast, resolve_dtype
from dpft.output_claim import read_jsonl


def read_data(data: Path) -> tuple[list[dict], list[dict], list[str]]:
    """Members, non-members and every condition name: read once, shared by every variant."""
    conditions = [c["name"] for c in json.loads((data / "manifest.json").read_text())["conditions"]]
    return read_jsonl(data / "train.jsonl"), read_jsonl(data / "holdout.jsonl"), conditions


def run_variant(data: Path, out: Path, name: str, changes: dict, model: str, dtype: str, records: tuple) -> dict:
    from dpft.models import load_run_model
    from dpft.scenarios.medical import medical_audit
    from dpft.training.recipe import train

    run = out / name
    start = time.perf_counter()
    if not (run / "privacy.json").is_file():
        train(replace(demo_config(DemoOptions(model=model, quiet=True), data, run, False, dtype), **changes))
    train_s = time.perf_counter() - start
    trained = load_run_model(run)
    members, holdout, conditions = records
    with autocast(resolve_dtype(dtype)):
        audit = medical_audit(trained.model, trained.tokenizer, members, holdout, conditions, rank_conditions=False)
    e = audit["extraction"]
    return {
        "variant": name,
        "changes": changes,
        "train_s": round(train_s),
        "members": e["members"],
        "non_members": e["non_members"],
        "member_rate": e["member_rate"],
        "non_member_rate": e["non_member_rate"],
        "advantage": e["advantage"],
        "advantage_ci": e["advantage_ci"],
        "rate_by_records": {k: v["rate"] for k, v in e["by_repetition"].items()},
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True, help="the demo's data folder (train, holdout, manifest)")
    p.add_argument("--output", required=True, help="folder for the runs and results.jsonl")
    p.add_argument("--variant", action="append", required=True, help="NAME:FIELD=VALUE,... (TrainConfig fields)")
    p.add_argument("--model", default=EMBEDDED_NAME, help="the demo's model, or another id or path")
    p.add_argument("--dtype", default="auto", help="compute dtype (auto: bf16 where native)")
    args = p.parse_args()
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    records = read_data(Path(args.data))
    for text in args.variant:
        row = run_variant(Path(args.data), out, *parse_variant(text), args.model, args.dtype, records)
        print(json.dumps(row), flush=True)
        with (out / "results.jsonl").open("a") as f:
            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
