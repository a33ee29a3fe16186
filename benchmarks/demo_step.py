"""What one training step of `dpft demo` costs, non-private and DP, on the batch both see.

Runs the recipe itself (`dpft.training.recipe.setup` and `_train_step`) with the demo's model,
data and LoRA setting, so the step timed is the step the demo runs: Poisson-free here, because
every variant takes the same fixed batches of records (the sampler is swapped for a list of
batches; the DP variant is record-level so that its units are the plain run's examples).
Variants are timed interleaved, round r runs every variant on batch r, after one warm-up round:

    plain        --no-dp, frozen-prefix cache (the demo's non-private run)
    dp           DP-SGD, frozen-prefix cache (the demo's DP run, record-level)
    plain-full   --no-dp, every block run every step (before the cache)
    dp-full      DP-SGD, every block run every step

    ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 python benchmarks/demo_step.py   # a few minutes
    python benchmarks/demo_step.py --lora-layers 10 --variants plain,dp --json-out step.json
    python benchmarks/demo_step.py --quick                                             # tiny model, seconds

Reports the median wall and process-CPU seconds per step with their min-max, the DP/plain
ratios, where it ran (`describe_hardware`: CPU, capability, native bf16, threads) and the load
average before and after (another job on the cores shows there first).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from dpft.cli.allocator import keep_freed_memory
from dpft.demo import EARLIER_DEMO, MICRO_BATCH, DemoOptions, demo_config
from dpft.models.precision import describe_hardware
from dpft.scenarios.medical.synth import synth_medical
from dpft.training.recipe import Run, _train_step, setup

VARIANTS = ("plain", "dp", "plain-full", "dp-full")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=32, help="records per logical step (the same for every variant)")
    p.add_argument("--repeats", type=int, default=5, help="timed rounds after one warm-up round")
    p.add_argument("--lora-layers", type=int, default=DemoOptions.lora_layers)
    p.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16"])
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: as the demo runs)")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated subset of {VARIANTS}")
    p.add_argument(
        "--glibc-malloc-defaults",
        action="store_true",
        help="leave glibc's malloc as it is (the CLI keeps freed memory: dpft/cli/allocator.py)",
    )
    p.add_argument("--quick", action="store_true", help="a tiny random Llama and few records: a smoke test")
    p.add_argument("--json-out", default=None)
    return p.parse_args(argv)


class FixedBatches:
    """Stands in for the Poisson sampler: step t gets batch t (a benchmark needs equal batches)."""

    def __init__(self, batches: list[np.ndarray]):
        self.batches = batches

    def sample(self, step: int) -> np.ndarray:
        return self.batches[step % len(self.batches)]


def build(variant: str, args: argparse.Namespace, data: Path, root: Path, model: str) -> Run:
    o = DemoOptions(**EARLIER_DEMO, lora_layers=args.lora_layers, quiet=True)
    cfg = demo_config(o, data, root / variant, dp=variant.startswith("dp"), dtype=args.dtype)
    cfg = replace(cfg, model=model, privacy_unit="record", unsafe_seed=0)
    if args.quick:
        cfg = replace(cfg, lora_layers=1, max_length=32)
    run = setup(cfg)
    if variant.endswith("-full"):
        run.prefix = None
    run.model.train()
    return run


def time_variants(runs: dict[str, Run], batches: list[np.ndarray], repeats: int) -> dict[str, dict]:
    times: dict[str, dict[str, list[float]]] = {v: {"wall": [], "cpu": []} for v in runs}
    for r in range(repeats + 1):
        for variant, run in runs.items():
            run.sampler = FixedBatches(batches)
            wall, cpu = time.perf_counter(), time.process_time()
            _train_step(run, r)
            if r:  # round 0 warms up
                times[variant]["wall"].append(time.perf_counter() - wall)
                times[variant]["cpu"].append(time.process_time() - cpu)
        print(f"  round {r} done", file=sys.stderr, flush=True)
    return {v: _summary(t) for v, t in times.items()}


def _summary(t: dict[str, list[float]]) -> dict:
    return {
        "wall_s": round(statistics.median(t["wall"]), 3),
        "wall_min_max": [round(min(t["wall"]), 3), round(max(t["wall"]), 3)],
        "cpu_s": round(statistics.median(t["cpu"]), 3),
        "walls": [round(x, 3) for x in t["wall"]],
    }


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    kept_freed_memory = False if args.glibc_malloc_defaults else keep_freed_memory()  # as `dpft demo` runs
    if args.threads:
        torch.set_num_threads(args.threads)
    variants = [v for v in args.variants.split(",") if v]
    unknown = set(variants) - set(VARIANTS)
    if unknown:
        raise SystemExit(f"--variants: unknown {sorted(unknown)}; choose from {VARIANTS}")
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        o = DemoOptions(**EARLIER_DEMO)
        synth_medical(
            root / "data",
            patients=40 if args.quick else o.patients,
            seed=o.seed,
            records_per_patient=o.records_per_patient,
            canaries_per_repetition=o.canaries_per_repetition,
            one_run_canaries=o.one_run_canaries,
            canary_design=o.canary_design,
        )
        model = _tiny_model(root) if args.quick else o.model
        runs = {v: build(v, args, root / "data", root, model) for v in variants}
        first = next(iter(runs.values()))
        n = len(first.examples)
        rng = np.random.default_rng(0)  # benchmark batches: public, fixed, the same for every variant
        batches = [np.sort(rng.choice(n, size=min(args.batch, n), replace=False)) for _ in range(args.repeats + 1)]
        tokens = [int(sum(len(first.examples[i].input_ids) for i in b)) for b in batches]
        result = {
            "hardware": describe_hardware(),
            "dtype": first.config.dtype,
            "kept_freed_memory": kept_freed_memory,
            "config": {
                "batch": args.batch,
                "micro_batch": MICRO_BATCH,
                "lora_layers": first.config.lora_layers,
                "repeats": args.repeats,
                "quick": args.quick,
                "tokens_per_batch_mean": round(float(np.mean(tokens)), 1),
            },
            "load_avg_before": [round(x, 2) for x in load_before],
            "variants": time_variants(runs, batches, args.repeats),
        }
    result["load_avg_after"] = [round(x, 2) for x in os.getloadavg()]
    v = result["variants"]
    result["ratios"] = {
        f"{dp}/{plain}": round(v[dp]["wall_s"] / v[plain]["wall_s"], 3)
        for dp, plain in (("dp", "plain"), ("dp-full", "plain-full"), ("plain-full", "plain"), ("dp-full", "dp"))
        if dp in v and plain in v
    }
    _print(result)
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(result, indent=2))
    return result


def tiny_llama(vocab_size: int):
    """A tiny random Llama for --quick: the code paths of SmolLM2's architecture in milliseconds."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=True,
    )
    return LlamaForCausalLM(cfg)


def _tiny_model(root: Path) -> str:
    """tiny_llama saved with the embedded tokenizer."""
    from dpft.models import load_base_model

    tokenizer = load_base_model().tokenizer
    path = root / "tiny"
    tiny_llama(len(tokenizer)).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def _print(result: dict) -> None:
    hw = result["hardware"]
    native = "native bf16" if hw["native_bf16"] else "no native bf16"
    print(
        f"ran on: CPU {hw['cpu']} ({hw['capability']}, {native}), {hw['threads']} threads, dtype {result['dtype']}; "
        f"load {result['load_avg_before'][0]} → {result['load_avg_after'][0]}"
    )
    print("glibc malloc: " + ("freed memory kept (as the CLI)" if result["kept_freed_memory"] else "defaults"))
    c = result["config"]
    print(
        f"batch {c['batch']} records (~{c['tokens_per_batch_mean']:.0f} tokens), LoRA on the last {c['lora_layers']} blocks"
    )
    print(f"{'variant':12s} {'s/step':>8s} {'min-max':>15s} {'cpu s':>8s}")
    for name, x in result["variants"].items():
        lo, hi = x["wall_min_max"]
        print(f"{name:12s} {x['wall_s']:8.3f} {f'{lo:.3f}-{hi:.3f}':>15s} {x['cpu_s']:8.3f}")
    for name, ratio in result["ratios"].items():
        print(f"ratio {name}: {ratio}")


if __name__ == "__main__":
    main()
