"""Frozen-prefix reuse: the cached path gives the full forward's logits, losses and clipped sums."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from dpft.data.encode import Example, collate
from dpft.errors import ConfigError
from dpft.models.loading import with_lora
from dpft.models.prefix_cache import PrefixCache, frozen_boundary
from dpft.privacy.engine import PerUnitClipper, PlainAccumulator
from dpft.training.loss import example_losses
from helpers import VOCAB, tiny_gpt2

LENGTHS = [7, 3, 12, 5, 12, 1, 9]
UNITS = torch.tensor([0, 0, 1, 2, 3, 3, 4])
TOL = dict(rtol=1e-4, atol=1e-5)


def _config_args(layers: int) -> dict:
    return dict(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=True,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )


def lora_model(arch: str = "llama", layers: int = 4, adapted: int = 2, seed: int = 0, **extra) -> nn.Module:
    """A tiny random decoder with LoRA on all linear layers of its last `adapted` blocks (non-zero B)."""
    torch.manual_seed(seed)
    if arch == "llama":
        base = LlamaForCausalLM(LlamaConfig(**_config_args(layers), **extra))
    else:
        base = Qwen2ForCausalLM(Qwen2Config(**_config_args(layers), **extra))
    model = with_lora(base.eval(), r=4, alpha=8, targets="all-linear", last_layers=adapted)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn_like(p))  # LoRA B starts at zero: make every gradient non-trivial
    return model


def examples(lengths=LENGTHS, seed: int = 1) -> list[Example]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in lengths:
        ids = torch.randint(3, VOCAB, (n,), generator=g).tolist()
        out.append(Example(ids, list(ids)))  # loss on all tokens
    return out


def full_logits(model: nn.Module, batch: dict) -> torch.Tensor:
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_logits_and_losses_match_the_full_forward(arch):
    model = lora_model(arch)
    data = examples()
    cache = PrefixCache.build(model, data, batch_size=3)
    assert cache.boundary == frozen_boundary(model) == 2 and len(cache) == len(data)
    for mode in (model.eval, model.train):
        mode()
        for indices in ([0, 1, 2, 3], [4, 5, 6], [5], [2, 4]):
            batch = collate([data[i] for i in indices], pad_token_id=0)
            with torch.no_grad():
                full = full_logits(model, batch)
                cached = cache.logits(model, indices, batch["attention_mask"])
            real = batch["attention_mask"].bool()
            torch.testing.assert_close(cached[real], full[real], **TOL)
            expected = example_losses(full, batch["labels"])
            torch.testing.assert_close(example_losses(cached, batch["labels"]), expected, **TOL)
            with torch.no_grad():
                torch.testing.assert_close(cache.losses(model, indices, batch), expected, **TOL)


def test_qwen2_sliding_window_layers_get_their_own_mask():
    model = lora_model("qwen2", use_sliding_window=True, sliding_window=4, max_window_layers=1)
    assert "sliding_attention" in model.config.layer_types[2:]
    data = examples()
    cache = PrefixCache.build(model, data)
    batch = collate(data, pad_token_id=0)
    with torch.no_grad():
        full, cached = full_logits(model, batch), cache.logits(model, range(len(data)), batch["attention_mask"])
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(cached[real], full[real], **TOL)


def test_cached_states_do_not_depend_on_the_build_batch():
    model = lora_model()
    data = examples()
    one, many = PrefixCache.build(model, data, batch_size=1), PrefixCache.build(model, data, batch_size=64)
    mask = collate(data, pad_token_id=0)["attention_mask"]
    torch.testing.assert_close(one.hidden(range(len(data)), mask), many.hidden(range(len(data)), mask), **TOL)
    assert one.nbytes == sum(LENGTHS) * 32 * 4


def test_only_the_listed_examples_are_cached():
    model = lora_model()
    data = examples()
    cache = PrefixCache.build(model, data, only=[5, 2, 2])
    assert len(cache) == 2 and cache.nbytes == (LENGTHS[5] + LENGTHS[2]) * 32 * 4
    batch = collate([data[2], data[5]], pad_token_id=0)
    with torch.no_grad():
        full = full_logits(model, batch)
        cached = cache.logits(model, [2, 5], batch["attention_mask"])
    torch.testing.assert_close(cached[batch["attention_mask"].bool()], full[batch["attention_mask"].bool()], **TOL)
    with pytest.raises(ValueError, match="not cached"):
        cache.logits(model, [0], collate([data[0]], 0)["attention_mask"])


def _sums(model, data, accumulator, cache=None, path="logits", micro_batches=((0, 1, 2), (3, 4, 5, 6))):
    norms = []
    for mb in micro_batches:
        batch = collate([data[i] for i in mb], pad_token_id=0)
        if cache is None:
            losses = example_losses(full_logits(model, batch), batch["labels"])
        elif path == "logits":
            losses = example_losses(cache.logits(model, mb, batch["attention_mask"]), batch["labels"])
        else:
            losses = cache.losses(model, mb, batch)
        unit_index = torch.unique(UNITS[list(mb)], return_inverse=True)[1]
        norms.append(accumulator.backward(losses, unit_index))
    return accumulator.take_sums(), torch.cat(norms)


@pytest.mark.parametrize("path", ["logits", "losses"])
@pytest.mark.parametrize("private", [True, False])
def test_clipped_sums_match_the_full_forward(private, path):
    model = lora_model()
    model.train()
    data = examples()
    accumulator = PerUnitClipper(model, max_grad_norm=0.05) if private else PlainAccumulator(model)
    try:
        cache = PrefixCache.build(model, data)  # built with the clipper attached
        full_sums, full_norms = _sums(model, data, accumulator)
        cached_sums, cached_norms = _sums(model, data, accumulator, cache, path)
    finally:
        accumulator.remove()
    assert full_sums.keys() == cached_sums.keys() and len(full_sums) == 2 * 2 * 7  # A, B x 7 linears x 2 blocks
    for name in full_sums:
        assert full_sums[name].abs().sum() > 0, name
        torch.testing.assert_close(cached_sums[name], full_sums[name], **TOL)
    torch.testing.assert_close(cached_norms, full_norms, **TOL, equal_nan=True)
    if private:
        assert bool((full_norms > 0.05).all())  # the bound is active: the sums are clipped ones


def test_a_trainable_head_gets_full_logits_and_its_gradient():
    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(**{**_config_args(4), "tie_word_embeddings": False})).eval()
    model = with_lora(base, r=4, alpha=8, targets="all-linear", last_layers=2)
    model.get_base_model().lm_head.weight.requires_grad_(True)
    data = examples()
    cache = PrefixCache.build(model, data)
    batch = collate(data, pad_token_id=0)
    grads = []
    for losses in (example_losses(full_logits(model, batch), batch["labels"]), cache.losses(model, range(7), batch)):
        head = model.get_base_model().lm_head.weight
        head.grad = None
        losses.sum().backward()
        grads.append((losses.detach(), head.grad))
    torch.testing.assert_close(grads[1][0], grads[0][0], **TOL)
    torch.testing.assert_close(grads[1][1], grads[0][1], **TOL)


def test_clipper_sees_the_batch_size_and_no_stale_one():
    model = lora_model()
    data = examples()
    clipper = PerUnitClipper(model, max_grad_norm=1.0)
    seen = []
    block = model.get_base_model().model.layers[3].mlp.down_proj
    handle = block.register_forward_pre_hook(lambda *_: seen.append(clipper._batch_size))
    try:
        cache = PrefixCache.build(model, data)
        batch = collate(data[:3], pad_token_id=0)
        cache.logits(model, [0, 1, 2], batch["attention_mask"])
    finally:
        handle.remove()
        clipper.remove()
    assert seen == [3] and clipper._batch_size is None
    assert "forward" not in model.__dict__  # the routing is undone


def test_refuses_dropout_below_the_boundary():
    with pytest.raises(ConfigError, match="attention_dropout"):
        PrefixCache.build(lora_model(attention_dropout=0.1), examples())
    model = lora_model()
    block = model.get_base_model().model.layers[0]
    block.mlp.act_fn = nn.Sequential(block.mlp.act_fn, nn.Dropout(0.1))
    with pytest.raises(ConfigError, match="dropout"):
        PrefixCache.build(model, examples())
    block.mlp.act_fn[1].p = 0.0  # a disabled dropout is deterministic
    PrefixCache.build(model, examples())


def test_refuses_trainable_parameters_below_the_boundary():
    model = lora_model()
    with pytest.raises(ConfigError, match="trainable below"):
        PrefixCache.build(model, examples(), boundary=3)
    cache = PrefixCache.build(model, examples())
    model.get_base_model().model.layers[1].mlp.up_proj.weight.requires_grad_(True)  # unfrozen after the build
    batch = collate(examples()[:2], pad_token_id=0)
    with pytest.raises(ConfigError, match="trainable below"):
        cache.logits(model, [0, 1], batch["attention_mask"])
    everything = lora_model(adapted=4)
    assert frozen_boundary(everything) == 0
    with pytest.raises(ConfigError, match="between 1 and 4"):
        PrefixCache.build(everything, examples())


def test_refuses_unsupported_models_and_foreign_masks():
    with pytest.raises(ConfigError, match="model type 'gpt2'"):
        PrefixCache.build(tiny_gpt2(), examples())
    model = lora_model()
    data = examples()
    cache = PrefixCache.build(model, data)
    left_padded = collate([data[0], data[1]], pad_token_id=0)["attention_mask"].flip(1)
    with pytest.raises(ValueError, match="right-padded"):
        cache.logits(model, [0, 1], left_padded)
    with pytest.raises(ConfigError, match="another model"):
        cache.logits(lora_model(), [0], collate([data[0]], 0)["attention_mask"])


# --- training/loss.py: the fused cross-entropy against the implementation it replaced ---


def reference_example_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """example_losses as it was before the fused cross-entropy (F.cross_entropy on shifted logits)."""
    shift_logits, shift_labels = logits[:, :-1].float(), labels[:, 1:]
    token_nll = nn.functional.cross_entropy(
        shift_logits.flatten(0, 1), shift_labels.flatten(), ignore_index=-100, reduction="none"
    ).view(shift_labels.shape)
    return token_nll.sum(dim=1) / (shift_labels != -100).sum(dim=1).clamp(min=1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_example_losses_match_the_unfused_cross_entropy(dtype):
    torch.manual_seed(0)
    labels = torch.randint(0, 50, (5, 9))
    labels[1, 4:] = -100  # padding
    labels[2, :3] = -100  # a prompt without loss
    labels[3, 1:] = -100  # no target token at all: loss 0, no gradient
    labels[4, ::2] = -100
    base = (3 * torch.randn(5, 9, 50)).to(dtype)
    weights = torch.rand(5)  # unequal upstream gradients, as clip factors give
    results = []
    for fn in (example_losses, reference_example_losses):
        logits = base.clone().requires_grad_()
        losses = fn(logits, labels)
        (losses * weights).sum().backward()
        results.append((losses, logits.grad))
    (losses, grad), (ref_losses, ref_grad) = results
    assert losses.dtype == torch.float32 and grad.dtype == dtype
    torch.testing.assert_close(losses, ref_losses)
    torch.testing.assert_close(grad, ref_grad)
    assert losses[3] == 0 and not grad[3].any()
    with torch.no_grad():
        torch.testing.assert_close(example_losses(base, labels), ref_losses)


def test_example_losses_keep_non_finite_logits_in_their_example():
    logits = torch.randn(3, 4, 10, requires_grad=True)
    labels = torch.randint(0, 10, (3, 4))
    labels[2, 2:] = -100
    with torch.no_grad():
        logits[0, 1, 3] = float("nan")
        logits[2, 3, 0] = float("inf")  # on a position without a target: no effect
    losses = example_losses(logits, labels)
    assert torch.isnan(losses[0]) and bool(torch.isfinite(losses[1:]).all())
