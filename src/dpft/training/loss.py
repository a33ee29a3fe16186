"""Per-example loss: each example's mean over its OWN target tokens.

A batch-wide token mean would couple examples (one example's length would rescale another's
gradient), which breaks the per-unit sensitivity bound. Both training and the audit use this.

The cross-entropy over the vocabulary (49k for SmolLM2) is one fused autograd function: one
log-softmax pass whose result becomes the gradient (softmax - one-hot) in place, scaled in place in
the backward. The unfused `F.cross_entropy` on the shifted (copied) logits made ~4 more passes over
a (B, T, V) tensor and held ~2 more of them at its peak; fp32, B=16, T=96: 0.73 s -> 0.35 s CPU
(benchmarks/demo_profile.py).
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

IGNORE = -100


class _TokenNLL(torch.autograd.Function):
    """(N, V) logits, (N,) targets (IGNORE: no loss) -> (N,) fp32 negative log-likelihoods."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        valid = targets != IGNORE
        picked = targets.clamp(min=0).unsqueeze(1)
        log_probs = torch.log_softmax(logits.float(), dim=-1)
        nll = torch.where(valid, -log_probs.gather(1, picked).squeeze(1), 0.0)
        if ctx.needs_input_grad[0]:
            grad = log_probs.exp_()  # d nll / d logits = softmax - one_hot(target); 0 where ignored
            rows = valid.nonzero().squeeze(1)
            grad[rows, targets[rows]] -= 1.0
            grad[~valid] = 0.0
            ctx.grad, ctx.dtype = grad, logits.dtype
        return nll

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_nll: torch.Tensor) -> tuple[torch.Tensor, None]:
        grad, ctx.grad = ctx.grad, None  # scaled in place: the graph is not reusable (as with retain_graph=False)
        if grad is None:
            raise RuntimeError("example_losses: backward through the same losses twice is not supported")
        return grad.mul_(grad_nll.unsqueeze(1)).to(ctx.dtype), None


def token_losses(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of each row of (N, V) `logits` against (N,) `targets`; 0 where the target is -100."""
    return _TokenNLL.apply(logits, targets)


def next_token_targets(labels: torch.Tensor) -> torch.Tensor:
    """(B, T) labels -> (B, T) targets: position t predicts label t+1; the last position predicts nothing."""
    return torch.cat([labels[:, 1:], labels.new_full((labels.shape[0], 1), IGNORE)], dim=1)


def example_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy per example over positions whose label is not -100.

    Args:
        logits: (B, T, V) model outputs.
        labels: (B, T) target ids aligned with the inputs (shifted here), -100 where no loss.
    Returns:
        (B,) fp32 losses; an example with no target token gets 0 (and no gradient).
    """
    targets = torch.cat(
        [labels[:, 1:], labels.new_full((labels.shape[0], 1), IGNORE)], dim=1
    )  # position t predicts t+1
    token_nll = token_losses(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1)).view(targets.shape)
    counts = (targets != IGNORE).sum(dim=1)
    return token_nll.sum(dim=1) / counts.clamp(min=1)
