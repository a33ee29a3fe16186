"""`PrivacyArguments`: the privacy settings a Trainer user adds to their `TrainingArguments`."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from dpft.data.encode import LOSS_ON, PRIVACY_UNITS
from dpft.errors import ConfigError
from dpft.privacy.accounting import ACCOUNTANTS


@dataclass
class PrivacyArguments:
    """What `DPTrainer` / `DPSFTTrainer` need beyond the Trainer's own arguments.

    The Trainer's `per_device_train_batch_size` is the micro-batch (memory only); the logical batch
    is `expected_batch_size` units, Poisson-sampled. `TrainingArguments.max_grad_norm` is not used:
    the DP clip bound is `max_grad_norm` here, applied per privacy unit.
    """

    target_epsilon: float | None = field(default=8.0, metadata={"help": "Target ε (required: the hard stop)."})
    delta: float = field(default=1e-5, metadata={"help": "Target δ, at most 0.1/N (N: the privacy units)."})
    noise_multiplier: float | None = field(
        default=None, metadata={"help": "σ; default: calibrated so the planned steps spend target_epsilon."}
    )
    max_grad_norm: float = field(default=1.0, metadata={"help": "Clip bound C of each privacy unit's gradient."})
    expected_batch_size: int = field(default=64, metadata={"help": "Expected logical batch B (units per step)."})
    privacy_unit: str = field(default="record", metadata={"help": "'record' or 'user' (records grouped by user)."})
    user_column: str = field(default="user_id", metadata={"help": "The column naming the user (privacy_unit=user)."})
    max_records_per_user: int = field(default=8, metadata={"help": "User level: at most this many records per user."})
    accountant: str = field(default="pld", metadata={"help": "Privacy accountant: pld or rdp."})
    max_length: int | None = field(
        default=None, metadata={"help": "Tokens per example (default: the config's max_length, else 128)."}
    )
    loss_on: str = field(
        default="completion", metadata={"help": "'completion' (answers, assistant turns) or 'all' tokens."}
    )
    dataset_budget: float | None = field(
        default=None,
        metadata={
            "help": "Largest total ε on this train_dataset over every run in the budget ledger "
            "($DPFT_LEDGER); a run that would pass it is refused before it starts, and a step that would "
            "(one redone after a crash) is not taken."
        },
    )
    unsafe_seed: int | None = field(
        default=None, metadata={"help": "UNSAFE, tests only: derive sampling and noise from this seed."}
    )
    log_private_diagnostics: bool = field(
        default=False, metadata={"help": "Send the training loss to Trainer.log / report_to (not covered by DP)."}
    )

    def problems(self) -> list[str]:
        """Every invalid setting, in the user's words (field names)."""
        out = []
        if self.target_epsilon is None:
            out.append(
                "PrivacyArguments.target_epsilon is required: without a target nothing stops max_steps "
                "from spending an unbounded ε"
            )
        elif not (0 < self.target_epsilon < math.inf):
            out.append(f"PrivacyArguments.target_epsilon must be a finite number > 0 (got {self.target_epsilon})")
        if self.noise_multiplier is not None and not (self.noise_multiplier > 0):
            out.append(f"PrivacyArguments.noise_multiplier must be > 0 (got {self.noise_multiplier})")
        if not (0 < self.delta < 1):
            out.append(f"PrivacyArguments.delta must be in (0, 1) (got {self.delta})")
        if not (self.max_grad_norm > 0 and math.isfinite(self.max_grad_norm)):
            out.append(f"PrivacyArguments.max_grad_norm must be a finite number > 0 (got {self.max_grad_norm})")
        if not self.expected_batch_size >= 1:
            out.append(f"PrivacyArguments.expected_batch_size must be >= 1 (got {self.expected_batch_size})")
        if self.privacy_unit not in PRIVACY_UNITS:
            out.append(f"PrivacyArguments.privacy_unit must be 'record' or 'user' (got {self.privacy_unit!r})")
        if self.accountant not in ACCOUNTANTS:
            out.append(f"PrivacyArguments.accountant must be one of {', '.join(ACCOUNTANTS)} (got {self.accountant!r})")
        if self.loss_on not in LOSS_ON:
            out.append(f"PrivacyArguments.loss_on must be one of {', '.join(LOSS_ON)} (got {self.loss_on!r})")
        if self.max_records_per_user < 1:
            out.append(f"PrivacyArguments.max_records_per_user must be >= 1 (got {self.max_records_per_user})")
        if self.dataset_budget is not None and not (0 < self.dataset_budget < math.inf):
            out.append(f"PrivacyArguments.dataset_budget must be a finite number > 0 (got {self.dataset_budget})")
        if self.max_length is not None and self.max_length < 2:
            out.append(f"PrivacyArguments.max_length must be >= 2 (got {self.max_length})")
        return out

    def validate(self) -> None:
        """Raise ConfigError listing every invalid setting at once."""
        if problems := self.problems():
            raise ConfigError(problems)
