"""Training configuration: one dataclass, one help string per field.

The CLI flags (`dpft train --help`), the YAML config file and the resolved `config.yaml` saved in
every run directory all derive from `TrainConfig`. `validate()` collects every problem at once and
names the flags, saying why a setting would break the privacy guarantee where it would.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from dpft.atomic_write import write_text_atomic
from dpft.data.encode import LOSS_ON, PRIVACY_UNITS
from dpft.errors import ConfigError
from dpft.models.embedded import EMBEDDED_NAME
from dpft.models.precision import DTYPE_CHOICES, DTYPES
from dpft.privacy.accounting import ACCOUNTANTS
from dpft.training.optimizer import OPTIMIZERS
from dpft.training.schedule import SCHEDULES

# Fields that describe this invocation, not the run's settings: never saved in config.yaml.
RUN_ONLY = ("unsafe_seed", "resume", "quiet", "device", "nproc_per_node", "fsdp")


def _opt(default: Any, help: str, **extra: Any) -> Any:
    return field(default=default, metadata={"help": help, **extra})


@dataclass
class TrainConfig:
    # What to train on, and where to write.
    data: str = _opt("", "Training records: .jsonl, .csv or .parquet (prompt/completion, text or messages).")
    output: str = _opt("", "Run directory to create (model, privacy.json, metrics.jsonl, model card).")
    model: str = _opt(
        EMBEDDED_NAME, "Hugging Face model id or local path; default: the embedded SmolLM2-135M-Instruct."
    )
    # Model and adapters.
    full: bool = _opt(False, "Fine-tune all weights (tied embeddings included) instead of LoRA adapters.")
    lora_r: int = _opt(8, "LoRA rank.")
    lora_alpha: float = _opt(16.0, "LoRA scaling alpha.")
    lora_targets: str = _opt(
        "auto",
        "LoRA target modules: 'auto' (peft's usual ones for the architecture, e.g. q_proj,v_proj or "
        "c_attn, else all linear layers), 'all-linear', or comma-separated module names.",
    )
    lora_layers: int | None = _opt(
        None, "Adapt only the last N transformer blocks (backward stops below them: faster); default all."
    )
    dtype: str = _opt(
        "auto",
        "Compute dtype: auto (bf16 where the hardware does it natively, else fp32), fp32 or bf16 "
        "(autocast matmuls; norms, clipping and noise stay fp32).",
    )
    weights_dtype: str = _opt(
        "fp32",
        "Storage dtype of the weights: fp32 or bf16 (halves memory of --full; the DP noise is still added in fp32).",
    )
    gradient_checkpointing: bool = _opt(
        False,
        "Recompute each transformer block's activations in the backward instead of keeping them (less memory, "
        "about one more forward of time); the clipped gradients and the privacy guarantee are unchanged.",
    )
    # Data encoding.
    max_length: int = _opt(128, "Maximum tokens per example; longer examples are truncated and counted.")
    loss_on: str = _opt("completion", "For prompt/completion records: 'completion' (loss on the answer) or 'all'.")
    # Privacy.
    no_dp: bool = _opt(
        False, "Non-private baseline: same loop and sampling, no clipping, no noise (privacy.json says dp: false)."
    )
    epsilon: float | None = _opt(
        8.0,
        "Target ε: σ is calibrated so the planned steps spend at most this; with --noise-multiplier it is a hard cap.",
    )
    delta: float = _opt(1e-5, "Target δ; at most 0.1/N (well below 1/N), N = the number of privacy units.")
    noise_multiplier: float | None = _opt(None, "Noise multiplier σ; without --epsilon, ε is reported but not capped.")
    max_grad_norm: float = _opt(1.0, "Clipping bound C on each privacy unit's gradient (L2).")
    accountant: str = _opt(
        "pld", "Privacy accountant: pld (default: the smaller of the PLD and RDP upper bounds) or rdp (RDP alone)."
    )
    privacy_unit: str = _opt(
        "record", "Privacy unit: 'record', or 'user' (groups records by user_id: protects whole people)."
    )
    max_records_per_user: int = _opt(
        8, "User-level only: at most this many records per user are used (chosen once per user, at random)."
    )
    unsafe_seed: int | None = _opt(
        None,
        "UNSAFE, for tests and debugging: derive sampling, per-user caps and noise from this seed (reproducible). "
        "The guarantee then holds only against someone who does not know it; privacy.json says so. Default: "
        "fresh OS entropy, never stored.",
    )
    dataset_budget: float | None = _opt(
        None,
        "Refuse the run if the ledger's total ε on this dataset would exceed this, and stop before a step "
        "would (steps redone after a crash).",
    )
    ledger: str | None = _opt(
        None, "Privacy budget ledger file (default: $DPFT_LEDGER or ~/.cache/dpft/ledger.sqlite)."
    )
    # Optimisation.
    batch_size: int | None = _opt(
        None,
        "Expected logical batch (units per step): each unit is sampled with probability batch_size / units. "
        "Default: under DP, from the number of units and --epochs (the largest batch that still gives 64 steps, "
        "at least 32; docs/dp-utility.md says why); without DP, 64.",
    )
    micro_batch_size: int = _opt(8, "Examples per forward/backward pass (memory cap); does not change the privacy.")
    epochs: float = _opt(3.0, "Planned epochs (steps = epochs × units / batch_size).")
    max_steps: int | None = _opt(None, "Planned steps; wins over --epochs when given.")
    lr: float = _opt(5e-3, "Learning rate (the peak, with a schedule).")
    optimizer: str = _opt(
        "adamw",
        "adamw, or dp-adambc: AdamW with the DP noise variance (σC/B)² removed from its second moment "
        "(Tang et al. 2023; post-processing, same guarantee; wants a far smaller --lr).",
    )
    lr_schedule: str = _opt("constant", "Learning-rate schedule: constant, linear or cosine (decay to 0).")
    warmup_steps: int = _opt(0, "Steps of linear learning-rate warmup.")
    weight_decay: float = _opt(0.0, "Decoupled (AdamW) weight decay.")
    seed: int = _opt(0, "Seed of the adapters' initialisation (public; sampling and noise never use it).")
    # Operations.
    checkpoint_every: int = _opt(
        50,
        "Write a resumable checkpoint every N steps (0: never; a resume then restarts from step 0, still accounting every step).",
    )
    resume: str | None = _opt(None, "Resume the run in this directory after a crash (its saved config is used).")
    quiet: bool = _opt(False, "No progress bar.")
    device: str = _opt("auto", "Compute device: auto (CUDA when present, else CPU), cpu, cuda or cuda:N.")
    nproc_per_node: int = _opt(
        1,
        "Data-parallel processes on this node (launched through torch.distributed.run; one GPU each on CUDA, "
        "gloo on CPU). Same privacy: one Poisson draw and one noise draw per step, whatever the count.",
    )
    fsdp: bool = _opt(
        False,
        "With --nproc-per-node N >= 2: shard weights, gradients and optimizer state across the processes "
        "(FSDP2, fully_shard per transformer block) instead of a full copy on each. Same privacy: each "
        "coordinate is noised once, by the process that holds it. Not with --no-dp.",
    )

    def validate(self) -> None:
        """Raise ConfigError listing every invalid setting at once."""
        problems = [p for check in _CHECKS for p in check(self)]
        if problems:
            raise ConfigError(problems)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def public_dict(self) -> dict[str, Any]:
        """The settings that may ship with the model: no seed of the DP randomness, no resume path."""
        return {k: v for k, v in self.to_dict().items() if k not in RUN_ONLY}

    def save(self, path: Path) -> None:
        """Write the public settings atomically (an unsafe seed is kept in the run's private state)."""
        write_text_atomic(Path(path), yaml.safe_dump(self.public_dict(), sort_keys=False))

    @classmethod
    def load(cls, path: Path) -> TrainConfig:
        """Read a YAML config; unknown keys are an error (a typo must not silently change privacy)."""
        try:
            raw = yaml.safe_load(Path(path).read_text()) or {}
        except (OSError, yaml.YAMLError) as err:
            raise ConfigError([f"{path}: cannot read config ({str(err).splitlines()[0]})"]) from None
        if not isinstance(raw, dict):
            raise ConfigError([f"{path}: a config file must be a mapping of option names to values"])
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise ConfigError([f"{path}: unknown option(s) {', '.join(unknown)}"])
        return cls(**raw)


def _check_paths(c: TrainConfig) -> list[str]:
    out = []
    if not c.data:
        out.append("--data is required")
    if not c.output:
        out.append("--output is required")
    return out


def _check_choices(c: TrainConfig) -> list[str]:
    choices = {
        "--dtype": (c.dtype, DTYPE_CHOICES),
        "--weights-dtype": (c.weights_dtype, tuple(DTYPES)),
        "--loss-on": (c.loss_on, LOSS_ON),
        "--accountant": (c.accountant, ACCOUNTANTS),
        "--privacy-unit": (c.privacy_unit, PRIVACY_UNITS),
        "--lr-schedule": (c.lr_schedule, SCHEDULES),
        "--optimizer": (c.optimizer, OPTIMIZERS),
    }
    return [
        f"{flag} must be one of {', '.join(ok)} (got {value!r})"
        for flag, (value, ok) in choices.items()
        if value not in ok
    ]


def _check_numbers(c: TrainConfig) -> list[str]:
    positive = {
        "--lora-r": c.lora_r,
        "--lora-alpha": c.lora_alpha,
        "--max-length": c.max_length,
        "--batch-size": c.batch_size,  # None: chosen from N and the budget (training/auto_batch.py)
        "--micro-batch-size": c.micro_batch_size,
        "--lr": c.lr,
        "--max-records-per-user": c.max_records_per_user,
    }
    out = [
        f"{flag} must be a finite number > 0 (got {v})"
        for flag, v in positive.items()
        if v is not None and not (0 < v < math.inf)
    ]
    if c.max_steps is None and not (c.epochs > 0 and math.isfinite(c.epochs)):
        out.append(f"--epochs must be > 0 (got {c.epochs})")
    if c.max_steps is not None and c.max_steps <= 0:
        out.append(f"--max-steps must be > 0 (got {c.max_steps})")
    if c.lora_layers is not None and c.lora_layers < 1:
        out.append(f"--lora-layers must be >= 1 (got {c.lora_layers})")
    if c.warmup_steps < 0:
        out.append(f"--warmup-steps must be >= 0 (got {c.warmup_steps})")
    if c.fsdp and c.no_dp:
        out.append("--fsdp is built for the DP step only; the --no-dp baseline runs without it")
    if c.checkpoint_every < 0:
        out.append(f"--checkpoint-every must be >= 0 (got {c.checkpoint_every})")
    if not (0 <= c.weight_decay < math.inf):
        out.append(f"--weight-decay must be a finite number >= 0 (got {c.weight_decay})")
    return out


def _check_privacy(c: TrainConfig) -> list[str]:
    if c.no_dp:
        return []
    out = []
    if c.epsilon is None and c.noise_multiplier is None:
        out.append("give --epsilon (target) or --noise-multiplier, or --no-dp for a non-private baseline")
    if c.epsilon is not None and not (0 < c.epsilon < math.inf):
        out.append(f"--epsilon must be a finite number > 0 (got {c.epsilon})")
    if c.noise_multiplier is not None and not (c.noise_multiplier > 0):
        out.append(f"--noise-multiplier must be > 0 (got {c.noise_multiplier}); σ = 0 gives no privacy")
    if not (0 < c.delta < 1):
        out.append(f"--delta must be in (0, 1) (got {c.delta})")
    if not (c.max_grad_norm > 0 and math.isfinite(c.max_grad_norm)):
        out.append(
            f"--max-grad-norm must be a finite number > 0 (got {c.max_grad_norm}); it bounds each unit's influence"
        )
    if c.dataset_budget is not None and not (c.dataset_budget > 0):
        out.append(f"--dataset-budget must be > 0 (got {c.dataset_budget})")
    return out


_CHECKS = (_check_paths, _check_choices, _check_numbers, _check_privacy)
