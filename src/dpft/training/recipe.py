"""The DP fine-tuning recipe. Read it top to bottom:

setup → sample (Poisson over units) → micro-batch → per-unit clip and sum → noise (once per
logical step) → normalise by the expected batch size → optimizer step → account → checkpoint.

Where each privacy invariant is enforced:
- sampling: `PoissonSampler.sample()` in `_step`; the accountant assumes exactly that sampler.
- clipping unit = privacy unit: `unit_index` built from the units of the micro-batch in `_step`.
- noise once per logical step, std σC: `add_gaussian_noise` in `_step`, after all micro-batches.
- ε counts every step that touched the data: `journal.record` before the batch is read.
- hard stop at the budget: `allowed_steps` in `train`.
"""

from __future__ import annotations

import hashlib
import math
import time
from contextlib import nullcontext
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dpft.config import TrainConfig
from dpft.data import collate, encode_records, read_records
from dpft.errors import DpftError
from dpft.models import load_base_model, with_lora
from dpft.privacy.accounting import PrivacyAccountant, calibrate_noise, check_delta, max_steps
from dpft.privacy.engine import make_accumulator
from dpft.privacy.noise import add_gaussian_noise, make_generator
from dpft.privacy.sampling import PoissonSampler, cap_unit_examples, micro_batches, sample_rate_for
from dpft.training import checkpoint as ckpt
from dpft.training.budget import DatasetBudget
from dpft.training.journal import PrivacyJournal
from dpft.training.loss import example_losses
from dpft.training.progress import Progress
from dpft.training.report import privacy_report
from dpft.training.run_dir import (
    RunPaths,
    append_metrics,
    create_run_dir,
    save_model,
    truncate_metrics,
    write_model_card,
    write_privacy,
)
from dpft.training.schedule import lr_at

NO_LIMIT = 1 << 62


@dataclass
class Setup:
    config: TrainConfig
    paths: RunPaths
    model: torch.nn.Module
    tokenizer: Any
    examples: list
    unit_examples: list[list[int]]
    example_unit: np.ndarray
    sample_rate: float
    noise_multiplier: float | None  # None for --no-dp
    planned_steps: int
    allowed_steps: int  # the budget's hard stop on data-touching steps (NO_LIMIT without a target ε)
    stats: dict[str, int]
    budget: DatasetBudget


def train(config: TrainConfig) -> dict[str, Any]:
    """Run (or resume) a fine-tune and return its privacy report (privacy.json content)."""
    s = setup(config)
    c = s.config
    trainable = [(n, p) for n, p in s.model.named_parameters() if p.requires_grad]
    params = [p for _, p in trainable]
    accumulator = make_accumulator(s.model, None if c.no_dp else c.max_grad_norm)
    optimizer = torch.optim.AdamW(params, lr=c.lr, weight_decay=c.weight_decay)
    sampler = PoissonSampler(len(s.unit_examples), s.sample_rate, seed=c.seed)
    noise_gen = None if c.secure_noise else make_generator(c.seed + 1)
    journal = PrivacyJournal(s.paths.journal)
    state = {"step": 0, "batch_sizes": [], "config_hash": config_hash(c)}
    if c.resume:
        state = _restore(s, trainable, optimizer, sampler, noise_gen)
    accountant = PrivacyAccountant(c.accountant)
    if s.noise_multiplier is not None:  # the journal holds every step that touched the data
        for q, sigma, count in journal.segments(s.sample_rate, s.noise_multiplier):
            accountant.step(q, sigma, count)

    progress = Progress(s.planned_steps, c.epsilon if not c.no_dp else None, quiet=c.quiet)
    stop_reason = "completed the planned steps"
    s.model.train()
    touched = journal.count()  # steps that touched the data, including any lost in a crash
    with progress:
        for step in range(state["step"], s.planned_steps):
            if touched >= s.allowed_steps:
                stop_reason = f"stopped at the privacy budget: one more step would exceed ε = {c.epsilon}"
                break
            t0 = time.perf_counter()
            lr = lr_at(step, s.planned_steps, c.lr, c.lr_schedule, c.warmup_steps)
            journal.record(step + 1, s.sample_rate, s.noise_multiplier)  # before touching the data
            touched += 1
            batch_size, n_examples, loss = _step(s, lr, accumulator, optimizer, sampler, noise_gen, params)
            if s.noise_multiplier is not None:
                accountant.step(s.sample_rate, s.noise_multiplier)
            eps = accountant.epsilon(c.delta) if s.noise_multiplier is not None else None
            state["step"], dt = step + 1, time.perf_counter() - t0
            state["batch_sizes"].append(batch_size)
            row = {
                "step": step + 1,
                "loss": loss,
                "lr": lr,
                "epsilon": eps,
                "batch_size": batch_size,
                "examples": n_examples,
                "seconds": round(dt, 4),
                "examples_per_s": n_examples / dt,
            }
            append_metrics(s.paths, row)
            progress.update(row)
            if c.checkpoint_every and state["step"] % c.checkpoint_every == 0:
                _checkpoint(s, trainable, optimizer, sampler, noise_gen, state)
    accumulator.remove()
    if s.noise_multiplier is not None:
        s.budget.record(c, s.paths.root, journal.segments(s.sample_rate, s.noise_multiplier))
    return _finish(s, accountant, touched, state, stop_reason)


def setup(config: TrainConfig) -> Setup:
    """Validate, read and encode the data, load the model, and plan σ and the steps."""
    if config.resume:
        paths = RunPaths(Path(config.resume))
        if not paths.config.is_file():
            raise DpftError(f"--resume {config.resume}: not a dpft run directory (no config.yaml)")
        if paths.privacy.is_file():
            raise DpftError(f"--resume {config.resume}: this run already finished (privacy.json exists)")
        config = replace(TrainConfig.load(paths.config), resume=config.resume, quiet=config.quiet)
    config.validate()
    torch.manual_seed(config.seed)
    records = read_records(config.data)
    loaded = load_base_model(config.model, config.dtype)
    data = encode_records(records, loaded.tokenizer, config.max_length, config.privacy_unit, config.loss_on)
    unit_examples = data.unit_examples
    if config.privacy_unit == "user":
        unit_examples = cap_unit_examples(unit_examples, config.max_records_per_user, config.seed)
    n_units = len(unit_examples)
    micro_batches(range(n_units), unit_examples, config.micro_batch_size)  # a unit too big fails now, not mid-run
    q = sample_rate_for(config.batch_size, n_units)
    planned = config.max_steps or max(1, math.ceil(config.epochs * n_units / config.batch_size))
    sigma, allowed = _plan_noise(config, q, planned, n_units)
    budget = DatasetBudget.open(config)
    planned_segments = [] if sigma is None else [(q, sigma, min(planned, allowed))]
    if not config.resume:
        budget.check(config, planned_segments)  # before anything is written
        paths = create_run_dir(config.output)
        config.save(paths.config)
        budget.record(config, paths.root, planned_segments)
    model = (
        loaded.model
        if config.full
        else with_lora(
            loaded.model, config.lora_r, config.lora_alpha, config.lora_targets, last_layers=config.lora_layers
        )
    )
    if config.full:
        model.requires_grad_(True)
    example_unit = np.empty(len(data.examples), dtype=np.int64)
    for u, idx in enumerate(unit_examples):
        example_unit[idx] = u
    stats = {
        "records": len(records),
        "examples": len(data.examples),
        "units": n_units,
        "truncated": data.num_truncated,
        "dropped": data.num_dropped,
        "duplicates": data.num_duplicates,
    }
    return Setup(
        config,
        paths,
        model,
        loaded.tokenizer,
        data.examples,
        unit_examples,
        example_unit,
        q,
        sigma,
        planned,
        allowed,
        stats,
        budget,
    )


def _plan_noise(c: TrainConfig, q: float, steps: int, n_units: int) -> tuple[float | None, int]:
    """σ (calibrated to the target ε, or given) and how many data-touching steps the budget allows."""
    if c.no_dp:
        return None, NO_LIMIT
    check_delta(c.delta, n_units)
    sigma = c.noise_multiplier or calibrate_noise(q, steps, c.delta, c.epsilon, c.accountant)
    if c.epsilon is None:  # σ given, no target: ε is reported, not capped
        return sigma, NO_LIMIT
    return sigma, max_steps(q, sigma, c.delta, c.epsilon, c.accountant, upper=max(steps, 1) * 4)


def _step(s: Setup, lr: float, accumulator, optimizer, sampler, noise_gen, params) -> tuple[int, int, float]:
    """One logical step at rate `lr`: Poisson batch → micro-batches → clipped sum → noise → normalise → update."""
    c = s.config
    for group in optimizer.param_groups:
        group["lr"] = lr
    units = sampler.sample()
    losses = []
    for mb in micro_batches(units, s.unit_examples, c.micro_batch_size):
        batch = collate([s.examples[i] for i in mb], s.tokenizer.pad_token_id)
        unit_index = torch.from_numpy(np.unique(s.example_unit[mb], return_inverse=True)[1])
        autocast = torch.autocast("cpu", dtype=torch.bfloat16) if c.bf16 else nullcontext()
        with autocast:
            logits = s.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        per_example = example_losses(logits, batch["labels"])
        accumulator.backward(per_example, unit_index)
        losses.append(per_example.detach())
    sums = list(accumulator.take_sums().values())
    if s.noise_multiplier is not None:
        add_gaussian_noise(sums, s.noise_multiplier * c.max_grad_norm, noise_gen, secure=c.secure_noise)
    for p, total in zip(params, sums, strict=True):  # divide by the EXPECTED batch size: the actual size is private
        p.grad = total.div_(c.batch_size).to(p.dtype)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    n_examples = sum(len(s.unit_examples[u]) for u in units)
    loss = torch.cat(losses).mean().item() if losses else float("nan")
    return len(units), n_examples, loss


def _checkpoint(s: Setup, trainable, optimizer, sampler, noise_gen, state: dict) -> None:
    state = dict(
        state,
        sampler=sampler.state_dict(),
        torch_rng=torch.get_rng_state().tolist(),
        noise_rng=noise_gen.get_state().tolist() if noise_gen is not None else None,
    )
    ckpt.save_checkpoint(s.paths.checkpoints, state["step"], dict(trainable), optimizer.state_dict(), state)


def _restore(s: Setup, trainable, optimizer, sampler, noise_gen) -> dict:
    if not (s.paths.checkpoints / "latest").is_file():
        # Killed before the first checkpoint: start over from the base model. The journal keeps
        # the steps the lost attempt spent, so they are still accounted.
        truncate_metrics(s.paths, 0)
        return {"step": 0, "batch_sizes": [], "config_hash": config_hash(s.config)}
    weights, opt_state, state = ckpt.load_checkpoint(s.paths.checkpoints, config_hash(s.config))
    params = dict(trainable)
    if set(weights) != set(params):
        raise DpftError(f"{s.paths.checkpoints}: checkpoint weights do not match the model; refusing to resume")
    with torch.no_grad():
        for name, tensor in weights.items():
            params[name].copy_(tensor)
    optimizer.load_state_dict(opt_state)
    sampler.load_state_dict(state["sampler"])
    torch.set_rng_state(torch.tensor(state["torch_rng"], dtype=torch.uint8))
    if noise_gen is not None and state.get("noise_rng") is not None:
        noise_gen.set_state(torch.tensor(state["noise_rng"], dtype=torch.uint8))
    truncate_metrics(s.paths, state["step"])
    return {k: state[k] for k in ("step", "batch_sizes", "config_hash")}


def _finish(s: Setup, accountant, touched: int, state: dict, stop_reason: str) -> dict[str, Any]:
    kind = "full" if s.config.full else "lora"
    save_model(s.paths, s.model, s.tokenizer, kind, s.config.model)
    report = privacy_report(s, accountant, touched, state["batch_sizes"], stop_reason)
    write_model_card(s.paths, report, s.config.model)
    write_privacy(s.paths, report)  # last: privacy.json marks the run complete (the commit point)
    return report


def config_hash(c: TrainConfig) -> str:
    """Identity of a run's settings; a checkpoint from other settings is refused."""
    d = {k: v for k, v in c.to_dict().items() if k not in ("resume", "quiet")}
    return hashlib.sha256(repr(sorted(d.items())).encode()).hexdigest()
