"""The registry of per-layer rules: which rule clips which module type, shared parameters, and
which modules mix the examples of a batch (refused by the engine).

Extend by registering: `register_rule(MyLayer, MY_RULE)` for a new layer type (see
`dpft.privacy.rules.base.LayerRule`), `register_cross_rule("a", "b", fn)` for a cheap cross term
between two rules sharing a parameter. A model's own `*RMSNorm` class (one 1-D weight) gets the norm
rule; other modules without a rule get the generic torch.func rule.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from transformers.pytorch_utils import Conv1D

from dpft.privacy.rules.base import Capture, LayerRule, Units
from dpft.privacy.rules.embedding import EMBEDDING
from dpft.privacy.rules.generic import GENERIC
from dpft.privacy.rules.linear import CONV1D, LINEAR
from dpft.privacy.rules.norm import NORM, is_rms_norm
from dpft.privacy.rules.tied import embedding_linear_cross

CrossRule = Callable[[Capture, Capture, Units], Tensor]

RULES: dict[type[nn.Module], LayerRule] = {
    nn.Linear: LINEAR,
    Conv1D: CONV1D,
    nn.Embedding: EMBEDDING,
    nn.LayerNorm: NORM,
    nn.RMSNorm: NORM,
}
CROSS_RULES: dict[tuple[str, str], CrossRule] = {
    ("embedding", "linear"): embedding_linear_cross,
}


def register_rule(module_type: type[nn.Module], rule: LayerRule) -> None:
    """Clip modules of `module_type` (and subclasses that keep its forward) with `rule`."""
    RULES[module_type] = rule


def register_cross_rule(first: str, second: str, fn: CrossRule) -> None:
    """Use fn(first_capture, second_capture, units) -> (U,) <G1_u, G2_u> for shared weights."""
    CROSS_RULES[(first, second)] = fn


def rule_for(module: nn.Module) -> LayerRule:
    """The rule of the nearest registered class whose forward the module still uses, else generic.

    A subclass that overrides forward (e.g. a scaled embedding) computes something else: it must
    not be replaced by its parent's forward, so it falls back to the generic rule.
    """
    for cls in type(module).__mro__:
        if cls in RULES and type(module).forward is cls.forward:
            return RULES[cls]
    return NORM if is_rms_norm(module) else GENERIC  # each model ships its own RMSNorm class


def cross_term(first: tuple[Capture, str], second: tuple[Capture, str], units: Units) -> Tensor:
    """<G1_u, G2_u> between two contributions to one parameter's per-unit gradient.

    Args:
        first: a capture and the name under which its module holds the shared parameter.
        second: the other capture and name.
        units: the micro-batch's units.

    Returns:
        (U,) fp32 inner products, one per unit.
    """
    (c1, n1), (c2, n2) = first, second
    if (fn := CROSS_RULES.get((c1.rule.name, c2.rule.name))) is not None:
        return fn(c1, c2, units)
    if (fn := CROSS_RULES.get((c2.rule.name, c1.rule.name))) is not None:
        return fn(c2, c1, units)
    g1, g2 = c1.rule.unit_grads(c1, units, n1), c2.rule.unit_grads(c2, units, n2)
    return (g1 * g2).flatten(1).sum(1)  # instantiation: fine for anything but huge tables


def mixes_examples(module: nn.Module) -> str | None:
    """Why `module`'s output for one example depends on the other examples of the batch, if it does.

    Per-unit clipping needs every example's loss to depend on its own input only: a module that
    mixes the batch (trainable or frozen, anywhere in the model) makes each example's gradient
    depend on the others, so removing one unit moves the others' clipped gradients too and the
    sum by more than C. This is a check by type and state: BatchNorm (SyncBatchNorm and the lazy
    ones included) normalising with the batch's statistics. LayerNorm, GroupNorm, InstanceNorm and
    RMSNorm normalise each example alone.

    A general probe (batch of two vs each example alone, on dummy input) was not chosen: in
    training mode dropout makes the two runs differ anyway, switching to eval mode hides exactly
    the BatchNorm case, the probe would update BatchNorm's running statistics, and mixing that
    depends on the data (mixture-of-experts capacity limits) does not show on dummy input.
    """
    if isinstance(module, _BatchNorm) and (module.training or module.running_mean is None):
        return "normalises with the whole batch's statistics (training mode, or no running statistics)"
    return None
