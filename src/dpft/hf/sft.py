"""`DPSFTTrainer`: TRL's SFTTrainer with the DP-SGD step of `DPTrainer`.

Packing and padding-free batches are refused (they put several units in one row). The training
examples are encoded by dpft from the raw records (loss on assistant turns / completions, for any
chat template), not from TRL's prepared columns; TRL's own preparation still runs for evaluation.
"""

from __future__ import annotations

try:
    from trl import SFTTrainer
except ImportError as err:  # pragma: no cover - depends on the optional extra
    raise ImportError("DPSFTTrainer needs TRL: pip install 'dpft[trl]'") from err

from dpft.hf.trainer import DPTrainerMixin


class DPSFTTrainer(DPTrainerMixin, SFTTrainer):
    """`trl.SFTTrainer` with DP-SGD: pass `privacy_args=PrivacyArguments(...)` next to `args` (an SFTConfig)."""
