"""Where one training step of `dpft demo` spends its time, fp32, and what the frozen-prefix cache saves.

The demo's setting: embedded SmolLM2-135M, LoRA r=16 on all linear layers of the last 15 of 30
blocks, max_length 96, micro-batch 16, loss on all tokens, the demo's synthetic records. Variants
are timed interleaved (round r runs every variant on micro-batch r) after a warm-up round; medians
of process CPU time (robust when other jobs share the cores) and wall time are reported.

    ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 nice -n 10 \\
        python benchmarks/demo_profile.py --json-out /tmp/demo-profile.json      # a few minutes
    python benchmarks/demo_profile.py --quick                                     # tiny random Llama, seconds

Variants (each: forward, per-example loss, accumulator backward, noise when DP, AdamW step):
    full-legacy    the recipe before this change: full forward, F.cross_entropy loss
    full           full forward, fused example_losses
    cached         PrefixCache.logits (top blocks only) + example_losses
    cached-packed  PrefixCache.losses (top blocks, LM head only where a target is)
Sections: build cost of the cache, a breakdown of the full step (bottom blocks, top blocks, LM head
+ loss, backward, engine clipping, optimizer), the loss alone, and length bucketing.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from demo_step import tiny_llama
from dpft.data import collate, encode_records, read_records
from dpft.demo import EARLIER_DEMO, DemoOptions
from dpft.models.prefix_cache import PrefixCache, frozen_boundary
from dpft.privacy.engine import PerUnitClipper, PlainAccumulator
from dpft.privacy.noise import add_gaussian_noise
from dpft.privacy.randomness import Randomness
from dpft.privacy.sampling import PoissonSampler, PrivacyUnits, micro_batches, sample_rate_for
from dpft.scenarios.medical.synth import synth_medical
from dpft.training.loss import example_losses

VARIANTS = ["full-legacy", "full", "cached", "cached-packed"]


def legacy_example_losses(logits: Tensor, labels: Tensor) -> Tensor:
    """example_losses before the fused cross-entropy (the baseline)."""
    shift_logits, shift_labels = logits[:, :-1].float(), labels[:, 1:]
    nll = F.cross_entropy(shift_logits.flatten(0, 1), shift_labels.flatten(), ignore_index=-100, reduction="none")
    return nll.view(shift_labels.shape).sum(1) / (shift_labels != -100).sum(1).clamp(min=1)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=3, help="timed rounds after one warm-up round")
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    p.add_argument("--micro-batch", type=int, default=16)
    p.add_argument("--max-length", type=int, default=96)
    p.add_argument("--lora-layers", type=int, default=15)
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated subset of {VARIANTS}")
    p.add_argument(
        "--skip", default="", help="comma-separated sections to skip: dp-build,steps,breakdown,loss,bucketing"
    )
    p.add_argument("--quick", action="store_true", help="tiny random Llama (4 blocks, LoRA on 2), few records")
    p.add_argument("--json-out", default=None)
    args = p.parse_args(argv)
    if args.quick:
        args.repeats, args.lora_layers = min(args.repeats, 1), 2
    return args


class Clock:
    """CPU time of this process (all threads) and wall time."""

    def __init__(self):
        self.cpu, self.wall = time.process_time(), time.perf_counter()

    def read(self) -> tuple[float, float]:
        return time.process_time() - self.cpu, time.perf_counter() - self.wall


def med(xs: list[float]) -> float:
    return round(statistics.median(xs), 3) if xs else math.nan


# --- setup -------------------------------------------------------------------------------------------


def demo_data(args: argparse.Namespace, tokenizer, root: Path) -> dict:
    """The demo's training records encoded both ways (record units, and patients capped at 1 record)."""
    o = DemoOptions(**EARLIER_DEMO)
    patients = 40 if args.quick else o.patients
    synth_medical(
        root,
        patients=patients,
        seed=o.seed,
        records_per_patient=o.records_per_patient,
        canaries_per_repetition=o.canaries_per_repetition,
        one_run_canaries=o.one_run_canaries // (10 if args.quick else 1),
        canary_design=o.canary_design,
    )
    records = read_records(str(root / "train.jsonl"))
    plain = encode_records(records, tokenizer, args.max_length, "record", o.loss_on)
    user = encode_records(records, tokenizer, args.max_length, "user", o.loss_on)
    seeded = Randomness.unsafe_seeded(o.seed)  # a benchmark's public, fixed draw
    dp_units = PrivacyUnits(user.unit_examples, user.unit_ids, o.dp_records_per_patient, seeded).unit_examples
    assert [e.input_ids for e in plain.examples] == [e.input_ids for e in user.examples]
    return {"examples": plain.examples, "plain_units": plain.unit_examples, "dp_units": dp_units, "options": o}


def demo_model(args: argparse.Namespace):
    from dpft.models import load_base_model, with_lora

    loaded = load_base_model()  # the embedded SmolLM2-135M-Instruct, fp32
    model, tokenizer = loaded.model, loaded.tokenizer
    if args.quick:
        model = tiny_llama(len(tokenizer))
    model = with_lora(model, r=16, alpha=32, targets="all-linear", last_layers=args.lora_layers)
    model.train()
    return model, tokenizer


# --- one step ---------------------------------------------------------------------------------------


class Step:
    """One logical step on one micro-batch, as training/recipe.py runs it, in a chosen variant."""

    def __init__(self, model: nn.Module, examples, pad_id: int, cache: PrefixCache):
        self.model, self.examples, self.pad_id, self.cache = model, examples, pad_id, cache
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=1e-4)
        self.noise = Randomness.unsafe_seeded(0)

    def losses(self, variant: str, mb: list[int], batch: dict) -> Tensor:
        if variant.startswith("full"):
            logits = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            return (legacy_example_losses if variant == "full-legacy" else example_losses)(logits, batch["labels"])
        if variant == "cached":
            return example_losses(self.cache.logits(self.model, mb, batch["attention_mask"]), batch["labels"])
        return self.cache.losses(self.model, mb, batch)

    def run(self, variant: str, accumulator, micro: list[list[int]], dp: bool) -> None:
        for mb in micro:
            batch = collate([self.examples[i] for i in mb], self.pad_id)
            per_example = self.losses(variant, mb, batch)
            accumulator.backward(per_example, torch.arange(len(mb)))
        sums = list(accumulator.take_sums().values())
        if dp:
            add_gaussian_noise(sums, 1.0, self.noise, 0)
        for p, total in zip(self.params, sums, strict=True):
            p.grad = total.div_(16).to(p.dtype)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)


def accumulator_for(model: nn.Module, dp: bool):
    return PerUnitClipper(model, max_grad_norm=1.0) if dp else PlainAccumulator(model)


def time_steps(args, step: Step, batches: list[list[int]], variants: list[str]) -> dict:
    """Per micro-batch step times, each variant in both modes, interleaved over rounds."""
    out: dict[str, dict[str, list[float]]] = {
        f"{v}/{m}": {"cpu": [], "wall": []} for v in variants for m in ("np", "dp")
    }
    for r in range(args.repeats + 1):
        mb = batches[r % len(batches)]
        for dp in (False, True):
            accumulator = accumulator_for(step.model, dp)
            try:
                for v in variants:
                    clock = Clock()
                    step.run(v, accumulator, [mb], dp)
                    cpu, wall = clock.read()
                    if r > 0:  # round 0 warms up
                        out[f"{v}/{'dp' if dp else 'np'}"]["cpu"].append(cpu)
                        out[f"{v}/{'dp' if dp else 'np'}"]["wall"].append(wall)
            finally:
                accumulator.remove()
        print(f"  round {r}: width {max(len(step.examples[i].input_ids) for i in mb)}", file=sys.stderr)
    return {k: {"cpu_s": med(v["cpu"]), "wall_s": med(v["wall"])} for k, v in out.items()}


# --- breakdown ---------------------------------------------------------------------------------------


def breakdown(args, step: Step, batches: list[list[int]], boundary: int) -> dict:
    """Forward split by hooks (bottom blocks, top blocks, norm + LM head); loss; backward; engine; optimizer."""
    model = step.model
    base = model.get_base_model()
    marks: dict[str, float] = {}

    def mark(name: str) -> Callable:
        def hook(*_):
            marks[name] = time.process_time()

        return hook

    handles = [
        base.model.layers[0].register_forward_pre_hook(mark("start")),
        base.model.layers[boundary].register_forward_pre_hook(mark("top")),
        base.model.norm.register_forward_pre_hook(mark("head")),
        base.lm_head.register_forward_hook(mark("logits")),
    ]
    rows: dict[str, dict[str, list[float]]] = {}
    try:
        for dp in (False, True):
            acc = accumulator_for(model, dp)
            engine_time = [0.0]
            if dp:  # time the engine's own work inside backward (norms + clipped sums)
                for name in ("_unit_sq_norms", "_accumulate"):
                    original = getattr(acc, name)

                    def timed(*a, _f=original, _acc=engine_time):
                        t = time.process_time()
                        result = _f(*a)
                        _acc[0] += time.process_time() - t
                        return result

                    setattr(acc, name, timed)
            parts: dict[str, list[float]] = {}
            for r in range(args.repeats + 1):
                mb = batches[r % len(batches)]
                batch = collate([step.examples[i] for i in mb], step.pad_id)
                engine_time[0] = 0.0
                t0 = time.process_time()
                logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
                t1 = time.process_time()
                per_example = example_losses(logits, batch["labels"])
                t2 = time.process_time()
                acc.backward(per_example, torch.arange(len(mb)))
                t3 = time.process_time()
                del logits, per_example
                sums = list(acc.take_sums().values())
                if dp:
                    add_gaussian_noise(sums, 1.0, step.noise, 0)
                for p, total in zip(step.params, sums, strict=True):
                    p.grad = total.div_(16)
                step.optimizer.step()
                step.optimizer.zero_grad(set_to_none=True)
                t4 = time.process_time()
                if r == 0:
                    continue
                sample = {
                    "embed_and_bottom_blocks": marks["top"] - t0,
                    "top_blocks": marks["head"] - marks["top"],
                    "norm_and_lm_head": marks["logits"] - marks["head"],
                    "forward_total": t1 - t0,
                    "loss": t2 - t1,
                    "backward_total": t3 - t2,
                    "engine_norms_and_clipped_sums": engine_time[0],
                    "take_sums_noise_adamw": t4 - t3,
                    "step_total": t4 - t0,
                }
                for k, v in sample.items():
                    parts.setdefault(k, []).append(v)
            acc.remove()
            rows["dp" if dp else "np"] = {k: med(v) for k, v in parts.items()}
        # LM head + loss alone, forward and backward, from a detached hidden state (its share of the backward)
        head_times = []
        for r in range(args.repeats + 1):
            mb = batches[r % len(batches)]
            batch = collate([step.examples[i] for i in mb], step.pad_id)
            with torch.no_grad():
                hidden = base.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])[0]
            hidden.requires_grad_(True)
            t = time.process_time()
            example_losses(base.lm_head(hidden), batch["labels"]).sum().backward()
            if r:
                head_times.append(time.process_time() - t)
        rows["lm_head_and_loss_forward_backward"] = med(head_times)
    finally:
        for h in handles:
            h.remove()
    return rows


# --- loss alone ----------------------------------------------------------------------------------------


def loss_alone(args, step: Step, batches: list[list[int]], vocab: int) -> dict:
    """example_losses forward + backward on fixed (B, T, V) logits: legacy vs fused, CPU seconds."""
    out = {}
    for width in sorted({max(len(step.examples[i].input_ids) for i in mb) for mb in batches[:1]} | {args.max_length}):
        labels = torch.randint(0, vocab, (args.micro_batch, width))
        base = torch.randn(args.micro_batch, width, vocab)
        times: dict[str, list[float]] = {"legacy": [], "fused": []}
        for r in range(args.repeats + 2):
            for name, fn in (("legacy", legacy_example_losses), ("fused", example_losses)):
                logits = base.clone().requires_grad_()
                t = time.process_time()
                fn(logits, labels).sum().backward()
                if r:
                    times[name].append(time.process_time() - t)
        out[f"B{args.micro_batch}xT{width}xV{vocab}"] = {k: med(v) for k, v in times.items()}
    return out


# --- bucketing ---------------------------------------------------------------------------------------


def padding_of(micro: list[list[int]], lengths: np.ndarray) -> tuple[int, int]:
    """(real tokens, padded tokens) of these micro-batches."""
    real = sum(int(lengths[mb].sum()) for mb in micro)
    padded = sum(len(mb) * int(lengths[mb].max()) for mb in micro if mb)
    return real, padded


def schedule(units: list[list[int]], batch_size: int, epochs: float, seed: int, micro_batch: int, lengths, bucket):
    """All micro-batches of a run (the recipe's sampler and packing), optionally units sorted by length first."""
    batch_size = min(batch_size, len(units) // 2)  # --quick has few units
    q = sample_rate_for(batch_size, len(units))
    sampler = PoissonSampler(len(units), q, Randomness.unsafe_seeded(seed))
    steps = max(1, math.ceil(epochs * len(units) / batch_size))
    out = []
    for t in range(steps):
        sampled = list(sampler.sample(t))
        if bucket:  # depends only on the lengths of the sampled units; units are never split
            sampled.sort(key=lambda u: max(lengths[i] for i in units[u]))
        out.append(micro_batches(sampled, units, micro_batch))
    return out


def bucketing(args, data: dict, step: Step) -> dict:
    o, lengths = data["options"], np.array([len(e.input_ids) for e in data["examples"]])
    out = {}
    for name, units, batch_size, epochs in (
        ("non-private", data["plain_units"], o.batch_size, o.epochs),
        ("dp", data["dp_units"], o.dp_batch_size, o.dp_epochs),
    ):
        row = {}
        for bucket in (False, True):
            steps = schedule(units, batch_size, epochs, o.seed, args.micro_batch, lengths, bucket)
            real = padded = 0
            for micro in steps:
                r, p = padding_of(micro, lengths)
                real, padded = real + r, padded + p
            row["bucketed" if bucket else "as_sampled"] = {
                "steps": len(steps),
                "micro_batches": sum(len(m) for m in steps),
                "real_tokens": real,
                "padded_tokens": padded,
                "padding_share": round(1 - real / padded, 3),
            }
        out[name] = row
    # measured: one DP step (several micro-batches) in both orders, cached-packed
    units = data["dp_units"]
    q = sample_rate_for(min(o.dp_batch_size, len(units) // 2), len(units))
    sampled = list(PoissonSampler(len(units), q, Randomness.unsafe_seeded(1)).sample(0))
    orders = {
        "as_sampled": micro_batches(sampled, units, args.micro_batch),
        "bucketed": micro_batches(
            sorted(sampled, key=lambda u: max(lengths[i] for i in units[u])), units, args.micro_batch
        ),
    }
    times: dict[str, list[float]] = {k: [] for k in orders}
    acc = PerUnitClipper(step.model, max_grad_norm=1.0)
    try:
        for r in range(min(args.repeats, 2) + 1):
            for name, micro in orders.items():
                clock = Clock()
                step.run("cached-packed", acc, micro, dp=True)
                if r:
                    times[name].append(clock.read()[0])
    finally:
        acc.remove()
    out["dp_step_measured_cpu_s"] = {
        k: {"cpu_s": med(times[k]), "padded_tokens": padding_of(orders[k], lengths)[1]} for k in orders
    }
    out["dp_step_measured_cpu_s"]["real_tokens"] = padding_of(orders["as_sampled"], lengths)[0]
    return out


# --- main ----------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    skip = set(filter(None, args.skip.split(",")))
    result: dict = {
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "threads": args.threads,
        "env": {k: os.environ.get(k) for k in ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA")},
    }
    model, tokenizer = demo_model(args)
    with tempfile.TemporaryDirectory() as tmp:
        data = demo_data(args, tokenizer, Path(tmp))
    examples = data["examples"]
    lengths = np.array([len(e.input_ids) for e in examples])
    result["data"] = {
        "examples": len(examples),
        "dp_units": len(data["dp_units"]),
        "length_mean": round(float(lengths.mean()), 1),
        "length_p50_p90_max": [int(np.percentile(lengths, 50)), int(np.percentile(lengths, 90)), int(lengths.max())],
    }
    boundary = frozen_boundary(model)
    clock = Clock()
    cache = PrefixCache.build(model, examples, boundary)
    cpu, wall = clock.read()
    dp_examples = sorted(i for u in data["dp_units"] for i in u)
    dp_cpu = dp_wall = math.nan
    if "dp-build" not in skip:
        clock = Clock()
        PrefixCache.build(model, examples, boundary, only=dp_examples)
        dp_cpu, dp_wall = clock.read()
    result["cache"] = {
        "boundary": boundary,
        "build_all_examples": {"examples": len(examples), "cpu_s": round(cpu, 2), "wall_s": round(wall, 2)},
        "build_dp_examples": {"examples": len(dp_examples), "cpu_s": round(dp_cpu, 2), "wall_s": round(dp_wall, 2)},
        "megabytes": round(cache.nbytes / 2**20, 1),
    }
    print(json.dumps(result["cache"]), file=sys.stderr)
    step = Step(model, examples, tokenizer.pad_token_id, cache)
    rng = np.random.default_rng(0)
    batches = [sorted(rng.choice(len(examples), args.micro_batch, replace=False).tolist()) for _ in range(8)]
    if "steps" not in skip:
        variants = [v for v in args.variants.split(",") if v]
        unknown = set(variants) - set(VARIANTS)
        if unknown:
            raise SystemExit(f"--variants: unknown {sorted(unknown)}; choose from {VARIANTS}")
        result["step_per_micro_batch"] = time_steps(args, step, batches, variants)
        print(json.dumps(result["step_per_micro_batch"]), file=sys.stderr)
    if "breakdown" not in skip:
        result["breakdown_cpu_s"] = breakdown(args, step, batches, boundary)
        print(json.dumps(result["breakdown_cpu_s"]), file=sys.stderr)
    if "loss" not in skip:
        result["loss_alone_cpu_s"] = loss_alone(args, step, batches, model.config.vocab_size)
    if "bucketing" not in skip:
        result["bucketing"] = bucketing(args, data, step)
    result["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    text = json.dumps(result, indent=2)
    print(text)
    if args.json_out:
        Path(args.json_out).write_text(text + "\n")
    return result


if __name__ == "__main__":
    main()
