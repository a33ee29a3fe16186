"""The shared vocabulary of layer rules: units of a micro-batch, captures, and the rule record."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn


@dataclass(frozen=True)
class Units:
    """Which examples of a micro-batch belong to which privacy unit.

    `pair_i`, `pair_j` list every ordered pair (e, e') of examples of the same unit (e = e'
    included): a unit's squared gradient norm is the sum over its pairs of <grad_e, grad_e'>.
    """

    index: Tensor  # (B,) long: unit of each example
    count: int  # U
    pair_i: Tensor  # (P,) long
    pair_j: Tensor  # (P,) long
    pair_unit: Tensor  # (P,) long
    # The last shared Gram and the captured tensor it was computed from: q, k and v (gate and up)
    # read one input tensor, and come back to back.
    memo: list[tuple[Tensor, Tensor]] = field(default_factory=list, compare=False, repr=False)

    @staticmethod
    def from_index(unit_index: Tensor) -> Units:
        """Build the pairs of a micro-batch from its (B,) unit index (values 0..U-1)."""
        same = unit_index[:, None] == unit_index[None, :]
        pair_i, pair_j = same.nonzero(as_tuple=True)
        count = int(unit_index.max()) + 1  # a host sync, once per micro-batch
        return Units(unit_index, count, pair_i, pair_j, unit_index[pair_i])

    @property
    def one_per_unit(self) -> bool:
        """True when every unit has a single example (record-level privacy)."""
        return self.pair_i.numel() == self.index.numel()

    def left(self, x: Tensor) -> Tensor:
        """Rows of x for the first member e of every pair (B rows in, P rows out)."""
        return x if self.one_per_unit else x[self.pair_i]  # pairs (e, e) in order: no copy

    def right(self, x: Tensor) -> Tensor:
        """Rows of x for the second member e' of every pair."""
        return x if self.one_per_unit else x[self.pair_j]

    def gram(self, x: Tensor, source: Tensor | None = None) -> Tensor:
        """(P, T, T) fp32 Grams <x_et, x_e's> of every pair, for x of shape (B, T, d).

        Always an fp32 matmul, also under bf16 autocast: a bf16 Gram rounds each entry (~0.2%), and
        a norm underestimated by that much lets a clipped unit exceed C. Correct clipping is worth the
        fp32 cost (the CPU has no bf16 matmul with fp32 output).

        Args:
            x: the rows, (B, T, d).
            source: the captured tensor x was read from, when it may be the next layer's input too.
                Its Gram is kept, with the tensor itself, until another comes. The hit test is
                identity of that held object, never a memory address: a freed temporary's address is
                reused by the next layer's, and a Gram found by address would be another layer's.
        """
        if source is not None and self.memo and self.memo[0][0] is source:
            return self.memo[0][1]
        x = x.float()
        gram = torch.bmm(self.left(x), self.right(x).mT)
        if source is not None:
            self.memo[:] = [(source, gram)]
        return gram

    def sum_pairs(self, values: Tensor) -> Tensor:
        """Sum (P,) pair values into (U,) unit values."""
        out = torch.zeros(self.count, dtype=values.dtype, device=values.device)
        return out.index_add_(0, self.pair_unit, values)

    def sum_examples(self, x: Tensor) -> Tensor:
        """Sum (B, ...) per-example rows into (U, ...) per-unit rows."""
        out = torch.zeros((self.count, *x.shape[1:]), dtype=x.dtype, device=x.device)
        return out.index_add_(0, self.index, x)


@dataclass
class Capture:
    """What one call of a handled module left behind in the backward pass.

    Linear-like and embedding rules keep the module input `a` (activations or token ids) and the
    gradient of its output `g`, both with the examples on dim 0; the generic rule keeps the
    per-example parameter gradients it had to form anyway (`per_example`, fp32).
    """

    rule: LayerRule
    module: nn.Module
    params: dict[str, nn.Parameter]  # the module's trainable parameters, by attribute name
    a: Tensor | None = None
    g: Tensor | None = None
    per_example: dict[str, Tensor] = field(default_factory=dict)

    @property
    def batch_size(self) -> int:
        """Number of examples this capture has rows for."""
        if self.g is not None:
            return self.g.shape[0]
        return next(iter(self.per_example.values())).shape[0]


Sink = Callable[[Capture], None]
BatchSize = Callable[[], int | None]  # batch size of the forward pass in progress, if known
Forward = Callable[..., Tensor]


@dataclass(frozen=True)
class LayerRule:
    """The four small functions that make a layer type clippable.

    attach(module, params, sink, batch_size) -> a replacement forward that computes the same output
        and, in the backward, hands a Capture to `sink` instead of producing weight gradients.
    sq_norms(capture, units) -> {param name: (U,) squared norm of each unit's gradient}.
    unit_grads(capture, units, name) -> (U, *param.shape) per-unit gradients (instantiated; used
        only for parameters shared with another module that has no dedicated cross rule).
    clipped_sum(capture, coef) -> {param name: sum_e coef[e] * grad_e}, fp32, param-shaped.
    """

    name: str
    attach: Callable[[nn.Module, dict[str, nn.Parameter], Sink, BatchSize], Forward]
    sq_norms: Callable[[Capture, Units], dict[str, Tensor]]
    unit_grads: Callable[[Capture, Units, str], Tensor]
    clipped_sum: Callable[[Capture, Tensor], dict[str, Tensor]]


def compute_dtype(x: Tensor) -> torch.dtype:
    """The dtype a matmul on floating x runs in: the autocast dtype when autocast is on."""
    device = x.device.type
    if x.is_floating_point() and torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return x.dtype
