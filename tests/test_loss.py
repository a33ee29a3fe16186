"""dpft.training.loss.example_losses: each example's loss is its own, whatever the padding.

Each row of a padded batch must equal the loss of that record run alone, unpadded: a loss that
depended on the other rows (a batch-wide token mean, padding counted) would couple the examples
and break the per-unit sensitivity bound.
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from dpft.data.encode import IGNORE_INDEX, Example, collate
from dpft.training.loss import example_losses
from helpers import VOCAB, tiny_gpt2, tiny_llama

pytestmark = pytest.mark.usefixtures("one_torch_thread")
PAD = 0
MODELS = {"llama": tiny_llama, "gpt2": tiny_gpt2}  # rotary and absolute positions


def records() -> list[Example]:
    """Mixed lengths; a 3-token prompt without loss; labels[0] is never a target (as encode does)."""
    gen = torch.Generator().manual_seed(0)
    out = []
    for length, prompt in [(12, 3), (5, 3), (9, 1), (7, 6)]:
        ids = torch.randint(1, VOCAB, (length,), generator=gen).tolist()
        out.append(Example(ids, [IGNORE_INDEX] * prompt + ids[prompt:]))
    return out


def alone(model: nn.Module, example: Example) -> Tensor:
    ids, labels = torch.tensor([example.input_ids]), torch.tensor([example.labels])
    return example_losses(model(input_ids=ids).logits, labels)[0]


def left_padded(examples: list[Example]) -> dict[str, Tensor]:
    """collate pads on the right only; this is its mirror, with the positions the records had alone."""
    right = collate(examples, PAD)
    lengths = right["attention_mask"].sum(1)
    width = right["input_ids"].shape[1]
    # roll each row so that its padding comes first
    index = (torch.arange(width)[None, :] + lengths[:, None]) % width
    batch = {k: v.gather(1, index) for k, v in right.items()}
    batch["position_ids"] = (batch["attention_mask"].cumsum(1) - 1).clamp(min=0)
    return batch


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("name", list(MODELS))
def test_each_row_equals_its_record_alone_unpadded(name: str, side: str) -> None:
    model, examples = MODELS[name](), records()
    batch = collate(examples, PAD) if side == "right" else left_padded(examples)
    assert bool((batch["attention_mask"] == 0).any())  # some padding to get wrong
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    losses = example_losses(model(**inputs).logits, batch["labels"])
    want = torch.stack([alone(model, e) for e in examples])
    assert losses.dtype == torch.float32 and losses.shape == (len(examples),)
    torch.testing.assert_close(losses, want, rtol=1e-5, atol=1e-6)


def test_each_loss_depends_on_its_own_row_only() -> None:
    batch = collate(records(), PAD)
    logits = torch.randn(*batch["input_ids"].shape, VOCAB, requires_grad=True)
    example_losses(logits, batch["labels"])[1].backward()
    touched = logits.grad.flatten(1).abs().sum(1) > 0
    assert touched.tolist() == [False, True, False, False]


def test_bf16_logits_give_fp32_mean_over_own_targets() -> None:
    batch = collate(records(), PAD)
    logits = torch.randn(*batch["input_ids"].shape, VOCAB).bfloat16()
    losses = example_losses(logits, batch["labels"])
    tok = torch.nn.functional.cross_entropy(logits[0, :-1].float(), batch["labels"][0, 1:], reduction="none")
    assert losses.dtype == torch.float32
    torch.testing.assert_close(losses[0], tok[batch["labels"][0, 1:] != IGNORE_INDEX].mean())


def test_example_without_targets_has_zero_loss_and_no_gradient() -> None:
    examples = records()
    examples[2] = Example(examples[2].input_ids, [IGNORE_INDEX] * len(examples[2].input_ids))
    batch = collate(examples, PAD)
    logits = torch.randn(*batch["input_ids"].shape, VOCAB, requires_grad=True)
    losses = example_losses(logits, batch["labels"])
    losses.sum().backward()
    assert losses[2] == 0 and not logits.grad[2].any()
