"""dpft.hf.DPSFTTrainer (TRL's SFTTrainer): chat records train with the loss on assistant turns only."""

from __future__ import annotations

import json

import pytest
import torch
from datasets import Dataset

from dpft.hf import PrivacyArguments
from dpft.models import load_base_model, precision, with_lora

trl = pytest.importorskip("trl")


def chats(n: int = 24) -> Dataset:
    return Dataset.from_list(
        [
            {
                "messages": [
                    {"role": "user", "content": f"What is {i} plus one?"},
                    {"role": "assistant", "content": f"It is {i + 1}."},
                ]
            }
            for i in range(n)
        ]
    )


@pytest.mark.usefixtures("one_torch_thread")
def test_dp_sft_on_chat_records_trains_on_assistant_turns(tmp_path, tiny_model_dir):
    from dpft.hf import DPSFTTrainer

    torch.manual_seed(0)
    loaded = load_base_model(tiny_model_dir)
    model = with_lora(loaded.model, 8, 16.0, "q_proj,v_proj")
    config = trl.SFTConfig(
        output_dir=str(tmp_path / "sft"), per_device_train_batch_size=4, max_steps=3, learning_rate=1e-2,
        max_length=64, report_to=[], use_cpu=True, save_strategy="no", logging_steps=1, disable_tqdm=True,
        bf16=precision.native_bf16(),  # TRL turns bf16 on by default; the drop-in refuses it where it is emulated
    )  # fmt: skip
    assert config.gradient_checkpointing  # TRL's default: the blocks are recomputed in the backward
    privacy = PrivacyArguments(target_epsilon=8.0, delta=1e-3, expected_batch_size=6, unsafe_seed=3)
    trainer = DPSFTTrainer(
        model=model, args=config, train_dataset=chats(), processing_class=loaded.tokenizer, privacy_args=privacy
    )
    tokenizer = loaded.tokenizer
    for example in trainer._dp.data.examples:  # targets: exactly the assistant turn and its end marker
        targets = [t for t in example.labels if t != -100]
        assert tokenizer.decode(targets).startswith("It is ") and tokenizer.decode(targets).endswith("</s>")
        assert "What is" not in tokenizer.decode(targets)
    trainer.train()
    assert trainer.model.is_activation_checkpointing
    report = json.loads((tmp_path / "sft" / "privacy.json").read_text())
    assert report["steps"] == 3 and report["trainer"] == "DPSFTTrainer" and 0 < report["epsilon"] <= 8.0
    assert report["num_units"] == 24 and report["sampling"] == "poisson"
    assert all("loss" not in str(entry) for entry in trainer.state.log_history)
