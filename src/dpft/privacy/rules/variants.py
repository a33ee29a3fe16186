"""Subclasses of nn.Linear and nn.Embedding that override forward, yet compute what a rule handles.

- Linear subclasses whose forward is a plain linear map (Falcon's FalconLinear:
  `input @ weight.T + bias`): the linear rule, not a per-example copy of the weight.
- Scaled word embeddings (Gemma, Gemma2, Gemma3, ...): lookup × a constant scale. The engine's
  capture sits on the lookup, so what it records is the gradient of the unscaled lookup, and the
  embedding rule (norms, tied-head cross term, clipped sum) applies unchanged: no vocab × hidden
  gradient is ever formed per example.
- OPT's learned positional embedding: called with the attention mask; the positions it looks up
  are computed from that mask, one row per example.

Which classes qualify is decided in `dpft.privacy.layers` by comparing a class's forward with the
reference forwards below (same code, up to annotations and docstrings): a class whose forward
differs (another transformers version) is not matched and is refused cleanly rather than clipped
by a rule that computes something else.
"""

from __future__ import annotations

from functools import partial

import torch
from torch import Tensor, nn

from dpft.privacy.rules.base import BatchSize, Forward, LayerRule, Sink
from dpft.privacy.rules.embedding import EMBEDDING


# Reference forwards (never called): copies of the transformers code these rules reproduce.
def plain_linear_forward(self, input):
    hidden_states = input @ self.weight.T
    if self.bias is None:
        return hidden_states
    return hidden_states + self.bias


def scaled_forward_cast(self, input_ids):
    return super().forward(input_ids) * self.embed_scale.to(self.weight.dtype)


def scaled_forward_plain(self, input_ids):
    return super().forward(input_ids) * self.embed_scale


def opt_positions_forward(self, attention_mask, past_key_values_length=0, position_ids=None):
    if position_ids is None:
        position_ids = torch.cumsum(attention_mask, dim=1)
        position_ids = (position_ids * attention_mask - 1).long()
        # cut positions if `past_key_values_length` is > 0
        position_ids = position_ids[:, past_key_values_length:]

    return super().forward(position_ids + self.offset)


def _attach_scaled(module: nn.Module, params: dict, sink: Sink, batch_size: BatchSize, *, cast: bool) -> Forward:
    lookup = EMBEDDING.attach(module, params, sink, batch_size)

    def forward(input_ids: Tensor) -> Tensor:
        scale = module.embed_scale
        return lookup(input_ids) * (scale.to(module.weight.dtype) if cast else scale)

    return forward


def _attach_positions(module: nn.Module, params: dict, sink: Sink, batch_size: BatchSize) -> Forward:
    lookup = EMBEDDING.attach(module, params, sink, batch_size)

    def forward(attention_mask: Tensor, past_key_values_length: int = 0, position_ids: Tensor | None = None) -> Tensor:
        if position_ids is None:  # as OPTLearnedPositionalEmbedding.forward
            position_ids = torch.cumsum(attention_mask, dim=1)
            position_ids = (position_ids * attention_mask - 1).long()
            position_ids = position_ids[:, past_key_values_length:]
        return lookup(position_ids + module.offset)

    return forward


# Same name as the embedding rule: their captures are the embedding rule's (cross terms included).
SCALED_EMBEDDING = LayerRule(  # forward: lookup * embed_scale.to(weight.dtype)
    "embedding", partial(_attach_scaled, cast=True), EMBEDDING.sq_norms, EMBEDDING.unit_grads, EMBEDDING.clipped_sum
)
SCALED_EMBEDDING_PLAIN = LayerRule(  # forward: lookup * embed_scale
    "embedding", partial(_attach_scaled, cast=False), EMBEDDING.sq_norms, EMBEDDING.unit_grads, EMBEDDING.clipped_sum
)
POSITIONAL_EMBEDDING = LayerRule(
    "embedding", _attach_positions, EMBEDDING.sq_norms, EMBEDDING.unit_grads, EMBEDDING.clipped_sum
)
