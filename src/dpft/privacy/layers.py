"""The registry of per-layer rules: which rule clips which module type, and shared parameters.

Extend by registering: `register_rule(MyLayer, MY_RULE)` for a new layer type (see
`dpft.privacy.rules.base.LayerRule`), `register_cross_rule("a", "b", fn)` for a cheap cross term
between two rules sharing a parameter. A model's own `*RMSNorm` class (one 1-D weight) gets the norm
rule; other modules without a rule get the generic torch.func rule.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor, nn
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
