"""DP-SGD inside the Hugging Face `Trainer` loop, through the same `PrivacyStep` as `dpft train`.

Each optimizer step of the Trainer is one logical DP-SGD step:

    loader yields step t (only while one more step stays within the target ε: the hard stop)
    training_step:  PrivacyStep.begin(t) → Poisson sample of units → micro-batches
                    (per_device_train_batch_size examples, a unit never split) → per-example losses
                    → PrivacyStep.backward → PrivacyStep.finish (noise once, ÷ expected batch)
    Trainer:        optimizer.step() (guarded by the PrivacyStep hooks) → scheduler → callbacks,
                    logging, saving

The Trainer's own sampler, gradient accumulation, global clipping, batch-mean loss and DDP wrapper
are never used; settings that would bring them back are refused (`refuse_unsafe`). Losses stay private:
trackers see ε, the step and the learning rate, unless `log_private_diagnostics=True`.
When `train()` starts, before any data is read, the run is checked against
`PrivacyArguments.dataset_budget` and recorded in the dataset budget ledger with its planned spend
(as `dpft train` does; the fingerprint is `dpft.hf.budget.dataset_fingerprint`), and the public
settings (`dpft-trainer.json`, never a seed of the DP randomness) and private/state.json are
written; at the end the ledger entry is replaced by the privacy journal's steps, and the rest of
the run directory layout of `dpft train` is written into `output_dir`: model/ (weights, tokenizer,
model card), privacy.json, metrics.jsonl and private/ (journal, train log, data stats).

Checkpoints (save_strategy / save_steps) are dpft's (`training/checkpoint.py`: private/checkpoints,
atomic, checksummed, the newest only), not the Trainer's checkpoint-N folders. `train(
resume_from_checkpoint=True)` (or output_dir) on a trainer built again with the same data and
settings continues from the newest one, as `dpft train --resume` does: the journal keeps every step
that touched the data, a journalled step that never completed included, and the hard stop composes
it. Under torchrun (args.world_size > 1) the step is spread as `dpft train` spreads it
(`training/distributed.py`): one Poisson draw made on rank 0, the units split across ranks, one
all-reduce of the clipped sums, noise once on rank 0, rank 0 alone writes.
"""

from __future__ import annotations

import inspect
import math
import os
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader
from transformers import Trainer
from transformers.trainer_utils import TrainOutput

from dpft.data import collate
from dpft.data.encode import EncodedDataset
from dpft.errors import ConfigError
from dpft.hf.arguments import PrivacyArguments
from dpft.hf.budget import TrainerBudget, dataset_fingerprint
from dpft.hf.data import encode_dataset
from dpft.hf.resume import TRAINER_CONFIG, check_resumable, holds_run, settings_hash
from dpft.ledger import BudgetLedger
from dpft.models import precision
from dpft.models.probe import check_trainable
from dpft.models.rope import check_rope
from dpft.privacy.accounting import Segment
from dpft.privacy.randomness import Randomness
from dpft.privacy.sampling import PoissonSampler, PrivacyUnits, sample_rate_for
from dpft.privacy.step import Budget, Mechanism, PrivacyStep, plan_mechanism
from dpft.run_layout import RunPaths
from dpft.training import checkpoint as ckpt
from dpft.training.budget import reaccount
from dpft.training.distributed import Parallel
from dpft.training.journal import PrivacyJournal
from dpft.training.loss import example_losses
from dpft.training.report import data_report, privacy_report
from dpft.training.run_dir import (
    PRIVATE_README,
    save_model,
    truncate_rows,
    write_json,
    write_model_card,
)
from dpft.training.step_log import StepLog

# What trackers may see without `log_private_diagnostics`: data-independent or DP quantities.
PUBLIC_LOG_KEYS = frozenset(
    {"epsilon", "learning_rate", "epoch", "train_runtime", "train_samples_per_second", "train_steps_per_second"}
)
DEFAULT_MAX_LENGTH = 128
# The TrainingArguments that shape the DP run (all set by the user, none computed from the data).
PUBLIC_TRAINING_ARGS = (
    "learning_rate", "lr_scheduler_type", "lr_scheduler_kwargs", "warmup_steps", "warmup_ratio", "weight_decay",
    "optim", "adam_beta1", "adam_beta2", "adam_epsilon", "per_device_train_batch_size", "max_steps",
    "num_train_epochs", "bf16", "seed",
)  # fmt: skip


@dataclass
class _DPState:
    """The DP parts of one run (the `run` that `privacy_report` and `data_report` read)."""

    paths: RunPaths
    data: EncodedDataset
    units: PrivacyUnits
    randomness: Randomness
    sampler: PoissonSampler
    mechanism: Mechanism
    budget: Budget
    planned_steps: int
    ledger: TrainerBudget
    planned_segments: list[Segment]
    par: Parallel  # this process's rank (one process: the identity); rank 0 alone writes
    settings_hash: str = ""  # of the public settings: state.json and every checkpoint hold it
    started: bool = False  # the run directory exists and the ledger holds the planned spend
    resumed: dict | None = None  # the checkpoint's optimizer and scheduler states, until loaded
    step: PrivacyStep | None = None
    journal: PrivacyJournal | None = None
    steps_done: int = 0
    batch_sizes: list[int] = field(default_factory=list)  # private: realised Poisson draws
    stop_reason: str = "completed the planned steps"
    finished: bool = False


class DPTrainerMixin:
    """The DP-SGD parts shared by `DPTrainer` and `DPSFTTrainer` (put it first in the bases)."""

    def __init__(self, *args: Any, privacy_args: PrivacyArguments | None = None, **kwargs: Any):
        privacy = privacy_args or PrivacyArguments()
        bound = inspect.signature(super().__init__).bind(*args, **kwargs).arguments
        refuse_unsafe(type(self), bound, privacy)  # before the parent tokenizes or loads anything
        output = Path(bound["args"].output_dir)
        existed = output.exists()
        super().__init__(*args, **kwargs)  # creates output_dir
        self.privacy_args = privacy
        try:
            self._dp = self._plan(bound.get("train_dataset"))
        except BaseException:
            if not existed and output.is_dir() and not any(output.iterdir()):
                output.rmdir()  # a refused run leaves no run directory
            raise

    # ---- setup ----

    def _plan(self, raw_train: Any) -> _DPState:
        """Encode the data, group it into units and plan the mechanism (σ, q, steps)."""
        p, args = self.privacy_args, self.args
        paths = RunPaths(Path(args.output_dir))
        par = _parallel(args)
        randomness = Randomness.secure() if p.unsafe_seed is None else Randomness.unsafe_seeded(p.unsafe_seed)
        length = p.max_length or getattr(args, "max_length", None) or DEFAULT_MAX_LENGTH
        check_rope(getattr(self.model, "config", None), length)  # its frequencies must not follow the batch
        data = encode_dataset(raw_train, self.processing_class, p, length)
        cap = p.max_records_per_user if p.privacy_unit == "user" else None
        units = par.agreed_units(PrivacyUnits(data.unit_examples, data.unit_ids, cap, randomness))
        units.micro_batches(range(len(units)), args.per_device_train_batch_size)  # a unit too big fails now
        q = sample_rate_for(p.expected_batch_size, len(units))
        planned = (
            args.max_steps
            if args.max_steps > 0
            else math.ceil(args.num_train_epochs * len(units) / p.expected_batch_size)
        )
        planned = max(1, planned)
        budget = Budget(p.delta, p.accountant, p.target_epsilon)
        mechanism, allowed = plan_mechanism(
            q, p.expected_batch_size, planned, len(units), budget, p.noise_multiplier, p.max_grad_norm
        )
        sampler = par.sampler(PoissonSampler(len(units), q, randomness))
        fingerprint = dataset_fingerprint(raw_train)  # once: the ledger key of this run's data
        ledger = TrainerBudget(BudgetLedger(), fingerprint, p.delta, p.accountant, p.privacy_unit, cap)
        planned_segments = [
            Segment(q, mechanism.noise_multiplier, min(planned, allowed))
        ]  # the hard stop caps the run there
        check_trainable(self.model, len(self.processing_class))  # as `dpft train`: before the ledger and the run
        if not holds_run(paths):  # an existing run can only be resumed: its spend is in the ledger already
            ledger.check(planned_segments, p.dataset_budget)  # early; train() checks again before writing
        return _DPState(
            paths, data, units, randomness, sampler, mechanism, budget, planned, ledger, planned_segments, par
        )

    def _start_run(self) -> None:
        """Before any data is read: check the budget, write the run's settings and record its planned spend.

        Raises:
            ConfigError: output_dir already holds a dpft run.
            BudgetExceededError: the ledger (as it is now) plus this run would pass dataset_budget.
        """
        dp, p = self._dp, self.privacy_args
        if holds_run(dp.paths):
            raise ConfigError(
                [f"output_dir {dp.paths.root} already holds a dpft run; give a new output_dir, or continue that "
                 "run with train(resume_from_checkpoint=True)"]
            )  # fmt: skip
        dp.ledger.check(dp.planned_segments, p.dataset_budget)  # the ledger may have grown since __init__
        cap = dp.ledger.cap(p.dataset_budget, None) if dp.par.is_main else None
        dp.budget = replace(dp.budget, dataset=dp.par.from_main(cap))  # the hard stop: other runs, read once
        settings = self.public_settings()
        dp.settings_hash = settings_hash(settings)
        dp.par.barrier()  # every rank has checked before rank 0 writes
        if dp.par.is_main:
            dp.paths.private.mkdir(parents=True, exist_ok=True)
            (dp.paths.private / "README.txt").write_text(PRIVATE_README)
            write_json(dp.paths.root / TRAINER_CONFIG, settings)
            state = {"data": dp.ledger.fingerprint, "settings": dp.settings_hash, "unsafe_seed": p.unsafe_seed}
            write_json(dp.paths.state, state)
            dp.ledger.record(dp.paths.root, dp.planned_segments)
        dp.started = True

    def _reopen_run(self) -> None:
        """Continue the unfinished run in output_dir from its newest checkpoint (or its start, if none).

        The journal is not touched: the steps the lost attempt journalled stay accounted, those it
        never completed included, and the hard stop composes them. Before any data is read the
        run's ledger entry becomes the journal's steps plus the steps still planned (conservative,
        as at the start), and the journal's steps alone when this attempt ends. The redone steps can
        take the journal past the spend planned (and checked) at the start, so dataset_budget is a
        hard stop too: the other runs, read here once, composed with the journal plus one step.

        Raises:
            ConfigError: No unfinished run, or other data, settings or randomness (`check_resumable`),
                or a journal with fewer steps than the checkpoint (`check_covers`, through `reaccount`).
            CheckpointError: A checkpoint that is corrupted or from other settings.
            BudgetExceededError: The other runs and the journal already pass dataset_budget.
        """
        dp = self._dp
        settings = self.public_settings()
        check_resumable(dp.paths, dp.ledger.fingerprint, settings, self.privacy_args.unsafe_seed)
        dp.settings_hash = settings_hash(settings)
        if (dp.paths.checkpoints / "latest").is_file():
            dp.resumed, state = ckpt.restore_training(dp.paths.checkpoints, dp.settings_hash, self.model)
            dp.steps_done, dp.batch_sizes = state["step"], list(state["batch_sizes"])
        journal = PrivacyJournal(dp.paths.journal, dp.mechanism.segment)
        spent = dp.par.from_main(journal.segments() if dp.par.is_main else None)  # rank 0's file, as it writes it
        cap = dp.par.from_main(
            dp.ledger.cap(self.privacy_args.dataset_budget, dp.paths.root) if dp.par.is_main else None
        )
        dp.budget = replace(dp.budget, dataset=cap)
        record = partial(dp.ledger.record, dp.paths.root) if dp.par.is_main else None
        reaccount(dp.paths.journal, spent, dp.steps_done, dp.budget, dp.mechanism.segment, dp.planned_steps, record)
        dp.par.barrier()  # every rank has read the checkpoint before rank 0 trims the logs
        if dp.par.is_main:
            truncate_rows(dp.paths.metrics, dp.steps_done)  # the steps after the checkpoint are redone
            truncate_rows(dp.paths.train_log, dp.steps_done)
        dp.started = True

    def public_settings(self) -> dict[str, Any]:
        """dpft-trainer.json: the privacy arguments (never `unsafe_seed`) and the TrainingArguments that
        shape the run; nothing computed from the data."""
        privacy = {k: v for k, v in vars(self.privacy_args).items() if k != "unsafe_seed"}
        training = {}
        for name in PUBLIC_TRAINING_ARGS:
            value = getattr(self.args, name, None)
            value = getattr(value, "value", value)  # enums (lr_scheduler_type, optim) by their value
            if value is None or isinstance(value, bool | int | float | str | dict | list):
                training[name] = value
        return {"trainer": type(self).__name__, "privacy": privacy, "training": training}

    def create_optimizer(self, model: Any = None) -> torch.optim.Optimizer:
        """The Trainer's optimizer, guarded: it steps only after a PrivacyStep.finish()."""
        optimizer = super().create_optimizer(model) if model is not None else super().create_optimizer()
        dp = self._dp
        if dp.step is None and dp.started:  # train() attaches the guard (an earlier call has no run yet)
            dp.journal = dp.par.journal(PrivacyJournal(dp.paths.journal, dp.mechanism.segment))  # rank 0 writes
            reducer = dp.par.reducer(self.model)
            dp.step = PrivacyStep(self.model, dp.mechanism, dp.budget, dp.randomness, dp.journal, reducer=reducer)
            dp.step.attach(self.optimizer)
            if dp.resumed is not None:
                self.optimizer.load_state_dict(dp.resumed["optimizer"])
        return optimizer

    def create_scheduler(self, num_training_steps: int, optimizer: Any = None) -> Any:
        """The Trainer's scheduler; a resumed run's continues from its checkpoint."""
        scheduler = super().create_scheduler(num_training_steps, optimizer)
        if self._dp.resumed is not None:
            scheduler.load_state_dict(self._dp.resumed.pop("lr_scheduler"))
        return scheduler

    def _init_training_state(self, *args: Any, **kwargs: Any) -> tuple:
        """The Trainer's fresh state, at the step a resumed run continues from (0 for a new run)."""
        out = super()._init_training_state(*args, **kwargs)
        self.state.global_step = self._dp.steps_done
        return out

    def _prepare_for_training(self, max_steps: int, train_dataloader: Any, resume_from_checkpoint: Any) -> tuple:
        """Several processes: the model is NOT wrapped in DistributedDataParallel.

        DDP's hooks would all-reduce every backward's gradients (unclipped, before the noise) and wait
        for the same number of backwards on every rank, which the ranks' shares of a Poisson batch do
        not have. dpft's `AllReduceSums` reduces the clipped sums once per step instead; accelerate
        only places the model and applies autocast (`evaluation_mode=True`: no DDP).
        """
        if not self._dp.par.distributed:
            return super()._prepare_for_training(max_steps, train_dataloader, resume_from_checkpoint)
        self.create_optimizer()
        model = self.accelerator.prepare_model(self.model, evaluation_mode=True)
        self.optimizer = self.accelerator.prepare(self.optimizer)
        self.create_scheduler(num_training_steps=max_steps)
        self.model_wrapped = model
        for attr in ("model", "optimizer", "lr_scheduler"):
            setattr(self.callback_handler, attr, getattr(self, attr))
        self.callback_handler.train_dataloader = train_dataloader
        return model, train_dataloader

    def _save_checkpoint(self, model: Any, trial: Any) -> None:
        """dpft's checkpoint (private/checkpoints: weights, optimizer, scheduler, the loop's private state)."""
        dp = self._dp
        if not dp.par.is_main:
            return
        state = {"step": dp.steps_done, "batch_sizes": dp.batch_sizes, "config_hash": dp.settings_hash}
        payload = {"optimizer": self.optimizer.state_dict(), "lr_scheduler": self.lr_scheduler.state_dict()}
        ckpt.save_training(dp.paths.checkpoints, dp.steps_done, self.model, payload, state)

    # ---- the loop ----

    def get_train_dataloader(self) -> _StepLoader:
        """One item per logical step: the batch itself is drawn in `training_step`, after the journal."""
        return _StepLoader(self)

    def get_eval_dataloader(self, eval_dataset: Any = None) -> Any:
        """Held-out records are encoded as the training records are (pre-tokenized ones go to the Trainer)."""
        if isinstance(eval_dataset, str):
            dataset = self.eval_dataset[eval_dataset]
        else:
            dataset = eval_dataset if eval_dataset is not None else self.eval_dataset
        if dataset is None or "input_ids" in set(getattr(dataset, "column_names", None) or ["input_ids"]):
            return super().get_eval_dataloader(eval_dataset)
        p = replace(self.privacy_args, privacy_unit="record")
        length = p.max_length or getattr(self.args, "max_length", None) or DEFAULT_MAX_LENGTH
        examples = encode_dataset(dataset, self.processing_class, p, length).examples
        pad = self.processing_class.pad_token_id
        return DataLoader(examples, batch_size=self.args.eval_batch_size, collate_fn=lambda rows: collate(rows, pad))

    def set_initial_training_values(self, args: Any, dataloader: Any) -> tuple:
        """The planned DP steps, in one epoch (the Trainer's epoch arithmetic assumes its own sampler)."""
        n, b, t = len(self._dp.units), self.privacy_args.expected_batch_size, self._dp.planned_steps
        return 1, t, n, t * b, b, t, t

    def training_step(self, model: torch.nn.Module, inputs: dict[str, Any], num_items_in_batch: Any = None):
        """Logical step t: journal → Poisson batch → micro-batches → clipped sum → noise → ÷ B."""
        dp = self._dp
        log = StepLog(self.privacy_args.max_grad_norm)
        t = int(inputs["dp_step"])
        lr = self._get_learning_rate()
        model.train()
        dp.step.begin(t)  # the hard stop and the journal line come before any data is read
        units = dp.sampler.sample(t)  # several processes: drawn on rank 0, the same on every rank
        mine = dp.par.local_units(units, dp.units.unit_examples, dp.data.examples)  # all of them in one process
        pad = self.processing_class.pad_token_id
        for examples, unit_index in dp.units.micro_batches(mine, self.args.per_device_train_batch_size):
            batch = collate([dp.data.examples[i] for i in examples], pad)
            batch = {k: v.to(self.args.device) for k, v in batch.items()}
            with self.compute_loss_context_manager():
                per_example = self.example_losses(model, batch)
            log.add(per_example, dp.step.backward(per_example, unit_index.to(per_example.device)))
        dp.step.finish()  # several processes: noise on rank 0 only, then one all-reduce of the clipped sums
        dp.steps_done = t + 1
        dp.batch_sizes.append(len(units))
        loss = log.write(dp.par, dp.paths, t + 1, dp.step.epsilon, lr, len(units), dp.units.examples_of(units))
        shown = loss if self.privacy_args.log_private_diagnostics and not math.isnan(loss) else 0.0
        return torch.tensor(shown, device=self.args.device)

    def example_losses(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """(B,) losses, each example's mean over its own target tokens (never a batch mean)."""
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        return example_losses(logits, batch["labels"])

    def _clip_grad_norm(self, model: Any) -> None:
        return None  # the DP clip is per unit, in PrivacyStep; a global clip would rescale the noise

    def _get_grad_norm(self, model: Any, grad_norm: Any = None) -> None:
        return None

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Send trackers public quantities only (ε, step, lr) unless private diagnostics were asked for."""
        if not self.privacy_args.log_private_diagnostics:
            logs = {k: v for k, v in logs.items() if k in PUBLIC_LOG_KEYS or k.startswith(("eval_", "test_"))}
        if self._dp.step is not None:
            logs["epsilon"] = self._dp.step.epsilon
        super().log(logs, start_time)

    def train(self, resume_from_checkpoint: Any = None, trial: Any = None, **kwargs: Any) -> TrainOutput:
        """Train to the planned steps or the budget, whichever comes first; then write the run directory.

        Args:
            resume_from_checkpoint: True (or output_dir): continue the unfinished run in output_dir
                from its newest dpft checkpoint, with the same data and settings (see `_reopen_run`).
            trial: Passed to the Trainer (a search needs model_init, which is refused: each trial would spend
                budget on the same data).
        """
        dp = self._dp
        if dp.finished or dp.started:
            raise ConfigError(["DPTrainer.train() runs once per trainer; build a new trainer (and output_dir)"])
        if self._resume_requested(resume_from_checkpoint):
            self._reopen_run()
        else:
            self._start_run()
        dp.par.sync_parameters(self.model)  # every rank starts from rank 0's weights
        try:
            output = super().train(trial=trial, **kwargs)
        finally:
            if dp.step is not None:
                dp.step.remove()
            if dp.journal is not None and dp.par.is_main:  # the steps that touched the data, each journaled first
                dp.ledger.record(dp.paths.root, dp.journal.segments())
        self._write_run()
        loss = output.training_loss if self.privacy_args.log_private_diagnostics else math.nan
        metrics = {k: v for k, v in output.metrics.items() if k in PUBLIC_LOG_KEYS}
        return TrainOutput(output.global_step, loss, {**metrics, "epsilon": self._dp.step.epsilon})

    def _resume_requested(self, value: Any) -> bool:
        if value is None or value is False:
            return False
        if value is True or Path(value).resolve() == self._dp.paths.root.resolve():
            return True
        raise ConfigError(
            [f"resume_from_checkpoint={str(value)!r}: DPTrainer resumes the run in output_dir from its own "
             "checkpoint (private/checkpoints); pass True or output_dir"]
        )  # fmt: skip

    # ---- the run directory ----

    @property
    def privacy_report(self) -> dict[str, Any]:
        """privacy.json's content (the same keys `dpft train` writes)."""
        return privacy_report(self._report_view(), self._dp.stop_reason)

    def _report_view(self) -> SimpleNamespace:
        p, dp = self.privacy_args, self._dp
        dtype = "bf16" if uses_bf16(self.args) else "fp32"
        weights = next((str(x.dtype) for x in self.model.parameters()), "")
        config = SimpleNamespace(
            delta=p.delta,
            epsilon=p.target_epsilon,
            accountant=p.accountant,
            privacy_unit=p.privacy_unit,
            max_records_per_user=p.max_records_per_user,
            dtype=dtype,
            weights_dtype="bf16" if weights == "torch.bfloat16" else "fp32",
        )
        stats = {
            "records": len(dp.data.examples) + dp.data.num_dropped,
            "examples": len(dp.data.examples),
            "units": len(dp.units),
            "truncated": dp.data.num_truncated,
            "dropped": dp.data.num_dropped,
            "duplicates": dp.data.num_duplicates,
        }
        return SimpleNamespace(
            config=config, step=dp.step, journal=dp.journal, steps_done=dp.steps_done, units=dp.units,
            planned_steps=dp.planned_steps, randomness=dp.randomness, batch_sizes=dp.batch_sizes, stats=stats,
        )  # fmt: skip

    def _write_run(self) -> None:
        dp = self._dp
        if dp.par.is_main:
            model = self.accelerator.unwrap_model(self.model)
            peft = getattr(model, "peft_config", None)
            base = peft["default"].base_model_name_or_path if peft else getattr(model, "name_or_path", "")
            save_model(dp.paths, model, self.processing_class, "lora" if peft else "full", str(base))
            report = self.privacy_report
            report["trainer"] = type(self).__name__
            write_json(dp.paths.data_stats, data_report(self._report_view()))
            write_model_card(dp.paths, report, str(base))
            write_json(dp.paths.privacy, report)  # last: privacy.json marks the run complete
        dp.par.barrier()  # the other ranks return once rank 0 has written privacy.json
        dp.finished = True


class _StepLoader:
    """Yields {"dp_step": t} for the planned steps while one more step stays within the target ε."""

    def __init__(self, trainer: DPTrainerMixin):
        self._trainer = trainer

    def __len__(self) -> int:
        return self._trainer._dp.planned_steps

    def __iter__(self):
        trainer = self._trainer
        dp = trainer._dp
        for t in range(trainer.state.global_step, dp.planned_steps):
            limit = dp.step.exceeded_limit()  # target_epsilon, and dataset_budget with the other runs
            if limit is not None:
                dp.stop_reason = f"stopped at the privacy budget: one more step would exceed {limit}"
                trainer.control.should_training_stop = True
                return
            yield {"dp_step": t}


def refuse_unsafe(cls: type, bound: dict[str, Any], privacy: PrivacyArguments) -> None:
    """Refuse, before training, every setting that would void or silently change the guarantee.

    Raises:
        ConfigError: listing every problem at once.
    """
    problems = privacy.problems()
    args = bound.get("args")
    if args is None:
        problems.append("DPTrainer needs explicit TrainingArguments (args=...), with an output_dir")
    else:
        strategy = getattr(args, "train_sampling_strategy", "random")
        if getattr(args, "group_by_length", False) or strategy == "group_by_length":
            problems.append("group_by_length: batches must be Poisson samples of units, not grouped by length")
        elif strategy not in ("random", None):
            problems.append(f"train_sampling_strategy={strategy!r}: the batches are dpft's Poisson samples of units")
        if args.gradient_accumulation_steps > 1:
            problems.append(
                "gradient_accumulation_steps > 1: the logical batch is PrivacyArguments.expected_batch_size, "
                "micro-batched by per_device_train_batch_size; set gradient_accumulation_steps=1"
            )
        if getattr(args, "packing", False):
            problems.append("packing=True: packed sequences mix privacy units, so a unit's gradient cannot be clipped")
        if getattr(args, "padding_free", False):
            problems.append("padding_free=True: sequences concatenated in one row cannot be clipped per unit")
        problems += _precision_problems(args)
        if getattr(args, "neftune_noise_alpha", None) is not None:
            problems.append(
                "neftune_noise_alpha: NEFTune's embedding noise scales with the micro-batch's padded width, so one "
                "unit's gradient depends on the other units; unset it"
            )
        if args.include_num_input_tokens_seen not in ("no", False):
            problems.append("include_num_input_tokens_seen: the realised token count is private; set it to 'no'")
        if args.label_smoothing_factor > 0:
            problems.append("label_smoothing_factor > 0: the per-example loss is the plain next-token NLL")
        if args.auto_find_batch_size:
            problems.append("auto_find_batch_size: set per_device_train_batch_size (the micro-batch) explicitly")
        if args.fsdp or args.deepspeed:
            problems.append(
                "fsdp / deepspeed: DPTrainer's data parallelism is dpft's own (torchrun, one all-reduce of the "
                "clipped sums, noise once); sharded training is not built"
            )
        if args.n_gpu > 1:
            problems.append("several GPUs in one process (nn.DataParallel): launch one process per GPU with torchrun")
        if args.load_best_model_at_end:
            problems.append("load_best_model_at_end: DPTrainer keeps only its newest checkpoint (private/checkpoints)")
    if bound.get("compute_loss_func") is not None:
        problems.append("compute_loss_func: DP needs each example's own loss (dpft's example_losses)")
    if bound.get("formatting_func") is not None:
        problems.append(
            "formatting_func: the training records are encoded by dpft (prompt/completion, text or messages); "
            "format the dataset before passing it"
        )
    if bound.get("model_init") is not None:
        problems.append("model_init (hyperparameter search): each trial would spend budget on the same data")
    loop = ("_get_train_sampler", "get_train_dataloader", "training_step", "_clip_grad_norm")
    for name in (*loop, "_prepare_for_training"):  # the last keeps DDP's unclipped all-reduce out
        if getattr(cls, name) is not getattr(DPTrainerMixin, name, getattr(Trainer, name)):
            problems.append(f"{cls.__name__} overrides {name}: the DP sampler and step must not be replaced")
    train, evals = bound.get("train_dataset"), bound.get("eval_dataset")
    evals = list(evals.values()) if isinstance(evals, dict) else [evals]
    if train is not None and any(e is not None and _same_data(e, train) for e in evals):
        problems.append("eval_dataset is the training set: its losses are not covered by DP; evaluate on held-out data")
    if problems:
        raise ConfigError(problems)


def _precision_problems(args: Any) -> list[str]:
    """fp16 and fp8 never; bf16 only where it is native."""
    if args.fp16:
        return ["fp16=True: the loss scaler rescales gradients after the noise; use fp32, or bf16 where it is native"]
    modes = _mixed_precision(args)
    if any(mode not in ("no", "bf16") for mode in modes):
        return [
            f"ACCELERATE_MIXED_PRECISION / TrainingArguments.mixed_precision = {'/'.join(sorted(set(modes)))}: fp16's "
            "loss scaler rescales gradients after the noise and fp8 swaps nn.Linear after dpft attached; unset it "
            "(or 'bf16' where bf16 is native)"
        ]
    if uses_bf16(args) and not precision.native_bf16(args.device):
        setting = "bf16=True" if args.bf16 else "ACCELERATE_MIXED_PRECISION=bf16"
        return [
            f"{setting}: {args.device.type} has no native bf16 here (it would be emulated, slower than fp32, with "
            "no tested gain); set bf16=False and unset ACCELERATE_MIXED_PRECISION to train in fp32 (TRL's SFTConfig "
            "turns bf16 on by default; bf16=dpft.models.precision.native_bf16() chooses from the hardware)"
        ]
    return []


def _mixed_precision(args: Any) -> list[str]:
    """accelerate's mixed precision: what the Trainer passes it (transformers 5 reads
    ACCELERATE_MIXED_PRECISION into `args.mixed_precision` when fp16 and bf16 are unset), and the
    variable itself (what accelerate reads when nothing is passed)."""
    found = [getattr(args, "mixed_precision", None), os.environ.get("ACCELERATE_MIXED_PRECISION")]
    return [str(mode).lower() for mode in found if mode is not None]


def uses_bf16(args: Any) -> bool:
    """bf16 autocast: asked for by `bf16=True` or by accelerate's mixed precision."""
    return bool(args.bf16) or next(iter(_mixed_precision(args)), "no") == "bf16"


def _parallel(args: Any) -> Parallel:
    """One process, or this rank of a torchrun launch (the Trainer's arguments joined the process group)."""
    if args.world_size <= 1:
        return Parallel(device=args.device)
    return Parallel(dist.get_rank(), dist.get_world_size(), args.device)


def _same_data(a: Any, b: Any) -> bool:
    if a is b:
        return True
    fingerprint = getattr(a, "_fingerprint", None)
    return fingerprint is not None and fingerprint == getattr(b, "_fingerprint", None)


class DPTrainer(DPTrainerMixin, Trainer):
    """`transformers.Trainer` with DP-SGD: pass `privacy_args=PrivacyArguments(...)` next to `args`.

    The train_dataset holds records (prompt/completion, text or messages, as for `dpft train`) or
    pre-tokenized rows (input_ids, optional labels); `processing_class` is the tokenizer.
    """
