"""Per-token layers (linear, norm) fed the batch's tokens flattened into rows: (B·T, d).

OPT's feed-forward block and Qwen2-MoE's shared expert call their Linear and LayerNorm layers on
`hidden_states.reshape(-1, d)`. The layer itself treats each row alone, so running it on the same
rows viewed as (B, T, d) computes the same output, and the wrapped rule then sees one row per
example. That view is right only if the rows are example-major (row r belongs to example r // T),
which is what `reshape(-1, d)` of a (B, T, d) tensor gives. A model that flattens in another order
(tokens first) would be given wrong per-example gradients: the probe
(`dpft.models.probe.check_trainable`) compares the engine with an explicit per-unit loop on a dummy
batch before a run starts, which a model flattening in another order fails.
"""

from __future__ import annotations

from dataclasses import replace

from torch import Tensor, nn

from dpft.privacy.rules.base import BatchSize, Forward, LayerRule, Sink


def flattened_rows(x: object, batch: int | None) -> bool:
    """True when x is a (B·T, d) tensor for a batch of B examples (T > 1)."""
    return (
        isinstance(x, Tensor) and batch is not None and x.dim() == 2 and x.shape[0] != batch and x.shape[0] % batch == 0
    )


def per_token(rule: LayerRule) -> LayerRule:
    """`rule` for a layer that acts on each row alone, also when called on flattened rows."""

    def attach(module: nn.Module, params: dict, sink: Sink, batch_size: BatchSize) -> Forward:
        inner = rule.attach(module, params, sink, batch_size)

        def forward(*args: object, **kwargs: object) -> Tensor:
            b = batch_size()
            if len(args) == 1 and not kwargs and flattened_rows(args[0], b):
                x = args[0]
                y = inner(x.reshape(b, -1, x.shape[-1]))  # example-major rows: see the module doc
                return y.reshape(x.shape[0], *y.shape[2:])
            return inner(*args, **kwargs)

        return forward

    return replace(rule, attach=attach)
