"""Differential privacy in the user's own training script: Trainer and TRL SFTTrainer drop-ins.

    from dpft.hf import DPTrainer, PrivacyArguments
    trainer = DPTrainer(model=model, args=TrainingArguments(...), train_dataset=records,
                        processing_class=tokenizer, privacy_args=PrivacyArguments(target_epsilon=8.0))
    trainer.train()   # writes privacy.json, the model card and the journal into output_dir

`DPSFTTrainer` (TRL's SFTTrainer) needs `pip install dpft[trl]`.
"""

from __future__ import annotations

from typing import Any

from dpft.hf.arguments import PrivacyArguments

__all__ = ["DPSFTTrainer", "DPTrainer", "PrivacyArguments"]


def __getattr__(name: str) -> Any:
    if name == "DPTrainer":
        from dpft.hf.trainer import DPTrainer

        return DPTrainer
    if name == "DPSFTTrainer":
        from dpft.hf.sft import DPSFTTrainer

        return DPSFTTrainer
    raise AttributeError(name)
