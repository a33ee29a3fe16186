"""Test helpers: tiny random causal LMs (vocab <= 512, a step in milliseconds), a character
tokenizer, and small utilities shared by several test modules."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor, nn
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from dpft.atomic_write import write_text_atomic

VOCAB = 256


def tiny_llama(tie: bool = True, seed: int = 0, width: int = 32) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=width,
        intermediate_size=2 * width,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=tie,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    return LlamaForCausalLM(cfg).eval()


def tiny_gpt2(seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    cfg = GPT2Config(
        vocab_size=VOCAB,
        n_embd=32,
        n_layer=2,
        n_head=4,
        n_positions=128,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    return GPT2LMHeadModel(cfg).eval()


def tiny_tokenizer():
    """A character-level tokenizer (printable ASCII + specials), with a chat template; no hub."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    chars = [chr(i) for i in range(32, 127)]
    vocab = {tok: i for i, tok in enumerate(specials + chars)}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    core.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    tok.chat_template = (
        "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>{% endfor %}"
        "{% if add_generation_prompt %}<s>assistant: {% endif %}"
    )
    return tok


def trainable(model: nn.Module) -> dict[str, nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def write_grads(accumulator, model: nn.Module) -> dict[str, Tensor]:
    """Take an accumulator's fp32 sums and put them into p.grad (p's dtype), as a plain step would."""
    sums = accumulator.take_sums()
    params = trainable(model)
    for name, total in sums.items():
        params[name].grad = total.to(params[name].dtype)
    return sums


def unit_contributions(
    model: nn.Module,
    c: float,
    losses_of: Callable[[Tensor], Tensor],
    unit_index: Tensor,
    autocast_backward: bool = False,
) -> dict[int, float]:
    """||sums with unit u - sums without it|| for every unit u: the sensitivity, σ = 0.

    `losses_of(rows)` runs the forward on those rows of a fixed batch and returns their losses.
    The sums are `take_sums`' fp32 tensors, as the DP step gets them (checked to be fp32): the bound
    must hold before anything is rounded to the weights' dtype. `autocast_backward` also runs the
    engine's backward inside a bf16 autocast region, as a caller may.
    """
    from dpft.privacy.engine import PerUnitClipper

    def sums(rows: Tensor) -> dict[str, Tensor]:
        _, units = torch.unique(unit_index[rows], return_inverse=True)
        clipper = PerUnitClipper(model, c)
        try:
            losses = losses_of(rows)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast_backward):
                clipper.backward(losses, units)
            out = clipper.take_sums()
        finally:
            clipper.remove()
        assert all(s.dtype == torch.float32 for s in out.values())
        return out

    everyone = torch.arange(unit_index.numel())
    full = sums(everyone)
    moved = {}
    for u in torch.unique(unit_index).tolist():
        without = sums(everyone[unit_index != u])
        moved[u] = float(torch.sqrt(sum((full[n].double() - without[n].double()).square().sum() for n in full)))
    return moved


def write_records(path: Path, n: int = 40, users: int = 10) -> Path:
    """n prompt/completion records of `users` users (user_id u0, u1, …) as JSONL."""
    rows = [
        {
            "prompt": f"record {i}: patient {i % users} has",
            "completion": f" condition {i % 7}",
            "user_id": f"u{i % users}",
        }
        for i in range(n)
    ]
    # Atomic: ranks of a multi-process test write the same file while the other may be reading it.
    write_text_atomic(path, "".join(json.dumps(r) + "\n" for r in rows))
    return path


def public_files(root: Path) -> list[Path]:
    """Everything in the run directory outside private/: what may ship with the model."""
    return [f for f in root.rglob("*") if f.is_file() and "private" not in f.relative_to(root).parts]
