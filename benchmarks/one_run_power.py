"""How strong is the one-run ε lower bound, per canary design and score, on a plain and a DP model?

For each one-run canary design (`dpft.data.canaries.DESIGNS`), synthetic medical records with one-run
canaries of that design (`dpft data synth-medical --canary-design`) train a plain model and a DP one
(ε = 8), both through `dpft train`; each model's canaries are scored (`audit.runner.one_run_scores`)
and bounded as `dpft audit` does (`audit.one_run.one_run_audit`: score and guess split chosen on the
calibration canaries, one test on the others). The table gives that bound ("chosen") and, for
comparison, the bound of each score alone (its split still chosen on the calibration canaries; these
per-score rows are several tests, so only "chosen" is a 95% claim).

--model tiny (the default): the tests' random Llama (2 layers, --tiny-width 128) and character
tokenizer, fully fine-tuned (lr 1e-3, expected batch 16) for --epochs 60 passes over 20 patients and 400
canaries per design, plain and DP (ε = 8 per record, δ = 1e-5). A random model needs tens of passes to
memorise anything, so this checks the machinery and the plain/DP contrast, not one insertion's
memorisation by a pretrained model. About 2 min per design (DP training most of it) on 2 busy cores:

    PYTHONPATH=src:tests python benchmarks/one_run_power.py --output /tmp/one-run-power

--model embedded: the demo's setting (`dpft.demo.demo_config`: SmolLM2-135M-Instruct, LoRA r = 16 on
the last 15 blocks, loss on every token; plain 3 epochs at lr 1e-2; DP ε = 8 per patient, 5 epochs of
expected batch 64) on the demo's 400 patients and --canaries one-run canaries of each design:

    python benchmarks/one_run_power.py --model embedded --output /tmp/one-run-power-smollm
    python benchmarks/one_run_power.py --model embedded --designs rare-prefix --patients 100 --no-dp

Measured (issue 14). Tiny, defaults, on a shared 2-core machine: plain 3.68 for every design and
every score, DP (ε = 8) 0.00 for every design; the tiny model memorises after tens of passes, so it
cannot rank the designs. Embedded, defaults (1000 canaries per design, 750 audited), alone on the
2-core native-bf16 EPYC in bf16, 45 min for the three designs (per design: plain 3.2–3.7 min, DP
2.8–3.1 min, scoring with 8 alternatives 2.7–5.6 min per model):

| design | plain: bound (score, guesses in/out, right) | DP, ε = 8 | included − excluded mean loss score (plain / DP, nats) |
|---|---|---|---|
| rare-prefix | **3.47** (loss, 98/0, 98) | 0.00 | 6.05 / 0.17 |
| random-words | 0.44 (loss, 75/0, 53) | 0.00 | 1.14 / 0.57 |
| name-digits | 0.07 (loss, 38/38, 47) | 0.00 | 0.11 / 0.05 |

Only the rare-prefix design is learned from one insertion by the plain model (its canaries' secrets
are 6 nats more likely when trained on), and it refutes ε < 3.47 at 95% from one run; the DP model
gives 0 with every design and score. For every plain model the calibration canaries chose the loss score.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

import dpft
from dpft.audit.one_run import one_run_audit
from dpft.audit.runner import calibration_flags, one_run_scores
from dpft.audit.scoring import ReferenceScores
from dpft.data.canaries import DESIGNS, audit_prefix
from dpft.scenarios.medical.synth import synth_medical


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", default="/tmp/one-run-power")
    parser.add_argument("--model", choices=["tiny", "embedded"], default="tiny")
    parser.add_argument("--designs", default=",".join(DESIGNS), help="comma-separated, from " + ", ".join(DESIGNS))
    parser.add_argument(
        "--canaries", type=int, default=None, help="one-run canaries per design (tiny 400, embedded 1000)"
    )
    parser.add_argument("--patients", type=int, default=None, help="synthetic patients (tiny 20, embedded 400)")
    parser.add_argument("--epochs", type=float, default=60.0, help="tiny only: plain and DP passes over the data")
    parser.add_argument("--tiny-width", type=int, default=128, help="tiny only: hidden size (the tests' is 32)")
    parser.add_argument("--alternatives", type=int, default=8, help="random secrets per canary, 'alternatives' score")
    parser.add_argument("--no-dp", action="store_true", help="train and score the plain model only")
    parser.add_argument("--seed", type=int, default=0, help="data (canaries included) and the audit's draws")
    parser.add_argument("--json-out", default=None, help="default: OUTPUT/one_run_power.json")
    args = parser.parse_args()
    args.canaries = args.canaries or (400 if args.model == "tiny" else 1000)
    designs = [d for d in args.designs.split(",") if d]
    unknown = sorted(set(designs) - set(DESIGNS))
    if unknown:
        parser.error(f"unknown --designs {unknown}; choose from {', '.join(DESIGNS)}")
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    setting = _tiny(out, args) if args.model == "tiny" else _embedded(args)
    results = {"model": args.model, "canaries": args.canaries, "settings": setting["describe"], "designs": {}}
    for design in designs:
        data = out / design / "data"
        synth_medical(
            data,
            patients=setting["patients"],
            seed=args.seed,
            records_per_patient=setting["records_per_patient"],
            canary_repetitions=(),
            canaries_per_repetition=0,
            one_run_canaries=args.canaries,
            canary_design=design,
        )
        canaries = [json.loads(line) for line in (data / "canaries.jsonl").read_text().splitlines()]
        results["designs"][design] = {}
        for name in ("plain",) if args.no_dp else ("plain", "dp"):
            run = out / design / name
            start = time.perf_counter()
            if not (run / "privacy.json").is_file():
                setting["train"](data, run, name == "dp")
            trained = time.perf_counter() - start
            row = _bound(run, setting, canaries, args)
            row["seconds"] = {"train": round(trained, 1), "score": round(time.perf_counter() - start - trained, 1)}
            results["designs"][design][name] = row
            print(json.dumps({design: {name: row}}), flush=True)
    Path(args.json_out or out / "one_run_power.json").write_text(json.dumps(results, indent=2))
    print(_table(results))


def _bound(run: Path, setting: dict, canaries: list[dict], args: argparse.Namespace) -> dict:
    """The audit's bound (score and split chosen on the calibration canaries) and each score's alone."""
    from dpft.models import load_run_model

    model = load_run_model(run)
    tokenizer = model.tokenizer
    canaries = [{**c, "prefix": audit_prefix(tokenizer, c)} for c in canaries]
    scores = one_run_scores(model.model.eval(), setting["reference"], tokenizer, canaries, 32, args.alternatives)
    included = [bool(c["included"]) for c in canaries]
    calibration, _ = calibration_flags(canaries, args.seed)
    privacy = json.loads((run / "privacy.json").read_text())
    delta = privacy.get("delta") or 0.0
    chosen = one_run_audit(scores, included, calibration, delta=delta)
    alone = {k: one_run_audit({k: v}, included, calibration, delta=delta) for k, v in scores.items()}
    return {
        "epsilon": privacy.get("epsilon"),
        "chosen": _brief(chosen),
        "by_score": {k: _brief(v) for k, v in alone.items()},
        "included_score_mean_minus_excluded": {
            k: float(np.mean(v[np.array(included)]) - np.mean(v[~np.array(included)])) for k, v in scores.items()
        },
    }


def _brief(result: dict) -> dict:
    keys = ("epsilon_lower_bound", "score", "k_plus", "k_minus", "correct", "m")
    return {k: result[k] for k in keys} | {"chosen_by": result["calibration"]["chosen_by"]}


def _table(results: dict) -> str:
    scores = sorted({s for d in results["designs"].values() for m in d.values() for s in m["by_score"]})
    lines = [
        f"one-run ε lower bound, 95% ({results['model']}, {results['canaries']} canaries per design)",
        "| design | model (ε) | chosen: bound (score, k+/k-, correct) | " + " | ".join(scores) + " |",
        "|---|---|---|" + "---|" * len(scores),
    ]
    for design, models in results["designs"].items():
        for name, m in models.items():
            c = m["chosen"]
            eps = "∞" if m["epsilon"] is None else f"{m['epsilon']:.2f}"
            chosen = f"{c['epsilon_lower_bound']:.2f} ({c['score']}, {c['k_plus']}/{c['k_minus']}, {c['correct']})"
            alone = " | ".join(
                f"{m['by_score'][s]['epsilon_lower_bound']:.2f}" if s in m["by_score"] else "n/a" for s in scores
            )
            lines.append(f"| {design} | {name} ({eps}) | {chosen} | {alone} |")
    return "\n".join(lines)


def _tiny(out: Path, args: argparse.Namespace) -> dict:
    import torch

    from helpers import tiny_llama, tiny_tokenizer  # tests/helpers.py: run with PYTHONPATH=src:tests

    torch.set_num_threads(1)  # tiny matrices: more threads only add contention
    path = out / "tiny-model"
    tiny_llama(width=args.tiny_width).save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    common = dict(model=str(path), full=True, max_length=96, micro_batch_size=64, lr=1e-3, dtype="fp32")
    common |= dict(checkpoint_every=0, quiet=True, epochs=args.epochs, batch_size=16)

    def train(data: Path, run: Path, dp: bool) -> None:
        privacy = dict(epsilon=8.0, delta=1e-5) if dp else dict(no_dp=True, epsilon=None)
        dpft.train(str(data / "train.jsonl"), str(run), **common, **privacy)

    describe = {k: v for k, v in common.items() if k != "model"} | {"model": "tests/helpers.py tiny_llama"}
    return {
        "patients": args.patients or 20,
        "records_per_patient": (1, 2),
        "train": train,
        "reference": ReferenceScores(tiny_llama(width=args.tiny_width)),
        "describe": describe | {"dp": "ε = 8 per record, δ = 1e-5"},
    }


def _embedded(args: argparse.Namespace) -> dict:
    from dpft.demo import EARLIER_DEMO, DemoOptions, demo_config
    from dpft.models import load_base_model
    from dpft.models.precision import dtype_name, resolve_dtype
    from dpft.training.recipe import train as train_run

    options = DemoOptions(
        **{**EARLIER_DEMO, "patients": args.patients or EARLIER_DEMO["patients"]}, seed=args.seed, quiet=True
    )
    dtype = dtype_name(resolve_dtype(options.dtype))

    def train(data: Path, run: Path, dp: bool) -> None:
        train_run(demo_config(options, data, run, dp, dtype))

    return {
        "patients": options.patients,
        "records_per_patient": options.records_per_patient,
        "train": train,
        "reference": ReferenceScores(load_base_model(options.model).model),
        "describe": {"demo_config": True, "patients": options.patients, "dtype": dtype},
    }


if __name__ == "__main__":
    main()
