"""Per-unit gradient clipping in one backward pass (book-keeping, after Bu et al.'s fastDP).

Each trainable module's forward is replaced by one whose backward records what its rule needs
(input activations and output gradients) instead of forming weight gradients. After the backward:
per-unit norms over all parameters (tied ones included) -> clip factors -> the clipped sum, one
matmul per layer, accumulated in fp32 until `take_sums`. Noise and scaling happen in `privacy/step.py`,
on the fp32 sums: nothing is rounded to the weights' dtype before the noise is added.

With a `SumSink` (FSDP2: `privacy/sharded.py`), nothing is accumulated here: each parameter's
clipped sum over a micro-batch is handed to the sink as soon as the last layer using it is summed,
and the sink is told when the micro-batch ends.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from itertools import combinations
from typing import Protocol

import torch
from torch import Tensor, nn

from dpft.errors import ConfigError
from dpft.privacy.layers import cross_term, mixes_examples, rule_for
from dpft.privacy.rules.base import Capture, Units

EPS = 1e-6  # in c_u = min(1, C / (norm_u + EPS))


class GradAccumulator(Protocol):
    """What the training loop needs: one backward per micro-batch, then grads per logical step."""

    def backward(self, example_losses: Tensor, unit_index: Tensor) -> Tensor: ...
    def take_sums(self) -> dict[str, Tensor]: ...
    def remove(self) -> None: ...


class SumSink(Protocol):
    """Takes the clipped sums micro-batch by micro-batch instead of the engine (FSDP2: sharded sums).

    `add` gets each parameter's clipped sum over the micro-batch (full shape, fp32) once, complete,
    in the order the parameters complete; `end_micro_batch` follows the micro-batch's last `add`.
    """

    def add(self, name: str, clipped: Tensor) -> None: ...
    def end_micro_batch(self) -> None: ...


def make_accumulator(model: nn.Module, max_grad_norm: float | None) -> GradAccumulator:
    """The per-unit clipper, or the non-private baseline when `max_grad_norm` is None (--no-dp)."""
    if max_grad_norm is None:
        return PlainAccumulator(model)
    return PerUnitClipper(model, max_grad_norm)


def _trainable(model: nn.Module) -> dict[str, nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}  # tied: listed once


def _units_of(example_losses: Tensor, unit_index: Tensor) -> Units:
    if example_losses.dim() != 1 or unit_index.shape != example_losses.shape:
        raise ValueError("example_losses and unit_index must both have shape (B,)")
    if example_losses.numel() == 0 or unit_index.dtype != torch.long or int(unit_index.min()) < 0:
        raise ValueError("unit_index must be a non-empty long tensor of values 0..U-1")
    return Units.from_index(unit_index)


class PerUnitClipper:
    """Accumulates sum_u min(1, C / ||g_u||) g_u over the units of every micro-batch of a step.

    Args:
        model: the model; every module owning a trainable parameter is attached (restored by
            `remove`).
        max_grad_norm: the clipping bound C > 0.
        sink: where each micro-batch's clipped sums go, parameter by parameter, instead of being
            accumulated here (then `take_sums` is not available).

    Raises:
        ConfigError: C is not positive, the model has a trainable module dpft cannot clip, or a
            module that mixes the examples of a batch (`dpft.privacy.layers.mixes_examples`).
    """

    def __init__(self, model: nn.Module, max_grad_norm: float, sink: SumSink | None = None):
        if not (max_grad_norm > 0 and math.isfinite(max_grad_norm)):
            raise ConfigError([f"max_grad_norm must be a positive number, got {max_grad_norm}"])
        self.max_grad_norm = float(max_grad_norm)
        self._model = model
        self._params = _trainable(model)
        self._param_names = {id(p): n for n, p in self._params.items()}
        self._module_names = {id(m): n or "model" for n, m in model.named_modules()}
        self._captures: list[Capture] = []  # filled by the rules during backward
        self._sums: dict[str, Tensor] = {}  # fp32 accumulators, by parameter name
        self._sink = sink
        self._batch_size: int | None = None
        self._patched: list[tuple[nn.Module, object]] = []
        self._hooks = [
            model.register_forward_pre_hook(self._note_batch_size, with_kwargs=True),
            model.register_forward_hook(self._forget_batch_size),
        ]
        try:
            self._attach()
        except Exception:
            self.remove()
            raise

    def _attach(self) -> None:
        self._refuse_batch_mixing()
        for module in self._model.modules():
            params = {n: p for n, p in module.named_parameters(recurse=False) if p.requires_grad}
            if params:
                forward = rule_for(module).attach(module, params, self._captures.append, lambda: self._batch_size)
                self._patched.append((module, module.__dict__.get("forward")))
                module.forward = forward  # instance attribute: the class is untouched

    def _refuse_batch_mixing(self) -> None:
        """At attach and before every backward: `model.train()` may come after the attach."""
        for name, module in self._model.named_modules():
            if (why := mixes_examples(module)) is not None:
                raise ConfigError(
                    [
                        f"module '{name or 'model'}' ({type(module).__name__}) {why}, so each "
                        "example's gradient depends on the others and clipping cannot bound what "
                        "one unit changes; use a per-example norm (LayerNorm, GroupNorm) or eval mode"
                    ]
                )

    def _note_batch_size(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        x = kwargs.get("input_ids", kwargs.get("inputs_embeds"))
        if x is None and args and isinstance(args[0], Tensor):
            x = args[0]
        self._batch_size = x.shape[0] if isinstance(x, Tensor) and x.dim() >= 2 else None

    def _forget_batch_size(self, module: nn.Module, args: tuple, output: object) -> None:
        self._batch_size = None  # a later call of a submodule alone must not see a stale size

    def backward(self, example_losses: Tensor, unit_index: Tensor) -> Tensor:
        """One backward pass over a micro-batch; adds its units' clipped gradients to the sum.

        Args:
            example_losses: (B,) per-example losses (each the mean over its own target tokens).
            unit_index: (B,) long, the unit (0..U-1) of each example; units are never split
                across micro-batches.

        Returns:
            (U,) fp32 pre-clip gradient norms of the units (NaN for a non-finite one, which is
            dropped from the sum: contributing nothing is within the sensitivity bound).

        Raises:
            ConfigError: a trainable parameter got a gradient outside its module's rule, a
                module's input rows are not the examples, or a module mixes the examples (BatchNorm
                put in training mode after the attach).
        """
        units = _units_of(example_losses, unit_index)
        self._refuse_batch_mixing()
        # Every parameter that can take a gradient now, not only those known at attach: a module
        # replaced since (accelerate's fp8 conversion) has new parameters no rule clips.
        current = _trainable(self._model)
        for p in current.values():
            p.grad = None  # any gradient found after the backward escaped the rules
        self._captures.clear()
        # Gradient checkpointing re-runs blocks' forwards in this backward, without the model's
        # hooks: they must see this batch's size too (a (1, T) position lookup inside a block).
        self._batch_size = units.index.numel()
        try:
            example_losses.sum().backward()
        finally:
            self._batch_size = None
        captures = list(self._captures)
        self._captures.clear()
        self._check(captures, units, current)
        # No graph on the saved activations (they still require grad), and no autocast: a caller's
        # bf16 region would round the Grams, norms and sums, and a norm rounded down lets a unit
        # contribute more than C.
        with torch.no_grad(), torch.autocast(example_losses.device.type, enabled=False):
            norms = self._unit_sq_norms(captures, units).clamp_min(0).sqrt()
            factors = (self.max_grad_norm / (norms + EPS)).clamp(max=1.0)
            finite = torch.isfinite(norms)
            if not bool(finite.all()):  # a host sync, only when something is already wrong
                factors = torch.where(finite, factors, 0.0)
                _drop_examples(captures, finite[units.index])
            self._accumulate(captures, factors[units.index])
        return norms

    def _check(self, captures: list[Capture], units: Units, current: dict[str, nn.Parameter]) -> None:
        stray = [(n, p) for n, p in current.items() if p.grad is not None]
        if stray:
            name, param = stray[0]
            raise ConfigError([_stray_problem(name, id(param) in self._param_names)])
        for cap in captures:
            if cap.batch_size != units.index.numel():
                name = self._module_names[id(cap.module)]
                raise ConfigError([_rows_problem(name, cap.batch_size, units.index.numel())])

    def _unit_sq_norms(self, captures: list[Capture], units: Units) -> Tensor:
        """sum over parameters of ||grad_u||², with cross terms where modules share a parameter."""
        total = torch.zeros(units.count, device=units.index.device)
        uses: dict[str, list[tuple[Capture, str]]] = defaultdict(list)
        for cap in captures:
            for name, sq in cap.rule.sq_norms(cap, units).items():
                total += sq
                uses[self._param_names[id(cap.params[name])]].append((cap, name))
        for contributions in uses.values():
            for first, second in combinations(contributions, 2):
                total += 2 * cross_term(first, second, units)
        return total

    def _accumulate(self, captures: list[Capture], coef: Tensor) -> None:
        sink = self._sink  # with one, a parameter's sum leaves once its last capture is summed
        left = Counter(self._param_names[id(p)] for cap in captures for p in cap.params.values()) if sink else None
        while captures:  # pop: a layer's activations are freed once its sum is formed
            cap = captures.pop()
            for name, clipped in cap.rule.clipped_sum(cap, coef).items():
                key = self._param_names[id(cap.params[name])]
                if key in self._sums:
                    self._sums[key].add_(clipped)
                else:
                    self._sums[key] = clipped
                if left is not None:
                    left[key] -= 1
                    if left[key] == 0:
                        sink.add(key, self._sums.pop(key))
        if sink is not None:
            for key in list(self._sums):  # a rule that summed fewer parameters than it captured
                sink.add(key, self._sums.pop(key))
            sink.end_micro_batch()

    def take_sums(self) -> dict[str, Tensor]:
        """The step's clipped sums, fp32, by parameter name (zeros where nothing was added); resets."""
        if self._sink is not None:
            raise RuntimeError("the clipped sums went to the sink, micro-batch by micro-batch")
        sums = {name: self._sums.pop(name, None) for name in self._params}
        return {
            name: torch.zeros(p.shape, dtype=torch.float32, device=p.device) if sums[name] is None else sums[name]
            for name, p in self._params.items()
        }

    def remove(self) -> None:
        """Restore every patched forward and drop the hook and any accumulated state."""
        for module, previous in reversed(self._patched):
            if previous is None:
                del module.forward
            else:
                module.forward = previous
        self._patched.clear()
        for hook in self._hooks:
            hook.remove()
        self._captures.clear()
        self._sums.clear()


def _stray_problem(name: str, attached: bool) -> str:
    """Why a parameter got a plain (unclipped) gradient in the backward."""
    if attached:
        return f"parameter '{name}' is used outside the module that owns it; its per-unit gradient cannot be clipped"
    return (
        f"parameter '{name}' was not trainable when dpft attached (its module was replaced or unfrozen "
        "since); its gradient would not be clipped: freeze or replace modules before training starts"
    )


def _rows_problem(name: str, rows: int, batch: int) -> str:
    """Why a module's input rows cannot be told apart by example, in the user's terms."""
    if rows == 1:
        what = f"one row shared by all {batch} examples of the batch"
    elif rows % batch == 0:
        what = (
            f"{rows} = {batch} × {rows // batch} rows for {batch} examples: the examples were "
            "flattened into rows (e.g. (batch·tokens, features))"
        )
    else:
        what = f"{rows} rows for {batch} examples"
    return (
        f"module '{name}' got an input of {what}; its first dimension must be the batch, one row "
        "per example, or its per-unit gradient cannot be computed"
    )


def _drop_examples(captures: list[Capture], keep: Tensor) -> None:
    """Zero the records of dropped examples so that their NaN/inf cannot reach the sum."""

    def clean(x: Tensor) -> Tensor:
        if not x.is_floating_point():
            return x
        return torch.where(keep.view(-1, *[1] * (x.dim() - 1)), x, 0)

    for cap in captures:
        cap.a = None if cap.a is None else clean(cap.a)
        cap.g = None if cap.g is None else clean(cap.g)
        cap.per_example = {n: clean(v) for n, v in cap.per_example.items()}


class PlainAccumulator:
    """The non-private baseline (--no-dp): plain summed gradients, same interface, no clipping.

    Args:
        model: the model whose trainable parameters receive the summed gradients.
    """

    def __init__(self, model: nn.Module):
        self._params = _trainable(model)
        self._fresh = True

    def backward(self, example_losses: Tensor, unit_index: Tensor) -> Tensor:
        """Backward of the summed losses, accumulating into p.grad; returns (U,) NaN norms."""
        units = _units_of(example_losses, unit_index)
        if self._fresh:  # first micro-batch of a step: forget the previous step's gradients
            for p in self._params.values():
                p.grad = None
            self._fresh = False
        example_losses.sum().backward()
        return torch.full((units.count,), math.nan, device=example_losses.device)

    def take_sums(self) -> dict[str, Tensor]:
        """The step's summed gradients, fp32, by parameter name (zeros where none); starts a new step."""
        sums = {}
        for name, p in self._params.items():
            sums[name] = (
                torch.zeros(p.shape, dtype=torch.float32, device=p.device) if p.grad is None else p.grad.float()
            )
            p.grad = None
        self._fresh = True
        return sums

    def remove(self) -> None:
        """Nothing is attached to the model; present so both accumulators read the same."""
