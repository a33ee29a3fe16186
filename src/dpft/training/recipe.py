"""The DP fine-tuning recipe. Read it top to bottom:

setup → (per step) hard stop → journal → sample (Poisson over units) → micro-batch → per-unit clip
and sum → noise once → ÷ expected batch → optimizer step → checkpoint → privacy.json.

Where each privacy invariant is enforced (all in `privacy/`, the recipe only drives them):
- the sampler that runs is the sampler accounted: `PoissonSampler.sample` in `_train_step`;
- clipping unit = privacy unit: `PrivacyUnits.micro_batches` gives each example its unit;
- noise once per logical step with std σC, then ÷ the expected batch: `PrivacyStep.finish`,
  guarded at run time (a second call, or an optimizer step without it, raises);
- ε counts every step that touched the data: `PrivacyStep.begin` journals it before the batch is
  drawn; the hard stop tests the journal's actual segments plus one step, against the target ε and
  against --dataset-budget with the ledger's other runs (a resume redoes steps: `budget.reaccount`);
- secret randomness: `Randomness.secure()` unless --unsafe-seed; no seed is written to a shipped file.
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any

import torch

from dpft.data import collate, encode_records, read_records
from dpft.data.encode import Example
from dpft.errors import ConfigError, DpftError
from dpft.hashing import sha256_file
from dpft.models import load_base_model, with_lora
from dpft.models.precision import announce, autocast, dtype_name, resolve_dtype
from dpft.models.prefix_cache import PrefixCache
from dpft.models.probe import check_trainable
from dpft.models.rope import check_rope
from dpft.privacy.accounting import Segment
from dpft.privacy.randomness import Randomness
from dpft.privacy.sampling import PoissonSampler, PrivacyUnits, sample_rate_for
from dpft.privacy.step import Budget, Mechanism, PrivacyStep, plan_mechanism
from dpft.run_layout import RunPaths
from dpft.training import checkpoint as ckpt
from dpft.training.auto_batch import auto_batch_size
from dpft.training.budget import DatasetBudget, reaccount
from dpft.training.config import RUN_ONLY, TrainConfig
from dpft.training.distributed import Parallel
from dpft.training.journal import PrivacyJournal
from dpft.training.loss import example_losses
from dpft.training.optimizer import build_optimizer
from dpft.training.progress import Progress
from dpft.training.report import data_report, privacy_report
from dpft.training.run_dir import (
    create_run_dir,
    save_model,
    truncate_rows,
    write_json,
    write_model_card,
)
from dpft.training.schedule import lr_at
from dpft.training.step_log import StepLog

PREFIX_CACHE_BYTES = 2 << 30  # frozen-prefix states kept in memory at most (fp32 upper estimate)


@dataclass
class Run:
    """Every part of one training run, built by `setup` and driven by `train`."""

    config: TrainConfig
    paths: RunPaths
    model: torch.nn.Module
    tokenizer: Any
    examples: list[Example]
    units: PrivacyUnits
    randomness: Randomness
    sampler: PoissonSampler
    journal: PrivacyJournal
    step: PrivacyStep
    optimizer: torch.optim.Optimizer
    budget: DatasetBudget
    planned_steps: int
    stats: dict[str, int]
    dtype: torch.dtype  # the compute dtype (autocast); config.dtype holds its name
    prefix: PrefixCache | None = None  # frozen blocks' outputs, computed once per example
    steps_done: int = 0
    batch_sizes: list[int] = field(default_factory=list)  # private: realised Poisson draws
    par: Parallel = field(default_factory=Parallel)  # device and data-parallel rank; rank 0 alone writes


def train(config: TrainConfig) -> dict[str, Any]:
    """Run (or resume) a fine-tune and return its privacy report (privacy.json content)."""
    run = setup(config)
    c = run.config
    if run.par.is_main:
        announce(run.dtype, run.par.device)  # after every check in setup: an error stays the only line
        if config.batch_size is None and not config.resume:
            print(
                f"batch: {c.batch_size} units per step (auto, from {len(run.units)} units and the budget)",
                file=sys.stderr,
            )
    stop_reason = "completed the planned steps"
    run.model.train()
    label = "plain fine-tune" if c.no_dp else "DP fine-tune"
    quiet = c.quiet or not run.par.is_main
    with Progress(run.planned_steps, c.epsilon if not c.no_dp else None, quiet=quiet, label=label) as progress:
        for t in range(run.steps_done, run.planned_steps):
            limit = run.step.exceeded_limit()  # the target ε, and --dataset-budget with the other runs
            if limit is not None:
                stop_reason = f"stopped at the privacy budget: one more step would exceed {limit}"
                break
            _train_step(run, t)
            progress.update(run.steps_done, run.step.epsilon)
            if c.checkpoint_every and run.steps_done % c.checkpoint_every == 0:
                _checkpoint(run)  # --fsdp: every rank gathers, rank 0 writes
    run.step.remove()
    if run.step.mechanism.dp and run.par.is_main:
        run.budget.record(c, run.paths.root, run.journal.segments())
    model_state = run.par.model_state(run.model)  # --fsdp: gathered onto rank 0 (collective)
    report = _finish(run, stop_reason, model_state) if run.par.is_main else privacy_report(run, stop_reason)
    run.par.barrier()  # the other ranks return once rank 0 has written privacy.json
    run.par.close()
    return report


def _train_step(run: Run, t: int) -> None:
    """Logical step t: journal → Poisson batch → micro-batches → clipped sum → noise → ÷ B → update."""
    c = run.config
    log = StepLog(None if c.no_dp else c.max_grad_norm)
    lr = lr_at(t, run.planned_steps, c.lr, c.lr_schedule, c.warmup_steps)
    for group in run.optimizer.param_groups:
        group["lr"] = lr
    run.step.begin(t)  # the hard stop and the journal line come before any data is read
    units = run.sampler.sample(t)  # data-parallel: drawn on rank 0, the same on every rank
    shares = run.par.shares(units, run.units.unit_examples, run.examples)  # [all of them] in one process
    batches = [run.units.micro_batches(share, c.micro_batch_size) for share in shares]
    for examples, unit_index in batches[run.par.rank]:
        batch = _on(collate([run.examples[i] for i in examples], run.tokenizer.pad_token_id), run.par.device)
        unit_index = unit_index.to(run.par.device)
        with autocast(run.dtype, run.par.device):
            if run.prefix is not None:
                per_example = run.prefix.losses(run.model, examples, batch)
            else:
                logits = run.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
                per_example = example_losses(logits, batch["labels"])
        log.add(per_example, run.step.backward(per_example, unit_index))
    for _ in range(run.par.idle_passes([len(b) for b in batches])):  # --fsdp: ranks pass in lockstep
        _idle_pass(run)
    run.step.finish()  # data-parallel: noise on rank 0 only, then one all-reduce of the clipped sums
    run.optimizer.step()
    run.steps_done = t + 1
    run.batch_sizes.append(len(units))
    log.write(run.par, run.paths, t + 1, run.step.epsilon, lr, len(units), run.units.examples_of(units))


def _idle_pass(run: Run) -> None:
    """A forward and backward on one pad token, its loss × 0: the gradient is exactly zero, so the
    clipped sums do not change (and no data is read); FSDP2's all-gathers run as on the other ranks."""
    ids = torch.full((1, 1), run.tokenizer.pad_token_id, device=run.par.device)
    with autocast(run.dtype, run.par.device):
        logits = run.model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
    run.step.backward(logits.float().sum(dim=(1, 2)) * 0.0, torch.zeros(1, dtype=torch.long, device=run.par.device))


def setup(config: TrainConfig) -> Run:
    """Validate, read and encode the data, load the model, plan σ, and build every part of the run."""
    paths, config, seed = _open_run(config) if config.resume else (None, config, config.unsafe_seed)
    config.validate()
    par = Parallel.from_env(config.device, config.fsdp)  # torchrun's rank and group, if any; else one process
    dtype = resolve_dtype(config.dtype, par.device)
    config = replace(config, dtype=dtype_name(dtype))  # config.yaml records what runs; a resume runs the same
    torch.manual_seed(config.seed)  # the adapters' initialisation: public, never the DP randomness
    randomness = Randomness.secure() if seed is None else Randomness.unsafe_seeded(seed)
    records = read_records(config.data)
    loaded = load_base_model(config.model, config.weights_dtype)
    if not config.no_dp:
        check_rope(loaded.model.config, config.max_length)  # its frequencies must not follow the batch
    data = encode_records(records, loaded.tokenizer, config.max_length, config.privacy_unit, config.loss_on)
    cap = config.max_records_per_user if config.privacy_unit == "user" else None
    lengths = [len(e.input_ids) for e in data.examples]
    units = par.agreed_units(PrivacyUnits(data.unit_examples, data.unit_ids, cap, randomness, lengths))
    units.micro_batches(range(len(units)), config.micro_batch_size)  # a unit too big fails now, not mid-run
    if config.batch_size is None:  # config.yaml records the batch chosen, so a resume runs the same
        config = replace(
            config, batch_size=auto_batch_size(len(units), config.epochs, config.max_steps, not config.no_dp)
        )
    q = sample_rate_for(config.batch_size, len(units))
    planned = config.max_steps or max(1, math.ceil(config.epochs * len(units) / config.batch_size))
    mechanism, allowed = _plan_mechanism(config, q, planned, len(units))
    budget = DatasetBudget.open(config)  # the ledger (only rank 0 reads it: `cap` below)
    planned_segments = [Segment(q, mechanism.noise_multiplier, min(planned, allowed))] if mechanism.dp else []
    model = _adapted(loaded.model, config).to(par.device)  # LoRA target errors: before anything is written
    if config.gradient_checkpointing:  # non-reentrant; the engine captures each call once (test_gradient_checkpointing)
        if hasattr(model, "activation_checkpointing_enable"):  # its name in newer transformers (the old one warns)
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if not config.no_dp:  # a model the engine cannot clip is refused before anything is written
        check_trainable(model, len(loaded.tokenizer))
    if paths is None:
        budget.check(config, planned_segments)  # before anything is written
    own = None if paths is None else paths.root  # a resumed run's own entry is not another run
    cap = par.from_main(budget.cap(config, own) if par.is_main else None)  # read before this run records itself
    if paths is None:
        par.barrier()  # every rank checked the ledger before rank 0 records this run in it
        paths = _create_run(config, seed, budget, planned_segments) if par.is_main else RunPaths(Path(config.output))
    journal = par.journal(PrivacyJournal(paths.journal, mechanism.segment))  # rank 0 writes, all wait for it
    budget_spec = Budget(config.delta, config.accountant, None if config.no_dp else config.epsilon, cap)
    model = par.prepare(model)  # every rank from rank 0's weights; --fsdp: then sharded
    step = PrivacyStep(model, mechanism, budget_spec, randomness, journal, reducer=par.reducer(model))
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_optimizer(config.optimizer, trainable, config.lr, config.weight_decay, mechanism)
    step.attach(optimizer)
    stats = {
        "records": len(records),
        "examples": len(data.examples),
        "units": len(units),
        "truncated": data.num_truncated,
        "dropped": data.num_dropped,
        "duplicates": data.num_duplicates,
    }
    run = Run(
        config, paths, model, loaded.tokenizer, data.examples, units, randomness,
        par.sampler(PoissonSampler(len(units), q, randomness)), journal, step, optimizer, budget, planned, stats,
        dtype,
    )  # fmt: skip
    run.par = par
    run.prefix = _prefix_cache(run)
    if config.resume:
        _restore(run)  # every rank reads the same checkpoint
    return run


def _create_run(config: TrainConfig, seed: int | None, budget: DatasetBudget, planned: list[Segment]) -> RunPaths:
    """The run directory, its settings and its planned spend in the ledger (rank 0 only)."""
    paths = create_run_dir(config.output)
    config.save(paths.config)
    _save_state(paths, config, seed)
    budget.record(config, paths.root, planned)
    return paths


def _on(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """A collated batch on the run's device (the same tensors on CPU)."""
    return {k: v.to(device) for k, v in batch.items()}


def _prefix_cache(run: Run) -> PrefixCache | None:
    """With --lora-layers the bottom blocks are frozen: run them once per example, not every epoch.

    Privacy-neutral (each cached state is a function of its own record alone). Skipped where it
    does not apply: no frozen block, dropout below the boundary, an unsupported architecture, or
    states that would not fit in PREFIX_CACHE_BYTES.
    """
    if run.config.full or run.config.lora_layers is None or run.par.fsdp:  # FSDP: the root runs every forward
        return None
    try:
        hidden = run.model.get_input_embeddings().embedding_dim
        kept = [i for unit in run.units.unit_examples for i in unit]  # the examples the run can draw
        if sum(len(run.examples[i].input_ids) for i in kept) * hidden * 4 > PREFIX_CACHE_BYTES:
            return None
        with autocast(run.dtype, run.par.device):
            return PrefixCache.build(run.model, run.examples, only=kept)
    except ConfigError:
        return None


def _adapted(model: torch.nn.Module, c: TrainConfig) -> torch.nn.Module:
    if c.full:
        return model.requires_grad_(True)
    return with_lora(model, c.lora_r, c.lora_alpha, c.lora_targets, last_layers=c.lora_layers)


def _plan_mechanism(c: TrainConfig, q: float, steps: int, n_units: int) -> tuple[Mechanism, int]:
    """The mechanism (σ calibrated to the target ε, or given) and the steps the target allows."""
    if c.no_dp:
        return Mechanism.non_private(q, c.batch_size), steps
    budget = Budget(c.delta, c.accountant, c.epsilon)
    return plan_mechanism(q, c.batch_size, steps, n_units, budget, c.noise_multiplier, c.max_grad_norm)


def _open_run(config: TrainConfig) -> tuple[RunPaths, TrainConfig, int | None]:
    """The run to resume, its saved settings and its unsafe seed; refuse anything that changed."""
    _refuse_resume_options(config)
    paths = RunPaths(Path(config.resume))
    if not paths.config.is_file() or not paths.state.is_file():
        raise DpftError(f"--resume {config.resume}: not a dpft run directory (no config.yaml or private/state.json)")
    if paths.privacy.is_file():
        raise DpftError(f"--resume {config.resume}: this run already finished (privacy.json exists)")
    invocation = {k: getattr(config, k) for k in ("resume", "quiet", "device", "nproc_per_node", "fsdp")}
    saved = replace(TrainConfig.load(paths.config), **invocation)
    state = json.loads(paths.state.read_text())
    if state.get("settings") != settings_hash(saved):
        raise DpftError(f"{paths.config}: changed since the run was created; refusing to resume with other settings")
    if state.get("data") != sha256_file(saved.data):
        raise DpftError(f"--data {saved.data}: changed since the run was created; refusing to resume on other data")
    return paths, saved, state.get("unsafe_seed")


def _refuse_resume_options(config: TrainConfig) -> None:
    """--resume uses the saved settings: any other setting given with it would be silently dropped."""
    defaults = TrainConfig().to_dict()
    given = [k for k, v in config.to_dict().items() if k not in RUN_ONLY and v != defaults[k]]
    if given:
        flags = ", ".join("--" + k.replace("_", "-") for k in given)
        raise ConfigError([f"--resume continues a run with its saved settings; remove {flags}"])


def _save_state(paths: RunPaths, config: TrainConfig, seed: int | None) -> None:
    """Fingerprints of the data and settings (private: a hash of the data stays with the data)."""
    state = {"data": sha256_file(config.data), "settings": settings_hash(config), "unsafe_seed": seed}
    write_json(paths.state, state)


def settings_hash(c: TrainConfig) -> str:
    """Identity of a run's saved settings; a resume or a checkpoint with other settings is refused."""
    return hashlib.sha256(repr(sorted(c.public_dict().items())).encode()).hexdigest()


def _checkpoint(run: Run) -> None:
    """One-process format whatever the parallelism (--fsdp: gathered on every rank, written by rank 0)."""
    weights, optimizer = run.par.full_state(run.model, run.optimizer)
    if not run.par.is_main:
        return
    state = {"step": run.steps_done, "batch_sizes": run.batch_sizes, "config_hash": settings_hash(run.config)}
    ckpt.save_checkpoint(run.paths.checkpoints, run.steps_done, weights, optimizer, state)


def _restore(run: Run) -> None:
    """Continue from the latest checkpoint, or from the base model if none was written.

    Either way the journal keeps every step the lost attempt spent, so they are still accounted,
    and the randomness is fresh (secure mode): the accountant needs the law, not the stream.
    """
    paths = run.paths
    if (paths.checkpoints / "latest").is_file():
        weights, opt_state, state = ckpt.load_checkpoint(paths.checkpoints, settings_hash(run.config))
        params = {n: p for n, p in run.model.named_parameters() if p.requires_grad}
        if set(weights) != set(params):
            raise DpftError(f"{paths.checkpoints}: checkpoint weights do not match the model; refusing to resume")
        run.par.load_state(run.model, run.optimizer, weights, opt_state)
        run.steps_done, run.batch_sizes = state["step"], list(state["batch_sizes"])
    if run.step.mechanism.dp:  # before anything is rewritten
        record = partial(run.budget.record, run.config, paths.root) if run.par.is_main else None
        segment, journal = run.step.mechanism.segment, run.journal.segments()
        reaccount(paths.journal, journal, run.steps_done, run.step.budget, segment, run.planned_steps, record)
    if run.par.is_main:
        truncate_rows(paths.metrics, run.steps_done)  # the steps after the checkpoint are redone
        truncate_rows(paths.train_log, run.steps_done)


def _finish(run: Run, stop_reason: str, model_state: dict | None) -> dict[str, Any]:
    c = run.config
    save_model(run.paths, run.model, run.tokenizer, "full" if c.full else "lora", c.model, model_state)
    report = privacy_report(run, stop_reason)
    write_json(run.paths.data_stats, data_report(run))
    write_model_card(run.paths, report, c.model)
    write_json(run.paths.privacy, report)  # last: privacy.json marks the run complete (the commit point)
    return report
