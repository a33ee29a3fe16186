"""RoPE whose frequencies follow the micro-batch's longest example (dynamic, longrope) is refused when
examples may pass its fixed range: in `dpft train` and in DPTrainer, before anything is written."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import dpft
from dpft.errors import ConfigError
from dpft.hf import DPTrainer
from dpft.ledger import BudgetLedger
from dpft.models.rope import check_rope
from helpers import VOCAB, tiny_tokenizer, write_records
from test_hf_trainer import privacy, records, training_args
from test_train_e2e import base_options

DYNAMIC = {"rope_type": "dynamic", "factor": 2.0}
LONGROPE = {
    "rope_type": "longrope", "short_factor": [1.0] * 4, "long_factor": [2.0] * 4, "original_max_position_embeddings": 16,
}  # fmt: skip


def llama_config(rope: dict | None = None, max_positions: int = 32, **extra) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=max_positions, pad_token_id=0, bos_token_id=1, eos_token_id=2,
        rope_parameters=rope, **extra,
    )  # fmt: skip


def test_the_logits_of_an_example_follow_the_other_examples_length_past_the_fixed_range() -> None:
    """Why the check exists: with dynamic RoPE, a longer neighbour changes an example's logits."""
    torch.manual_seed(0)
    model = LlamaForCausalLM(llama_config(DYNAMIC)).eval()
    ids = torch.randint(3, VOCAB, (10,))

    def first_logits(width: int) -> torch.Tensor:
        x, mask = torch.full((2, width), 5), torch.ones(2, width, dtype=torch.long)
        x[0, :10], mask[0, 10:] = ids, 0
        return model(input_ids=x, attention_mask=mask).logits[0, :10]

    assert torch.allclose(first_logits(10), first_logits(32), atol=1e-6)  # within the fixed range
    assert not torch.allclose(first_logits(10), first_logits(64), atol=1e-6)


@pytest.mark.parametrize(
    ("rope", "extra", "limit"),
    [
        (DYNAMIC, {}, 32),  # max_position_embeddings
        (LONGROPE, {}, 16),  # rope_parameters' original_max_position_embeddings
        (None, {"rope_scaling": {"type": "dynamic", "factor": 2.0}}, 32),  # the older field and key
        ({"full_attention": DYNAMIC, "sliding_attention": {"rope_type": "default"}}, {}, 32),  # by layer type
    ],
    ids=["dynamic", "longrope", "rope_scaling", "by-layer-type"],
)
def test_batch_dependent_rope_is_refused_past_its_fixed_range(rope, extra, limit) -> None:
    config = llama_config(rope, **extra)
    check_rope(config, limit)
    with pytest.raises(ConfigError, match=rf"rope_type '\w+' .* set max_length <= {limit} \(it is {limit + 1}\)"):
        check_rope(config, limit + 1)


def test_fixed_rope_and_models_without_rope_are_accepted() -> None:
    check_rope(llama_config(), 4096)
    check_rope(llama_config({"rope_type": "linear", "factor": 2.0}), 4096)
    check_rope(None, 4096)


@pytest.fixture
def dynamic_model_dir(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("dynamic-llama")
    torch.manual_seed(0)
    LlamaForCausalLM(llama_config(DYNAMIC)).save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return str(path)


def test_dpft_train_refuses_it_before_anything_is_written(tmp_path, dynamic_model_dir) -> None:
    data, run = write_records(tmp_path / "d.jsonl"), tmp_path / "run"
    with pytest.raises(ConfigError, match="rope_type 'dynamic'"):
        dpft.train(str(data), str(run), **base_options(dynamic_model_dir, max_length=64))
    assert not run.exists() and BudgetLedger().history() == []


def test_dp_trainer_refuses_it_before_anything_is_written(tmp_path) -> None:
    torch.manual_seed(0)
    model = LlamaForCausalLM(llama_config(DYNAMIC))
    data = records(write_records(tmp_path / "d.jsonl"))
    with pytest.raises(ConfigError, match="rope_type 'dynamic'"):
        DPTrainer(model=model, args=training_args(tmp_path / "hf"), train_dataset=data,
                  processing_class=tiny_tokenizer(), privacy_args=privacy(max_length=64))  # fmt: skip
    assert not (tmp_path / "hf").exists() and BudgetLedger().history() == []
