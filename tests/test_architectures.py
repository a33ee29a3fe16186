"""Architectures beyond Llama and GPT-2: the engine against an explicit per-unit loop, or a clean refusal.

Tiny random configs of each family, with LoRA on the default ("auto") targets and full fine-tuning
(tied and untied embeddings where the family has both). Mixture-of-experts models train with LoRA
on attention ("auto") and are refused, by the probe, in full fine-tuning and under all-linear LoRA.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import transformers as T
from torch import Tensor, nn

from dpft.errors import ConfigError
from dpft.models.loading import auto_targets, with_lora
from dpft.models.probe import check_trainable
from dpft.privacy.layers import rule_for
from dpft.privacy.rules.generic import GENERIC
from helpers import VOCAB, trainable
from test_engine import USERS, make_batch, norm_of, reference_unit_grads, run_engine

SMALL = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=128,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)
KV = dict(num_key_value_heads=2)


def tiny(config_cls: type, model_cls: type, **extra: object) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        torch.manual_seed(0)
        return model_cls(config_cls(**{**SMALL, **extra})).eval()

    return build


FAMILIES: dict[str, Callable[[], nn.Module]] = {
    "gemma": tiny(T.GemmaConfig, T.GemmaForCausalLM, head_dim=8, **KV),
    "gemma2": tiny(T.Gemma2Config, T.Gemma2ForCausalLM, head_dim=8, **KV),
    "gemma3": tiny(T.Gemma3TextConfig, T.Gemma3ForCausalLM, head_dim=8, **KV),
    "opt": tiny(T.OPTConfig, T.OPTForCausalLM, ffn_dim=64, word_embed_proj_dim=32),
    "opt-untied": tiny(T.OPTConfig, T.OPTForCausalLM, ffn_dim=64, word_embed_proj_dim=32, tie_word_embeddings=False),
    "falcon": tiny(T.FalconConfig, T.FalconForCausalLM),
    "gpt-neox": tiny(T.GPTNeoXConfig, T.GPTNeoXForCausalLM),
    "bloom": tiny(T.BloomConfig, T.BloomForCausalLM, n_head=4),
    "phi3": tiny(T.Phi3Config, T.Phi3ForCausalLM, **KV),
    "qwen2-tied": tiny(T.Qwen2Config, T.Qwen2ForCausalLM, tie_word_embeddings=True, **KV),
    "qwen2-untied": tiny(T.Qwen2Config, T.Qwen2ForCausalLM, tie_word_embeddings=False, **KV),
}
MOE: dict[str, Callable[[], nn.Module]] = {
    "mixtral": tiny(T.MixtralConfig, T.MixtralForCausalLM, num_local_experts=4, num_experts_per_tok=2, **KV),
    "qwen2-moe": tiny(
        T.Qwen2MoeConfig,
        T.Qwen2MoeForCausalLM,
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=16,
        shared_expert_intermediate_size=32,
        **KV,
    ),
    "qwen3-moe": tiny(
        T.Qwen3MoeConfig, T.Qwen3MoeForCausalLM, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16, **KV
    ),
}


def adapted(build: Callable[[], nn.Module], mode: str) -> nn.Module:
    model = build()
    if mode == "full":
        return model.requires_grad_(True)
    model = with_lora(model, r=4, alpha=8, targets=mode)
    torch.manual_seed(1)
    for module in model.modules():  # B starts at zero in peft: make A's gradient non-zero
        for layer in getattr(module, "lora_B", {}).values():
            nn.init.normal_(layer.weight, std=0.1)
    return model


def max_relative_error(model: nn.Module) -> float:
    """Engine vs a loop of single-unit backwards (USERS: units of 1 and 3 examples), C = median norm.

    Per parameter, ||engine - loop|| / (||loop|| + 1e-3 ||loop of all parameters||): a parameter whose
    gradient is zero in exact arithmetic (OPT's key bias) is compared at the scale of the whole sum.
    """
    batches = [make_batch(USERS)]
    unit_grads = reference_unit_grads(model, batches)
    want_norms = torch.stack([norm_of(g) for g in unit_grads])
    c = float(want_norms.median())
    got, norms = run_engine(model, batches, c)
    want: dict[str, Tensor] = {n: torch.zeros_like(g) for n, g in unit_grads[0].items()}
    for grads in unit_grads:
        factor = min(1.0, c / (float(norm_of(grads)) + 1e-6))
        for n, g in grads.items():
            want[n] += factor * g
    assert got.keys() == want.keys() == trainable(model).keys()
    floor = 1e-3 * float(norm_of(want))
    errors = [float((norms - want_norms).abs().max() / want_norms.min())]
    errors += [
        float(torch.linalg.vector_norm(got[n] - want[n])) / (float(torch.linalg.vector_norm(want[n])) + floor)
        for n in want
    ]
    return max(errors)


@pytest.mark.parametrize("mode", ["auto", "full"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_engine_matches_per_unit_loop(family: str, mode: str) -> None:
    model = adapted(FAMILIES[family], mode)
    check_trainable(model, VOCAB)  # the probe accepts what the engine computes correctly
    assert max_relative_error(model) < 1e-4


@pytest.mark.parametrize("family", list(MOE))
def test_moe_lora_auto_trains_on_attention(family: str) -> None:
    model = adapted(MOE[family], "auto")
    check_trainable(model, VOCAB)
    assert max_relative_error(model) < 1e-4


@pytest.mark.parametrize("family", list(MOE))
def test_moe_full_is_refused_by_the_probe(family: str) -> None:
    model = adapted(MOE[family], "full")
    with pytest.raises(ConfigError, match="Experts: no per-example gradient rule"):
        check_trainable(model, VOCAB)


@pytest.mark.parametrize("family", ["mixtral", "qwen3-moe"])
def test_moe_all_linear_lora_is_refused_by_the_probe(family: str) -> None:
    model = adapted(MOE[family], "all-linear")  # peft wraps the fused experts' weights
    with pytest.raises(ConfigError, match="used outside the module that owns it"):
        check_trainable(model, VOCAB)


def test_qwen2_moe_all_linear_clips_the_flattened_shared_expert() -> None:
    model = adapted(MOE["qwen2-moe"], "all-linear")  # shared_expert sees (B·T, d) rows
    check_trainable(model, VOCAB)
    assert max_relative_error(model) < 1e-4


def test_no_layer_falls_back_to_the_generic_rule() -> None:
    """FalconLinear, scaled and positional embeddings get their dedicated rules (no weight copies)."""
    for family in ["falcon", "gemma", "gemma3", "opt"]:
        model = FAMILIES[family]()
        owners = [m for m in model.modules() if next(m.parameters(recurse=False), None) is not None]
        generic = [type(m).__name__ for m in owners if rule_for(m) is GENERIC]
        assert generic == [], family


def test_default_lora_targets_exist() -> None:
    want = {"gemma": ["q_proj", "v_proj"], "falcon": ["query_key_value"], "gpt-neox": ["query_key_value"]}
    want |= {"bloom": ["query_key_value"], "opt": ["q_proj", "v_proj"]}
    for family, targets in want.items():
        assert auto_targets(FAMILIES[family]()) == targets
    assert auto_targets(FAMILIES["phi3"]()) == ["down_proj", "gate_up_proj", "o_proj", "qkv_proj"]


def test_unknown_embedding_subclass_is_a_config_error() -> None:
    class Shifted(nn.Embedding):
        def forward(self, ids: Tensor) -> Tensor:
            return super().forward(ids) + 1.0

    model = FAMILIES["qwen2-untied"]()
    old = model.model.embed_tokens
    model.model.embed_tokens = Shifted(old.num_embeddings, old.embedding_dim)
    with pytest.raises(ConfigError, match="Shifted: no per-example gradient rule for a module fed integer input"):
        check_trainable(model.requires_grad_(True), VOCAB)
