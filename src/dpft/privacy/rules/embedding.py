"""nn.Embedding: example e's gradient is sum_t onehot(x_et) ⊗ g_et, never formed (V × d each).

norm² pairs: sum_{t,s} [x_et == x_e's] (g_et · g_e's); clipped sum: one index_add.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dpft.errors import ConfigError
from dpft.privacy.rules.base import BatchSize, Capture, Forward, LayerRule, Sink, Units


class _CaptureEmbedding(torch.autograd.Function):
    """An embedding lookup whose backward hands (ids, grad_out) to the engine, no weight grad."""

    @staticmethod
    def forward(ctx, ids, weight, padding_idx, on_backward):
        ctx.save_for_backward(ids)
        ctx.padding_idx, ctx.on_backward = padding_idx, on_backward
        return F.embedding(ids, weight, padding_idx)

    @staticmethod
    def backward(ctx, g):
        (ids,) = ctx.saved_tensors
        if ctx.padding_idx is not None:  # autograd gives the padding row no gradient: nor do we
            g = g.masked_fill((ids == ctx.padding_idx).unsqueeze(-1), 0)
        ctx.on_backward(ids, g)
        return None, None, None, None


def _attach(module: nn.Module, params: dict[str, nn.Parameter], sink: Sink, batch_size: BatchSize) -> Forward:
    if module.max_norm is not None or module.scale_grad_by_freq:
        raise ConfigError(
            [f"{type(module).__name__}: max_norm and scale_grad_by_freq are not supported by per-unit clipping"]
        )

    def on_backward(ids: Tensor, g: Tensor) -> None:
        sink(Capture(EMBEDDING, module, params, a=ids, g=g))

    def forward(ids: Tensor) -> Tensor:
        b = batch_size()
        if b is not None and ids.dim() >= 2 and ids.shape[0] == 1 < b:
            # A lookup shared by the whole batch (GPT-2 positions, shape (1, T)) would sum every
            # example's gradient into one row; give each example its own copy so it stays its own.
            ids = ids.expand(b, *ids.shape[1:])
        return _CaptureEmbedding.apply(ids, module.weight, module.padding_idx, on_backward)

    return forward


def _flat(cap: Capture) -> tuple[Tensor, Tensor]:
    """ids as (B, T) and g as (B, T, d) in fp32."""
    ids = cap.a.reshape(cap.a.shape[0], -1)
    return ids, cap.g.reshape(*ids.shape, -1).float()


def _sq_norms(cap: Capture, units: Units) -> dict[str, Tensor]:
    ids, g = _flat(cap)
    same = units.left(ids)[:, :, None] == units.right(ids)[:, None, :]
    gram = torch.bmm(units.left(g), units.right(g).mT).mul_(same)
    return {"weight": units.sum_pairs(gram.sum((1, 2)))}


def _unit_grads(cap: Capture, units: Units, name: str) -> Tensor:
    ids, g = _flat(cap)
    vocab, dim = cap.params[name].shape
    rows = (units.index[:, None] * vocab + ids).flatten()
    grads = torch.zeros(units.count * vocab, dim, dtype=g.dtype, device=g.device)
    return grads.index_add_(0, rows, g.flatten(0, 1)).view(units.count, vocab, dim)


def _clipped_sum(cap: Capture, coef: Tensor) -> dict[str, Tensor]:
    ids, g = _flat(cap)
    out = torch.zeros(cap.params["weight"].shape, dtype=g.dtype, device=g.device)
    return {"weight": out.index_add_(0, ids.flatten(), (g * coef[:, None, None]).flatten(0, 1))}


EMBEDDING = LayerRule("embedding", _attach, _sq_norms, _unit_grads, _clipped_sum)
