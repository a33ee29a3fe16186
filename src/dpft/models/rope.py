"""RoPE variants whose frequencies follow the batch, refused where a training example can reach them.

"dynamic" (NTK) RoPE recomputes its frequencies from the micro-batch's longest position once it passes
`max_position_embeddings`, and "longrope" switches to its long factors once it passes
`original_max_position_embeddings`. Past those lengths one example's output, and so its gradient,
depends on how long the other examples of its micro-batch are: clipping no longer bounds what one
unit changes. Up to them the frequencies are fixed, so a max_length within them is accepted.
"""

from __future__ import annotations

from typing import Any

from dpft.errors import ConfigError


def check_rope(config: Any, max_length: int) -> None:
    """Refuse a batch-dependent RoPE (dynamic, longrope) when examples may be longer than its fixed range.

    Args:
        config: the model's config (transformers 5 keeps RoPE in `rope_parameters`, older ones in
            `rope_scaling`; either may be nested by layer type); None for a model without one.
        max_length: the longest training example, in tokens.

    Raises:
        ConfigError: such a RoPE with max_length above its fixed range.
    """
    if config is None:
        return
    if hasattr(config, "get_text_config"):
        config = config.get_text_config()
    for params in _rope_parameters(config):
        kind = str(params.get("rope_type", params.get("type", "default")))
        if "dynamic" not in kind and kind != "longrope":  # transformers' own test (modeling_rope_utils)
            continue
        limit = _fixed_range(config, params)
        if limit is None or max_length > limit:
            raise ConfigError([_problem(kind, limit, max_length)])


def _rope_parameters(config: Any) -> list[dict]:
    """The RoPE settings, one dict per layer type (a single one for most models)."""
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None)
    if not isinstance(rope, dict):
        return []
    nested = [v for v in rope.values() if isinstance(v, dict)]
    return nested or [rope]


def _fixed_range(config: Any, params: dict) -> int | None:
    """The longest sequence whose frequencies are the pretrained ones (the smallest limit given)."""
    found = (
        params.get("original_max_position_embeddings"),
        getattr(config, "original_max_position_embeddings", None),
        getattr(config, "max_position_embeddings", None),
    )
    limits = [int(v) for v in found if v is not None]
    return min(limits) if limits else None


def _problem(kind: str, limit: int | None, max_length: int) -> str:
    why = f"rope_type '{kind}' recomputes its frequencies from the micro-batch's longest example"
    if limit is None:
        return f"{why} and the config gives no max_position_embeddings; train a model with a fixed RoPE"
    return (
        f"{why} beyond {limit} positions, so one unit's gradient depends on the others; set max_length <= {limit} "
        f"(it is {max_length})"
    )
