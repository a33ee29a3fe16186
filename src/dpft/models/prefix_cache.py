"""Frozen-prefix reuse: compute each example's hidden state below the adapted blocks once.

With `--lora-layers N` the embedding and the blocks below the last N are frozen and, without
dropout, deterministic: an example's hidden state at the boundary is the same every time the
example is drawn. `PrefixCache.build` runs that frozen bottom once per example (no_grad, batched by
length) and keeps the states in memory, unpadded; `PrefixCache.logits` runs only the top blocks,
the final norm and the LM head for a micro-batch, with the same rotary positions and the same
(right-)padding and causal mask as the full forward of a `dpft.data.collate` batch.

Privacy: a cached state is computed from its own example alone (right padding is masked out and
rows never mix), so reuse changes nothing in what a step's gradients depend on.

Supported: Llama-family decoders with the transformers structure `model.embed_tokens`,
`model.layers`, `model.norm`, `model.rotary_emb`, `lm_head` (model types in `SUPPORTED`), peft-
wrapped or not, with `PerUnitClipper` attached or not.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from dpft.errors import ConfigError
from dpft.training.loss import IGNORE, example_losses, next_token_targets, token_losses

SUPPORTED = ("llama", "qwen2")
_DROPOUT_FIELDS = ("attention_dropout", "hidden_dropout", "embd_pdrop", "resid_pdrop", "attn_pdrop")


@dataclass(frozen=True)
class _Parts:
    core: nn.Module  # the decoder stack (LlamaModel-like)
    head: nn.Module  # lm_head
    config: Any


def _parts(model: nn.Module) -> _Parts:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # peft: the wrapped LM
    config = getattr(base, "config", None)
    model_type = getattr(config, "model_type", None)
    core, head = getattr(base, "model", None), getattr(base, "lm_head", None)
    missing = [a for a in ("embed_tokens", "layers", "norm", "rotary_emb") if not hasattr(core, a)]
    if model_type not in SUPPORTED or head is None or missing:
        raise ConfigError(
            [
                f"the frozen-prefix cache supports {', '.join(SUPPORTED)} decoders, not model type "
                f"'{model_type}'; train without it (every step runs the whole model)"
            ]
        )
    return _Parts(core, head, config)


def frozen_boundary(model: nn.Module) -> int:
    """How many leading blocks are frozen (and so cacheable): 0 when the embedding is trainable.

    Raises:
        ConfigError: an unsupported architecture.
    """
    parts = _parts(model)
    if any(p.requires_grad for p in parts.core.embed_tokens.parameters()):
        return 0
    for i, block in enumerate(parts.core.layers):
        if any(p.requires_grad for p in block.parameters()):
            return i
    return len(parts.core.layers)


def _check_frozen(parts: _Parts, boundary: int) -> None:
    """The bottom must be a fixed function of its input: no trainable parameter, no dropout."""
    n = len(parts.core.layers)
    if not 1 <= boundary <= n:
        raise ConfigError([f"the prefix-cache boundary must be between 1 and {n} (the model's blocks), not {boundary}"])
    below = [("embed_tokens", parts.core.embed_tokens)] + [
        (f"layers.{i}", parts.core.layers[i]) for i in range(boundary)
    ]
    problems = []
    for where, module in below:
        trainable = next((name for name, p in module.named_parameters() if p.requires_grad), None)
        if trainable is not None:
            problems.append(
                f"parameter '{where}.{trainable}' is trainable below the prefix-cache boundary "
                f"(block {boundary}): its hidden states change every step and cannot be cached"
            )
        dropout = next((m for m in module.modules() if isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0), None)
        if dropout is not None:
            problems.append(
                f"dropout (p={dropout.p}) in '{where}' below the prefix-cache boundary (block {boundary}) makes "
                "its hidden states random in training; disable it or train without the cache"
            )
    for field in _DROPOUT_FIELDS:
        p = float(getattr(parts.config, field, 0.0) or 0.0)
        if p > 0:
            problems.append(
                f"the model's {field}={p} makes the blocks below the prefix-cache boundary random in "
                "training; set it to 0 or train without the cache"
            )
    if problems:
        raise ConfigError(problems)


def _run_blocks(parts: _Parts, hidden: Tensor, attention_mask: Tensor, blocks: range) -> Tensor:
    """The decoder blocks `blocks` on `hidden` (B, T, H), as the model's own forward runs them."""
    from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

    positions = torch.arange(hidden.shape[1], device=hidden.device).unsqueeze(0)
    mask_args = dict(
        config=parts.config,
        inputs_embeds=hidden,
        attention_mask=attention_mask,
        past_key_values=None,
        position_ids=positions,
    )
    masks = {"full_attention": create_causal_mask(**mask_args)}
    layer_types = getattr(parts.config, "layer_types", None) or ["full_attention"] * len(parts.core.layers)
    if "sliding_attention" in layer_types:
        masks["sliding_attention"] = create_sliding_window_causal_mask(**mask_args)
    rotary = parts.core.rotary_emb(hidden, positions)
    for i in blocks:
        hidden = parts.core.layers[i](
            hidden, attention_mask=masks[layer_types[i]], position_embeddings=rotary, position_ids=positions
        )
    return hidden


@contextmanager
def _routed(model: nn.Module, forward: Callable) -> Iterator[None]:
    """Call `model` (its hooks included: PerUnitClipper's learns the batch size there) with another forward."""
    previous = model.__dict__.get("forward")
    model.forward = forward  # instance attribute, as the engine patches modules; restored below
    try:
        yield
    finally:
        if previous is None:
            del model.forward
        else:
            model.forward = previous


class PrefixCache:
    """Each example's hidden state entering block `boundary`, computed once; the top run per micro-batch.

    Build with `PrefixCache.build`. States are kept unpadded, one (length, hidden) tensor per
    example, in the dtype the bottom produced (fp32 weights: fp32; see `nbytes`).
    """

    def __init__(self, states: list[Tensor | None], boundary: int, core: nn.Module):
        self._states = states
        self.boundary = boundary
        self._core_id = id(core)

    @classmethod
    def build(
        cls,
        model: nn.Module,
        examples: Sequence[Any],
        boundary: int | None = None,
        batch_size: int = 32,
        only: Iterable[int] | None = None,
    ) -> PrefixCache:
        """Run the embedding and blocks 0..boundary-1 once per example, without gradients.

        Args:
            model: the (peft-wrapped) causal LM that will be trained; a PerUnitClipper may be
                attached already.
            examples: `dpft.data.Example`s (anything with `input_ids`) or token-id sequences,
                indexed as `logits` will later be called.
            boundary: the first block that is run per step; default `frozen_boundary(model)`.
            batch_size: examples per no_grad forward (sorted by length, so little padding).
                Under bf16 autocast, call this inside the same autocast context as training.
            only: cache just these example indices (e.g. those of the units kept by
                --max-records-per-user); `logits` refuses the others.

        Raises:
            ConfigError: unsupported architecture, no frozen block, or something trainable or
                random below the boundary.
        """
        parts = _parts(model)
        boundary = frozen_boundary(model) if boundary is None else boundary
        _check_frozen(parts, boundary)
        seqs = [list(getattr(e, "input_ids", e)) for e in examples]
        wanted = range(len(seqs)) if only is None else sorted(set(only))
        if not wanted or min(len(seqs[i]) for i in wanted) < 1:
            raise ConfigError(["the prefix cache needs at least one example, each with at least one token"])
        device = parts.core.embed_tokens.weight.device
        order = sorted(wanted, key=lambda i: len(seqs[i]))
        states: list[Tensor | None] = [None] * len(seqs)
        with torch.no_grad():
            for start in range(0, len(order), max(1, batch_size)):
                chunk = order[start : start + max(1, batch_size)]
                width = len(seqs[chunk[-1]])
                ids = torch.zeros((len(chunk), width), dtype=torch.long, device=device)
                mask = torch.zeros((len(chunk), width), dtype=torch.long, device=device)
                for row, i in enumerate(chunk):
                    ids[row, : len(seqs[i])] = torch.tensor(seqs[i], dtype=torch.long)
                    mask[row, : len(seqs[i])] = 1
                hidden = _run_blocks(parts, parts.core.embed_tokens(ids), mask, range(boundary))
                for row, i in enumerate(chunk):
                    states[i] = hidden[row, : len(seqs[i])].clone()
        return cls(states, boundary, parts.core)

    def __len__(self) -> int:
        """How many examples are cached."""
        return sum(s is not None for s in self._states)

    @property
    def nbytes(self) -> int:
        """Memory held by the cached states."""
        return sum(s.numel() * s.element_size() for s in self._states if s is not None)

    def hidden(self, indices: Sequence[int], attention_mask: Tensor) -> Tensor:
        """The cached states of `indices`, right-padded with zeros to (B, T, H) like a collate batch.

        Raises:
            ValueError: `attention_mask` is not the right-padded mask of these examples.
        """
        states = [self._states[int(i)] for i in indices]
        if any(s is None for s in states):
            raise ValueError("an example of this micro-batch was not cached (see PrefixCache.build's `only`)")
        batch, width = attention_mask.shape
        lengths = torch.tensor([s.shape[0] for s in states], device=attention_mask.device)
        expected = torch.arange(width, device=attention_mask.device) < lengths.unsqueeze(1)
        if batch != len(states) or not torch.equal(attention_mask.bool(), expected):
            raise ValueError("attention_mask is not the right-padded mask (dpft.data.collate) of these examples")
        hidden = states[0].new_zeros((batch, width, states[0].shape[-1]))
        for row, state in enumerate(states):
            hidden[row, : state.shape[0]] = state
        return hidden

    def logits(self, model: nn.Module, indices: Sequence[int], attention_mask: Tensor) -> Tensor:
        """(B, T, V) logits of the examples `indices`, as `model(input_ids=..., attention_mask=...)` gives.

        Runs blocks boundary.. + final norm + LM head on the cached states, through `model`'s
        call so its hooks run with `inputs_embeds` of batch size B (PerUnitClipper needs that).

        Args:
            model: the model the cache was built from (the object the accumulator was given).
            indices: the examples of the micro-batch, in batch order.
            attention_mask: (B, T) the micro-batch's mask from `dpft.data.collate` (right padding).

        Raises:
            ConfigError: the bottom is no longer frozen, or the cache belongs to another model.
            ValueError: a mask that does not match the examples.
        """
        parts = self._usable(model)
        return self._top(model, parts, indices, attention_mask, head=True)

    def losses(self, model: nn.Module, indices: Sequence[int], batch: dict[str, Tensor]) -> Tensor:
        """(B,) per-example losses, as `example_losses(logits, batch["labels"])` gives (same semantics).

        With a frozen LM head, its logits are formed only at positions that have a target (not
        at padding nor at each example's last token): at the demo's lengths about a third less
        work in the 49k-vocab head. A trainable head gets the full (B, T, V) logits.

        Args:
            model, indices: as for `logits`.
            batch: the micro-batch from `dpft.data.collate` ("attention_mask", "labels").
        """
        parts = self._usable(model)
        labels = batch["labels"]
        if any(p.requires_grad for p in parts.head.parameters()):
            return example_losses(self._top(model, parts, indices, batch["attention_mask"], head=True), labels)
        hidden = self._top(model, parts, indices, batch["attention_mask"], head=False)
        targets = next_token_targets(labels)
        keep = targets != IGNORE
        rows, cols = keep.nonzero(as_tuple=True)
        nll = token_losses(parts.head(hidden[rows, cols]), targets[rows, cols])
        totals = torch.zeros(labels.shape[0], dtype=nll.dtype, device=nll.device).index_add(0, rows, nll)
        return totals / keep.sum(dim=1).clamp(min=1)

    def _usable(self, model: nn.Module) -> _Parts:
        parts = _parts(model)
        if id(parts.core) != self._core_id:
            raise ConfigError(["this prefix cache was built from another model"])
        _check_frozen(parts, self.boundary)
        return parts

    def _top(
        self, model: nn.Module, parts: _Parts, indices: Sequence[int], attention_mask: Tensor, head: bool
    ) -> Tensor:
        top = range(self.boundary, len(parts.core.layers))

        def forward(inputs_embeds: Tensor, attention_mask: Tensor) -> Tensor:
            hidden = parts.core.norm(_run_blocks(parts, inputs_embeds, attention_mask, top))
            return parts.head(hidden) if head else hidden

        hidden = self.hidden(indices, attention_mask)
        with _routed(model, forward):
            return model(inputs_embeds=hidden, attention_mask=attention_mask)
