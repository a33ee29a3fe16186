"""Norm layers (LayerNorm, RMSNorm and the models' own *RMSNorm classes): per-example weights.

Their parameters are per-feature scales and shifts, so each example can be given its own copy of
them: the module's forward runs with the weight expanded to (B, 1, ..., d), and plain autograd
then returns one weight gradient per example, sum_t g_t ⊙ x̂_t, at the cost of the non-private
backward (no torch.func replay). The copies' gradients go to the engine; the shared parameter
gets none.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from dpft.errors import ConfigError
from dpft.privacy.rules.base import BatchSize, Capture, Forward, LayerRule, Sink
from dpft.privacy.rules.generic import GENERIC


class _PerExample(torch.autograd.Function):
    """The parameter repeated once per example; its backward hands the copies' gradients over."""

    @staticmethod
    def forward(ctx, param, shape, on_backward):
        ctx.on_backward = on_backward
        return param.detach().expand(shape).clone()

    @staticmethod
    def backward(ctx, grad):
        ctx.on_backward(grad)
        return None, None, None


def _expanded_shape(param: Tensor, x: Tensor) -> tuple[int, ...]:
    return (x.shape[0], *[1] * (x.dim() - 1 - param.dim()), *param.shape)


def _functional(module: nn.Module, x: Tensor, per_example: dict[str, Tensor]) -> Tensor:
    if isinstance(module, nn.LayerNorm):  # F.layer_norm wants (d,) weights: apply them after
        y = F.layer_norm(x, module.normalized_shape, None, None, module.eps)
    elif isinstance(module, nn.RMSNorm):
        y = F.rms_norm(x, module.normalized_shape, None, module.eps)
    else:  # a model's own RMSNorm: its forward broadcasts `weight` against the input
        return functional_call(module, per_example, (x,))
    if "weight" in per_example or module.weight is not None:
        y = y * per_example.get("weight", module.weight)
    if getattr(module, "bias", None) is not None:
        y = y + per_example.get("bias", module.bias)
    return y


def _attach(module: nn.Module, params: dict[str, nn.Parameter], sink: Sink, batch_size: BatchSize) -> Forward:
    name = type(module).__name__
    original = module.forward
    replaying = False  # functional_call re-enters this forward: let it reach the original

    def tap(pname: str) -> object:
        def on_backward(grad: Tensor) -> None:
            per_example = grad.reshape(grad.shape[0], -1).float().view(grad.shape[0], *params[pname].shape)
            sink(Capture(NORM, module, {pname: params[pname]}, per_example={pname: per_example}))

        return on_backward

    def forward(*args: object, **kwargs: object) -> Tensor:
        nonlocal replaying
        if replaying:
            return original(*args, **kwargs)
        if kwargs or len(args) != 1 or not isinstance(args[0], Tensor) or args[0].dim() < 2:
            raise ConfigError(
                [f"{name}: only norm layers called with one (batch, ..., features) tensor can be clipped per example"]
            )
        x = args[0]
        # The module's current weights, not those seen at attach: FSDP2 swaps the all-gathered
        # ones in for the forward (`params` then holds the shards, kept only for their names).
        current = {n: module._parameters[n] for n in params}
        copies = {n: _PerExample.apply(p, _expanded_shape(p, x), tap(n)) for n, p in current.items()}
        replaying = True
        try:
            y = _functional(module, x, copies)
        finally:
            replaying = False
        if y.shape != x.shape:  # the weight did not broadcast per example: not a norm we know
            raise ConfigError(
                [f"{name}: its output mixes the examples' copies of its weight; it cannot be clipped as a norm layer"]
            )
        return y

    return forward


def is_rms_norm(module: nn.Module) -> bool:
    """A model's own RMSNorm class (Llama, Qwen2, Mistral, Gemma...): one trainable 1-D weight."""
    params = dict(module.named_parameters(recurse=False))
    return type(module).__name__.endswith("RMSNorm") and list(params) == ["weight"] and params["weight"].dim() == 1


NORM = LayerRule("norm", _attach, GENERIC.sq_norms, GENERIC.unit_grads, GENERIC.clipped_sum)
