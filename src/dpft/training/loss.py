"""Per-example loss: each example's mean over its OWN target tokens.

A batch-wide token mean would couple examples (one example's length would rescale another's
gradient), which breaks the per-unit sensitivity bound. Both training and the audit use this.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE = -100


def example_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy per example over positions whose label is not -100.

    Args:
        logits: (B, T, V) model outputs.
        labels: (B, T) target ids aligned with the inputs (shifted here), -100 where no loss.
    Returns:
        (B,) fp32 losses; an example with no target token gets 0 (and no gradient).
    """
    shift_logits = logits[:, :-1].float()
    shift_labels = labels[:, 1:]
    token_nll = F.cross_entropy(
        shift_logits.flatten(0, 1), shift_labels.flatten(), ignore_index=IGNORE, reduction="none"
    ).view(shift_labels.shape)
    counts = (shift_labels != IGNORE).sum(dim=1)
    return token_nll.sum(dim=1) / counts.clamp(min=1)
