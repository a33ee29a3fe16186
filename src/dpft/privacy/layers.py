"""The registry of per-layer rules: which rule clips which module type, shared parameters, and
which modules mix the examples of a batch (refused by the engine).

Extend by registering: `register_rule(MyLayer, MY_RULE)` for a new layer type (see
`dpft.privacy.rules.base.LayerRule`), `register_cross_rule("a", "b", fn)` for a cheap cross term
between two rules sharing a parameter. A model's own `*RMSNorm` class (one 1-D weight) gets the norm
rule; a Linear or Embedding subclass whose forward is the very code of a known variant (FalconLinear,
scaled word embeddings, OPT's positions: `dpft.privacy.rules.variants`) gets that variant's rule;
other modules without a rule get the generic torch.func rule.
"""

from __future__ import annotations

import ast
import inspect
import textwrap
from collections.abc import Callable
from functools import cache

from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from transformers.pytorch_utils import Conv1D

from dpft.privacy.rules.base import Capture, LayerRule, Units
from dpft.privacy.rules.embedding import EMBEDDING
from dpft.privacy.rules.generic import GENERIC
from dpft.privacy.rules.linear import CONV1D, LINEAR
from dpft.privacy.rules.norm import NORM, is_rms_norm
from dpft.privacy.rules.tied import embedding_linear_cross
from dpft.privacy.rules.tokens import per_token
from dpft.privacy.rules.variants import (
    POSITIONAL_EMBEDDING,
    SCALED_EMBEDDING,
    SCALED_EMBEDDING_PLAIN,
    opt_positions_forward,
    plain_linear_forward,
    scaled_forward_cast,
    scaled_forward_plain,
)

CrossRule = Callable[[Capture, Capture, Units], Tensor]

# Linear and norm layers act on each row alone: they also take the batch flattened into (B·T, d)
# rows (OPT's feed-forward block, Qwen2-MoE's shared expert); see `dpft.privacy.rules.tokens`.
TOKEN_LINEAR, TOKEN_NORM = per_token(LINEAR), per_token(NORM)
RULES: dict[type[nn.Module], LayerRule] = {
    nn.Linear: TOKEN_LINEAR,
    Conv1D: CONV1D,
    nn.Embedding: EMBEDDING,
    nn.LayerNorm: TOKEN_NORM,
    nn.RMSNorm: TOKEN_NORM,
}
# Subclasses that override forward with exactly one of these functions' code get their rule.
VARIANTS: list[tuple[type[nn.Module], Callable, LayerRule]] = [
    (nn.Linear, plain_linear_forward, TOKEN_LINEAR),
    (nn.Embedding, scaled_forward_cast, SCALED_EMBEDDING),
    (nn.Embedding, scaled_forward_plain, SCALED_EMBEDDING_PLAIN),
    (nn.Embedding, opt_positions_forward, POSITIONAL_EMBEDDING),
]
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

    A subclass that overrides forward computes something else: it must not be replaced by its
    parent's forward. It gets a variant's rule when its forward is that variant's code (compared as
    syntax, annotations and docstrings aside), else the generic rule.
    """
    for cls in type(module).__mro__:
        if cls in RULES and type(module).forward is cls.forward:
            return RULES[cls]
    own = _fingerprint(type(module).forward)
    for base, reference, rule in VARIANTS:
        if own is not None and isinstance(module, base) and own == _fingerprint(reference):
            return rule
    return TOKEN_NORM if is_rms_norm(module) else GENERIC  # each model ships its own RMSNorm class


@cache
def _fingerprint(fn: Callable) -> str | None:
    """fn's code as a syntax tree (name, annotations, decorators and docstring left out), if found."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(fn)))
    except (OSError, TypeError, SyntaxError):
        return None
    node = tree.body[0] if tree.body else None
    if not isinstance(node, ast.FunctionDef):
        return None
    node.name, node.returns, node.decorator_list = "forward", None, []
    args = node.args
    for arg in [*args.posonlyargs, *args.args, *args.kwonlyargs, args.vararg, args.kwarg]:
        if arg is not None:
            arg.annotation = None
    body = node.body
    if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
        node.body = body[1:]  # the docstring
    return ast.dump(node)


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
