"""Any other module that owns trainable parameters (LayerNorm, LlamaRMSNorm, unknown layers).

Per-example parameter gradients through torch.func (vmap of a vjp over the captured input and
output gradient). Correct for any module that treats the examples of a batch independently and
takes one tensor input; cheap for the small modules it is meant for (norms, scales).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.func import functional_call, vjp, vmap

from dpft.errors import ConfigError
from dpft.privacy.rules.base import BatchSize, Capture, Forward, LayerRule, Sink, Units


class _CaptureGeneric(torch.autograd.Function):
    """Runs the module's own forward; the backward asks `on_backward` for grad_input."""

    @staticmethod
    def forward(ctx, x, run, on_backward, *params):
        ctx.save_for_backward(x)
        ctx.on_backward = on_backward
        return run(x)

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        grad_x = ctx.on_backward(x, g)
        nones = [None] * (len(ctx.needs_input_grad) - 1)
        return (grad_x if ctx.needs_input_grad[0] else None, *nones)


def _per_example_vjp(
    module: nn.Module, names: list[str], x: Tensor, g: Tensor
) -> tuple[dict[str, Tensor], Tensor | None]:
    """Per-example gradients of the named parameters (fp32) and the input gradient (x's dtype)."""
    own = {n: p.detach().float() for n, p in module.named_parameters(recurse=False)}
    trained = {n: own.pop(n) for n in names}

    def one(x_e: Tensor, g_e: Tensor) -> tuple[dict[str, Tensor], Tensor | None]:
        def f(p: dict[str, Tensor], xi: Tensor) -> Tensor:
            return functional_call(module, {**p, **own}, (xi.unsqueeze(0),)).squeeze(0)

        if not x_e.is_floating_point():  # token ids: no input gradient
            out, pull = vjp(lambda p: f(p, x_e), trained)
            return pull(g_e.to(out.dtype))[0], None
        out, pull = vjp(f, trained, x_e)
        return pull(g_e.to(out.dtype))

    xf = x.float() if x.is_floating_point() else x
    grads, grad_x = vmap(one)(xf, g.float())
    return grads, None if grad_x is None else grad_x.to(x.dtype)


def _attach(module: nn.Module, params: dict[str, nn.Parameter], sink: Sink, batch_size: BatchSize) -> Forward:
    name = type(module).__name__
    if any(p.requires_grad for n, p in module.named_parameters() if "." in n):
        raise ConfigError(
            [
                f"{name}: a module with its own trainable parameters and trainable "
                "submodules has no per-example gradient rule"
            ]
        )
    original = module.forward
    replaying = False  # functional_call re-enters this forward: let it reach the original

    def on_backward(x: Tensor, g: Tensor) -> Tensor | None:
        nonlocal replaying
        replaying = True
        try:
            per_example, grad_x = _per_example_vjp(module, list(params), x, g)
        finally:
            replaying = False
        sink(Capture(GENERIC, module, params, per_example=per_example))
        return grad_x

    def forward(*args: object, **kwargs: object) -> Tensor:
        if replaying:
            return original(*args, **kwargs)
        if kwargs or len(args) != 1 or not isinstance(args[0], Tensor):
            raise ConfigError(
                [
                    f"{name}: no per-example gradient rule for a module called with several inputs "
                    "(mixture-of-experts layers among them); train it frozen (LoRA on other modules) "
                    "or register a rule for it (dpft.privacy.layers.register_rule)"
                ]
            )
        if not args[0].is_floating_point():
            raise ConfigError(
                [
                    f"{name}: no per-example gradient rule for a module fed integer input (token ids: "
                    "an embedding subclass dpft does not know); train it frozen or register a rule "
                    "for it (dpft.privacy.layers.register_rule)"
                ]
            )
        current = [module._parameters[n] for n in params]  # FSDP2: the all-gathered weights, not the shards
        return _CaptureGeneric.apply(args[0], original, on_backward, *current)

    return forward


def _sq_norms(cap: Capture, units: Units) -> dict[str, Tensor]:
    return {n: _unit_grads(cap, units, n).flatten(1).square().sum(1) for n in cap.per_example}


def _unit_grads(cap: Capture, units: Units, name: str) -> Tensor:
    return units.sum_examples(cap.per_example[name])


def _clipped_sum(cap: Capture, coef: Tensor) -> dict[str, Tensor]:
    return {n: torch.tensordot(coef, pe, dims=1) for n, pe in cap.per_example.items()}


GENERIC = LayerRule("generic", _attach, _sq_norms, _unit_grads, _clipped_sum)
