"""nn.Linear (LoRA A/B included) and GPT-2's Conv1D: ghost norm or instantiation, chosen by cost.

A layer y = a W^T + b gives example e the weight gradient sum_t g_et ⊗ a_et (out × in).
"""

from __future__ import annotations

import weakref
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dpft.privacy.rules.base import (
    BatchSize,
    Capture,
    Forward,
    LayerRule,
    Sink,
    Units,
    compute_dtype,
)


class _CaptureLinear(torch.autograd.Function):
    """y = x W^T + b whose backward returns only grad_input and hands (x, grad_y) to the engine.

    The weight is an input, so y requires grad even when x does not (LoRA A of layer 0).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, transposed, on_backward):
        dtype = compute_dtype(x)  # cast explicitly: the backward runs outside autocast
        w = weight.to(dtype).t() if transposed else weight.to(dtype)
        x_c = _cast(x, dtype)
        ctx.save_for_backward(x_c, w)
        ctx.on_backward, ctx.x_dtype = on_backward, x.dtype
        return F.linear(x_c, w, None if bias is None else bias.to(dtype))

    @staticmethod
    def backward(ctx, g):
        x_c, w = ctx.saved_tensors
        # The saved tensor itself, not a detached alias: layers that read one input (q, k, v) then
        # hand over one object, whose identity keys the shared Gram (`Units.gram`). The engine
        # reads captures under no_grad, so no graph is built on it.
        ctx.on_backward(x_c, g)
        grad_x = (g.to(w.dtype) @ w).to(ctx.x_dtype) if ctx.needs_input_grad[0] else None
        return grad_x, None, None, None, None


_last_cast: tuple[weakref.ref, int, weakref.ref] | None = None


def _cast(x: Tensor, dtype: torch.dtype) -> Tensor:
    """x in dtype; q, k and v (gate and up) cast one input: share one copy (memory, one Gram)."""
    global _last_cast
    if x.dtype == dtype:
        return x
    if _last_cast is not None:
        src, version, out = _last_cast
        cast = out()
        if src() is x and version == x._version and cast is not None and cast.dtype == dtype:
            return cast
    cast = x.to(dtype)
    _last_cast = (weakref.ref(x), x._version, weakref.ref(cast))
    return cast


def _attach(
    module: nn.Module,
    params: dict[str, nn.Parameter],
    sink: Sink,
    batch_size: BatchSize,
    *,
    transposed: bool,
) -> Forward:
    rule = CONV1D if transposed else LINEAR

    def on_backward(a: Tensor, g: Tensor) -> None:
        sink(Capture(rule, module, params, a=a, g=g))

    def forward(x: Tensor) -> Tensor:
        return _CaptureLinear.apply(x, module.weight, module.bias, transposed, on_backward)

    return forward


def _flat(cap: Capture) -> tuple[Tensor, Tensor]:
    """a as (B, T, in) and g as (B, T, out) in the matmul dtype of the forward (T = 1 for 2-D)."""
    b = cap.g.shape[0]
    a = cap.a.reshape(b, -1, cap.a.shape[-1])
    g = cap.g.reshape(b, -1, cap.g.shape[-1])
    return a, g.to(a.dtype)


def use_ghost(units: Units, steps: int, d_in: int, d_out: int) -> bool:
    """Ghost norm costs P·T²·(in+out); instantiating per-example gradients costs B·T·in·out."""
    ghost = units.pair_i.numel() * steps * steps * (d_in + d_out)
    return ghost < units.index.numel() * steps * d_in * d_out


def _unit_weight_grads(a: Tensor, g: Tensor, units: Units) -> Tensor:
    """(U, out, in) fp32 per-unit gradients, formed from the same fp32 a and g as `_clipped_sum`.

    A bf16 product would round each example's gradient (up to 2^-8 relative) before its norm is
    taken, while the clipped sum is exact: a unit could then contribute up to 1.004·C.
    """
    return units.sum_examples(torch.einsum("bto,bti->boi", g.float(), a.float()))


def _sq_norms(cap: Capture, units: Units) -> dict[str, Tensor]:
    a, g = _flat(cap)
    out = {}
    if "weight" in cap.params:
        if use_ghost(units, a.shape[1], a.shape[2], g.shape[2]):
            # <a_e^T g_e, a_e'^T g_e'> = sum_{t,s} (a_et · a_e's)(g_et · g_e's)
            gram = units.gram(a, source=cap.a).flatten(1)
            out["weight"] = units.sum_pairs(torch.linalg.vecdot(gram, units.gram(g).flatten(1)))
        else:
            out["weight"] = _unit_weight_grads(a, g, units).square().sum((1, 2))
    if "bias" in cap.params:
        out["bias"] = units.sum_examples(g.sum(1, dtype=torch.float32)).square().sum(1)
    return out


def _unit_grads(cap: Capture, units: Units, name: str, *, transposed: bool) -> Tensor:
    a, g = _flat(cap)
    if name == "bias":
        return units.sum_examples(g.sum(1, dtype=torch.float32))
    grads = _unit_weight_grads(a, g, units)
    return grads.mT if transposed else grads


def _clipped_sum(cap: Capture, coef: Tensor, *, transposed: bool) -> dict[str, Tensor]:
    """sum_e coef_e a_e^T g_e by one fp32 matmul: the same work as a non-private weight gradient.

    Strictly fp32, also under bf16 autocast: a bf16 product would round each unit's scaled share and
    the layer's sum, and that rounding depends on the other units, so one unit could move the sum by
    more than C. The CPU has no bf16 matmul with fp32 output, hence the fp32 cost in bf16 mode.
    """
    a, g = _flat(cap)
    out = {}
    if "bias" in cap.params:
        out["bias"] = coef @ g.sum(1, dtype=torch.float32)
    if "weight" in cap.params:
        a, g = a.float(), g.float()
        if a.shape[-1] <= g.shape[-1]:  # scale the narrower operand
            a = a * coef[:, None, None]
        else:
            g = g * coef[:, None, None]
        a2, g2 = a.flatten(0, 1), g.flatten(0, 1)
        out["weight"] = a2.t() @ g2 if transposed else g2.t() @ a2
    return out


LINEAR = LayerRule(
    "linear",
    partial(_attach, transposed=False),
    _sq_norms,
    partial(_unit_grads, transposed=False),
    partial(_clipped_sum, transposed=False),
)
CONV1D = LayerRule(  # transformers' Conv1D stores its weight as (in, out)
    "conv1d",
    partial(_attach, transposed=True),
    _sq_norms,
    partial(_unit_grads, transposed=True),
    partial(_clipped_sum, transposed=True),
)
