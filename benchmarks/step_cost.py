"""What DP costs: one full optimizer step, non-private vs dpft vs Opacus (hooks and ghost clipping).

Each step is forward + per-example loss + backward/clipping + noise + AdamW step on one fixed batch
of random tokens. Variants share one model and are timed interleaved (round r runs every variant
once) after warm-up, so a burst of load on the machine hits them all alike; the median and the
spread over rounds are reported. Peak memory is measured separately, one fresh subprocess per
variant (VmHWM: the process's peak resident set, model loading included; `setup` is the RSS once
the model and optimizer exist, before the first step).

    python benchmarks/step_cost.py --mode full --dtype bf16            # the embedded SmolLM2-135M
    python benchmarks/step_cost.py --mode lora --dtype fp32 --json-out lora-fp32.json
    python benchmarks/step_cost.py --quick --json-out /tmp/smoke.json  # tiny random Llama, seconds
    python benchmarks/step_cost.py --mode lora --logical-batch 1024     # RSS flat in the logical batch
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from dpft.models.precision import DTYPES, autocast, describe_hardware, dtype_name, resolve_dtype
from dpft.privacy.randomness import Randomness
from dpft.privacy.step import Budget, Mechanism, MemoryJournal, PrivacyStep
from dpft.training.loss import example_losses

VARIANTS = ["plain", "dpft", "opacus_hooks", "opacus_ghost"]
CLIP, SIGMA, LR = 1.0, 1.0, 1e-4


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="hub id or path (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--mode", choices=["lora", "full"], default="full", help="LoRA r=8 on q,v or full fine-tuning")
    p.add_argument(
        "--dtype",
        choices=["auto", "fp32", "bf16"],
        default="auto",
        help="compute dtype; bf16 = CPU autocast over fp32 weights; auto = bf16 where the CPU does it natively",
    )
    p.add_argument("--batch", type=int, default=8, help="examples per step (record-level units)")
    p.add_argument("--seq-len", type=int, default=128, help="tokens per example")
    p.add_argument("--repeats", type=int, default=3, help="timed rounds after one warm-up round")
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated subset of {VARIANTS}")
    p.add_argument("--no-memory", action="store_true", help="skip the per-variant peak-memory subprocesses")
    p.add_argument(
        "--logical-batch",
        type=int,
        default=0,
        help="instead: peak RSS of one dpft step over this many examples in micro-batches of --batch",
    )
    p.add_argument("--quick", action="store_true", help="tiny random Llama (tied), batch 4 x 16: a smoke test")
    p.add_argument("--json-out", default=None, help="write the results here as JSON")
    p.add_argument("--_memory-of", dest="memory_of", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.batch, args.seq_len, args.repeats = min(args.batch, 4), min(args.seq_len, 16), min(args.repeats, 2)
    return args


def build_model(args: argparse.Namespace) -> nn.Module:
    torch.manual_seed(0)
    if args.quick:
        from transformers import LlamaConfig, LlamaForCausalLM

        cfg = LlamaConfig(
            vocab_size=256,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=64,
            tie_word_embeddings=True,
            pad_token_id=0,
        )
        model = LlamaForCausalLM(cfg)
    else:
        from dpft.models import load_base_model

        model = (load_base_model(args.model) if args.model else load_base_model()).model
    if args.mode == "lora":
        from dpft.models import with_lora

        model = with_lora(model, 8, 16, "q_proj,v_proj")
    return model.train()  # Opacus hooks only record in train mode; Llama has no dropout


def make_batch(model: nn.Module, args: argparse.Namespace, seed: int = 0) -> tuple[Tensor, Tensor]:
    vocab = model.get_input_embeddings().num_embeddings
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (args.batch, args.seq_len), generator=gen)
    return ids, ids.clone()


@dataclass
class Variant:
    """A step function with the model already wrapped; `close` unwraps it."""

    step: Callable[[], None]
    close: Callable[[], None]


def _autocast(args: argparse.Namespace):
    return autocast(DTYPES[args.dtype])


def _losses(model: nn.Module, ids: Tensor, labels: Tensor, args: argparse.Namespace) -> Tensor:
    with _autocast(args):
        logits = model(input_ids=ids).logits
    return example_losses(logits, labels)


def _privacy_step(model: nn.Module, opt: torch.optim.Optimizer, batch: int, dp: bool) -> PrivacyStep:
    """dpft's own step object, as `dpft train` runs it (the non-private baseline is its --no-dp switch)."""
    mechanism = Mechanism(0.01, batch, SIGMA, CLIP) if dp else Mechanism.non_private(0.01, batch)
    step = PrivacyStep(model, mechanism, Budget(1e-5), Randomness.secure(), MemoryJournal())
    step.attach(opt)
    return step


def make_variant(name: str, model: nn.Module, opt: torch.optim.Optimizer, batch, args) -> Variant:
    """Wrap the shared model for one variant (the optimizer is the variant's own AdamW)."""
    ids, labels = batch
    units = torch.arange(args.batch)
    if name in ("plain", "dpft"):
        dp_step = _privacy_step(model, opt, args.batch, dp=name == "dpft")

        def step() -> None:
            dp_step.begin(0)
            dp_step.backward(_losses(model, ids, labels, args), units)
            dp_step.finish()
            opt.step()

        return Variant(step, dp_step.remove)
    return _opacus_variant(name, model, opt, ids, labels, args)


def _opacus_variant(name: str, model: nn.Module, opt, ids: Tensor, labels: Tensor, args) -> Variant:
    """What PrivacyEngine.make_private builds with poisson_sampling=False, assembled by hand."""
    from opacus import GradSampleModule
    from opacus.grad_sample import GradSampleModuleFastGradientClipping
    from opacus.optimizers import DPOptimizer, DPOptimizerFastGradientClipping
    from opacus.utils.fast_gradient_clipping_utils import DPTensorFastGradientClipping

    kw = dict(noise_multiplier=SIGMA, max_grad_norm=CLIP, expected_batch_size=args.batch, loss_reduction="sum")
    if name == "opacus_hooks":
        gsm = GradSampleModule(model, loss_reduction="sum")
        dp_opt = DPOptimizer(opt, **kw)

        def step() -> None:
            _losses(gsm, ids, labels, args).sum().backward()
            dp_opt.step()
            dp_opt.zero_grad(set_to_none=True)

    else:
        gsm = GradSampleModuleFastGradientClipping(
            model, loss_reduction="sum", max_grad_norm=CLIP, use_ghost_clipping=True
        )
        dp_opt = DPOptimizerFastGradientClipping(opt, **kw)

        def step() -> None:  # what DPLossFastGradientClipping returns: two backward passes
            DPTensorFastGradientClipping(gsm, dp_opt, _losses(gsm, ids, labels, args), "sum").backward()
            dp_opt.step()
            dp_opt.zero_grad(set_to_none=True)

    def close() -> None:
        gsm._close()
        for p in model.parameters():  # Opacus leaves per-parameter bookkeeping behind
            for attr in ("_forward_counter", "grad_sample", "_norm_sample", "summed_grad"):
                if hasattr(p, attr):
                    delattr(p, attr)
        opt.zero_grad(set_to_none=True)

    return Variant(step, close)


def _timed(fn: Callable[[], None]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def time_variants(args: argparse.Namespace, names: list[str]) -> dict[str, dict]:
    """Interleaved rounds: warm-up, then `repeats` timed rounds of every variant; errors recorded."""
    model = build_model(args)
    batch = make_batch(model, args)
    params = [p for p in model.parameters() if p.requires_grad]
    opts = {n: torch.optim.AdamW(params, lr=LR) for n in names}
    times: dict[str, list[float]] = {n: [] for n in names}
    errors: dict[str, str] = {}
    for r in range(args.repeats + 1):
        for n in names:
            if n in errors:
                continue
            variant = make_variant(n, model, opts[n], batch, args)
            try:
                t = _timed(variant.step)
                if r > 0:
                    times[n].append(t)
            except Exception as err:  # e.g. Opacus ghost clipping on tied embeddings
                errors[n] = f"{type(err).__name__}: {err}"
            finally:
                variant.close()
    tokens = args.batch * args.seq_len
    out = {}
    for n in names:
        if n in errors:
            out[n] = {"error": errors[n]}
            continue
        med = statistics.median(times[n])
        out[n] = {
            "s_per_step": med,
            "min": min(times[n]),
            "max": max(times[n]),
            "times": times[n],
            "tokens_per_s": tokens / med,
        }
    return out


def rss_mb() -> float:
    """Peak resident set of this process (VmHWM). Not ru_maxrss: a child inherits its parent's peak."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024  # KiB
    except (OSError, StopIteration):  # not Linux: ru_maxrss (KiB on Linux, bytes on macOS)
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def memory_child(args: argparse.Namespace) -> dict:
    """In a fresh process: set up one variant, run two steps, report the peak RSS."""
    model = build_model(args)
    batch = make_batch(model, args)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR)
    setup = current_rss_mb()
    if args.logical_batch:
        return logical_batch_child(model, opt, args, setup)
    variant = make_variant(args.memory_of, model, opt, batch, args)
    try:
        variant.step()
        variant.step()
    except Exception as err:
        return {"error": f"{type(err).__name__}: {err}"}
    return {"peak_rss_mb": rss_mb(), "setup_rss_mb": setup}


def logical_batch_child(model: nn.Module, opt, args: argparse.Namespace, setup: float) -> dict:
    """One dpft step over `--logical-batch` examples in micro-batches of `--batch`."""
    dp_step = _privacy_step(model, opt, args.logical_batch, dp=True)
    start = time.perf_counter()
    dp_step.begin(0)
    for i in range(args.logical_batch // args.batch):
        ids, labels = make_batch(model, args, seed=i)
        dp_step.backward(_losses(model, ids, labels, args), torch.arange(args.batch))
    dp_step.finish()
    opt.step()
    return {
        "peak_rss_mb": rss_mb(),
        "setup_rss_mb": setup,
        "logical_batch": args.logical_batch,
        "s_per_step": time.perf_counter() - start,
    }


def current_rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def measure_memory(args: argparse.Namespace, argv: list[str], name: str) -> dict:
    cmd = [sys.executable, __file__, *argv, "--_memory-of", name, "--json-out", ""]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "failed"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def ratios(res: dict) -> dict:
    def ratio(a: str, b: str, key: str) -> float | None:
        x, y = res.get(a, {}).get(key), res.get(b, {}).get(key)
        return None if x is None or y is None else x / y

    return {
        "time_dpft_over_plain": ratio("dpft", "plain", "s_per_step"),
        "time_dpft_over_opacus_hooks": ratio("dpft", "opacus_hooks", "s_per_step"),
        "time_dpft_over_opacus_ghost": ratio("dpft", "opacus_ghost", "s_per_step"),
        "peak_rss_dpft_over_plain": ratio("dpft", "plain", "peak_rss_mb"),
        "peak_rss_dpft_over_opacus_hooks": ratio("dpft", "opacus_hooks", "peak_rss_mb"),
    }


def table(result: dict) -> str:
    hw = result["hardware"]
    native = "native bf16" if hw["native_bf16"] else "no native bf16"
    rows = [
        f"ran on: CPU {hw['cpu']} ({hw['capability']}, {native}), {hw['threads']} threads, "
        f"dtype {result['config']['dtype']}",
        f"{'variant':<14} {'s/step':>8} {'spread':>15} {'tok/s':>8} {'peak MB':>8} {'setup MB':>8}",
    ]
    for n, r in result["variants"].items():
        if "error" in r:
            rows.append(f"{n:<14} {r['error'][:100]}")
            continue
        spread = f"{r['min']:.2f}-{r['max']:.2f}"
        peak, setup = r.get("peak_rss_mb"), r.get("setup_rss_mb")
        mem = f"{peak:>8.0f} {setup:>8.0f}" if peak else f"{'-':>8} {'-':>8}"
        rows.append(f"{n:<14} {r['s_per_step']:>8.3f} {spread:>15} {r['tokens_per_s']:>8.0f} {mem}")
    rows += [f"{k}: {v:.3f}" for k, v in result["ratios"].items() if v is not None]
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    args.dtype = dtype_name(resolve_dtype(args.dtype))  # what ran, not "auto"
    if args.memory_of or args.logical_batch:  # a fresh process: no other variant's RSS counts
        res = memory_child(args) if args.memory_of else measure_memory(args, argv, "dpft")
        print(json.dumps(res))
        if args.json_out:
            with open(args.json_out, "w") as f:
                json.dump(res, f, indent=2)
        return res
    names = [n.strip() for n in args.variants.split(",") if n.strip()]
    load = os.getloadavg()
    res = time_variants(args, names)
    if not args.no_memory:
        for n in names:
            mem = measure_memory(args, argv, n)
            res[n].update({k: v for k, v in mem.items() if "error" not in res[n] or k != "error"})
    result = {
        "config": {k: v for k, v in vars(args).items() if k not in ("json_out", "memory_of")}
        | {
            "model": args.model or ("tiny-random-llama" if args.quick else "smollm2-135m-instruct"),
            "tokens_per_step": args.batch * args.seq_len,
            "clip": CLIP,
            "noise_multiplier": SIGMA,
            "torch": torch.__version__,
        },
        "hardware": describe_hardware(),
        "load_avg_before": load,
        "load_avg_after": os.getloadavg(),
        "variants": res,
        "ratios": ratios(res),
    }
    print(table(result))
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
