"""Which DP settings raise utility: DP fine-tunes that differ from the utility benchmark's in one setting.

    python benchmarks/utility.py --output /tmp/utility --epsilons ""         # data + the plain model, once
    python benchmarks/dp_settings.py --base /tmp/utility --quiet --variant base: \
        --variant b128:batch_size=128 --variant b256:batch_size=256 --variant e10:epochs=10 \
        --variant b128e10:batch_size=128,epochs=10 --variant c01:max_grad_norm=0.1 \
        --variant b128c3:batch_size=128,max_grad_norm=3 --variant bc:optimizer=dp-adambc,lr=5e-5 \
        --variant nodp:no_dp=true,epsilon=none --variant b128k4:batch_size=128,max_records_per_user=4

Each `--variant NAME:FIELD=VALUE,...` is the utility benchmark's DP run (`benchmarks/utility.py`'s
defaults: the demo's LoRA, one record per patient, expected batch 64, 5 epochs, lr 1e-2 linear, C = 1)
with those `dpft train` settings changed (any TrainConfig field: batch_size, epochs, max_steps, lr,
lr_schedule, max_grad_norm, optimizer, lora_r, lora_layers, max_records_per_user, no_dp, ...; `none`
and `true`/`false` where the field takes them), trained at `--epsilon` per patient on the base's data
and scored on the base's held-out sample (the one its plain model was scored on), paired with that
plain model. Runs are kept in `<base>/settings/<NAME>` and reused by a re-run; `<base>/settings.json`
collects every variant scored so far with its compute (`unit_draws`: steps × expected batch), and a
markdown table goes to stdout. Each DP run takes about 8 minutes on the 2-core native-bf16 EPYC (bf16);
the results are in docs/dp-utility.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import fields, replace
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import utility
from dpft.atomic_write import write_text_atomic
from dpft.models.device import resolve_device
from dpft.models.precision import describe_hardware, dtype_name, resolve_dtype
from dpft.output_claim import read_jsonl
from dpft.training.config import TrainConfig
from dpft.training.progress import format_duration

DATA_SETTINGS = (
    "model",
    "patients",
    "records_per_patient",
    "seed",
    "delta",
    "lora_layers",
    "micro_batch_size",
    "dtype",
)


def parse_variant(text: str) -> tuple[str, dict[str, Any]]:
    """'b128:batch_size=128,epochs=10' -> ('b128', {'batch_size': 128, 'epochs': 10.0}), typed as TrainConfig."""
    name, _, body = text.partition(":")
    if not name:
        raise SystemExit(f"--variant {text!r}: give NAME:FIELD=VALUE,...")
    types = {f.name: f.type for f in fields(TrainConfig)}
    changes: dict[str, Any] = {}
    for item in filter(None, body.split(",")):
        key, _, value = item.partition("=")
        if key not in types:
            raise SystemExit(f"--variant {name}: {key!r} is not a dpft train setting")
        changes[key] = _typed(value, str(types[key]))
    return name, changes


def _typed(value: str, kind: str) -> Any:
    if value == "none" and "None" in kind:
        return None
    if "bool" in kind:
        return value == "true"
    return int(value) if "int" in kind else float(value) if "float" in kind else value


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base", required=True, help="a finished utility benchmark's --output (data, plain run)")
    p.add_argument("--variant", action="append", default=[], help="NAME:FIELD=VALUE,... (repeatable)")
    p.add_argument("--epsilon", type=float, default=8.0, help="target ε per patient")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    base = Path(args.base).resolve()
    settings = json.loads((base / "benchmark.json").read_text())
    uargs = utility.parse_args(["--output", str(base), "--quiet"] if args.quiet else ["--output", str(base)])
    for key in DATA_SETTINGS:  # the base's data and model; the DP settings are utility.py's defaults
        setattr(uargs, key, settings[key])
    device = resolve_device(uargs.device)
    dtype = resolve_dtype(uargs.dtype, device)
    data = base / "data"
    holdout = read_jsonl(data / "holdout.jsonl")
    # The plain model's evaluation names the held-out sample: every variant is scored on the same records.
    plain_eval = json.loads((base / "runs" / "plain" / "benchmark-utility.json").read_text())
    sample, eval_batch = plain_eval["key"]["sample"], plain_eval["key"]["batch_size"]
    records, plain = [holdout[i] for i in sample], plain_eval["utility"]["per_record"]["full"]
    rows = []
    for name, changes in map(parse_variant, args.variant):
        run = base / "settings" / name
        cfg = replace(utility._config(uargs, data, run, args.epsilon, dtype), **changes)
        start = time.perf_counter()
        privacy, train_s, how = utility._train_or_reuse(cfg, run)
        utility_, _, _ = utility._evaluate_or_reuse(run, records, sample, device, dtype, eval_batch)
        entry = utility._model_entry(run, args.epsilon, privacy, utility_) | {
            "variant": name,
            "changes": changes,
            "batch_size": cfg.batch_size,
            "unit_draws": privacy["steps"] * cfg.batch_size,  # expected patients processed: the compute
            "train_s": round(train_s, 1),
            "train": how,
            "dp_over_plain": utility.paired_ratio(
                utility_["per_record"]["full"], plain, uargs.n_boot, uargs.sample_seed
            ),
        }
        entry.pop("per_record")
        rows.append(entry)
        print(
            f"{name}: {entry['exact_match']['full']:.1%} [{format_duration(time.perf_counter() - start)}]", flush=True
        )
    result = {
        "machine": describe_hardware(device) | {"dtype": dtype_name(dtype)},
        "epsilon": args.epsilon,
        "runs": rows,
    }
    path = base / "settings.json"
    kept = json.loads(path.read_text())["runs"] if path.is_file() else []
    kept = [r for r in kept if r["variant"] not in {r["variant"] for r in rows}] + rows
    write_text_atomic(path, json.dumps(result | {"runs": kept}, indent=1))
    print(table(result | {"runs": kept}))
    return rows


def table(result: dict) -> str:
    m = result["machine"]
    lines = [
        f"CPU {m['cpu']} ({m['capability']}, native bf16 {m['native_bf16']}), {m['threads']} threads, dtype {m['dtype']}; "
        f"ε = {result['epsilon']:g} per patient; DP/plain with a paired bootstrap 95% CI",
        "",
        "| variant | changes | σ | steps | full answer [95% CI] | last name | condition | DP/plain [95% CI] | train |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for x in result["runs"]:
        changes = ", ".join(f"{k}={v}" for k, v in x["changes"].items()) or "—"
        lines.append(
            f"| {x['variant']} | {changes} | {utility._num(x['noise_multiplier'])} | {x['steps']} | {utility.score_cells(x)}"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
