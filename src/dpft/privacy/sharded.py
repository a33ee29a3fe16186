"""Sharded data parallelism (FSDP2, `torch.distributed.fsdp.fully_shard`): each rank keeps rows of
every parameter, and the noise goes onto each row once, by the rank that owns it.

The mechanism is the single-process one, as with `AllReduceSums` (privacy/distributed.py); only
where the sum and the noise land differs:

- each rank clips its own units against the unsharded (all-gathered) weights: FSDP2 swaps them
  into the modules for the forward and the backward, and the engine's rules read the module's
  current weights, so norms and clipped sums are those of the full model;
- FSDP2 reduce-scatters nothing: the engine's backward returns no weight gradient (its autograd
  functions hand (input, output grad) to the engine instead), so FSDP finds no gradient to reduce,
  and any gradient that did reach a parameter is refused by the engine's stray check;
- the clipped sums are sharded during the step, not at its end: `ReduceScatterSums` is the engine's
  sink (`PerUnitClipper(sink=...)`), so after every micro-batch's backward each parameter's
  full-shape fp32 clipped sum is handed over as soon as it is formed, and reduce-scattered, bucket
  by bucket, into this rank's fp32 row accumulator: rows [start_r, start_r + rows_r), FSDP2's own
  Shard(0) layout. The full-shape tensors are freed bucket by bucket, so a rank holds its rows of
  the step's sums (1/W of the model in fp32) plus about one bucket of full-shape sums, never the
  whole model's;
- the buckets are cut once, from the parameters' shapes, and reduce-scattered in one fixed order on
  every rank, each micro-batch (idle passes included: `recipe._idle_pass`); a bucket waits for its
  parameters and for the buckets before it, and `end_micro_batch` sends what is left, zeros for a
  parameter the micro-batch did not reach. One reduce-scatter per bucket per micro-batch: one per
  micro-batch for LoRA, a few for --full (where DDP does one all-reduce per logical step);
- at `PrivacyStep.finish`, once every micro-batch of the step is summed, each rank adds
  N(0, σ²C²) to its rows alone. The rows of the ranks tile every parameter exactly (checked at
  construction across the group), so every coordinate gets one draw, never W, and never one per
  micro-batch;
- ÷ the expected batch, and the rows become the sharded parameter's gradient (a DTensor), which
  the optimizer steps without any further collective.

Trust boundary: as with DDP, the links carry un-noised partial sums; the noise is added after the
reduce-scatters, so the rows a rank sends are un-noised too (Opacus's FSDP optimizer does the same).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.tensor import DTensor, Shard

from dpft.privacy.distributed import BUCKET_ELEMENTS
from dpft.privacy.noise import RowShard


def rows_of(length: int, world: int, rank: int) -> tuple[int, int]:
    """(start, rows) of rank's Shard(0) chunk of a dim of `length`, as torch.chunk (and FSDP2) cut it."""
    chunk = math.ceil(length / world) if length else 0
    start = min(rank * chunk, length)
    return start, min(chunk, length - start)


class ReduceScatterSums:
    """The engine's sink for a model sharded by `fully_shard`: each micro-batch's clipped sums,
    reduce-scattered bucket by bucket into this rank's fp32 rows; `take` hands them to
    `PrivacyStep.finish`.

    Args:
        model: The sharded model. Its trainable parameters must be DTensors sharded on dim 0 over
            one 1-D mesh (FSDP2's default layout).
        bucket_elements: Largest reduce-scatter input (elements, padding included), and so about
            the most full-shape fp32 elements held at once.

    Raises:
        ValueError: A trainable parameter is not sharded that way.
        RuntimeError: The ranks' rows do not tile some parameter exactly once.
    """

    scatters = True  # PrivacyStep: the engine's sink; noise after the reduce, on this rank's rows

    def __init__(self, model: nn.Module, bucket_elements: int = BUCKET_ELEMENTS):
        params = {n: p for n, p in model.named_parameters() if p.requires_grad}  # the engine's names
        bad = [n for n, p in params.items() if not isinstance(p, DTensor) or tuple(p.placements) != (Shard(0),)]
        meshes = [p.device_mesh for p in params.values() if isinstance(p, DTensor)]
        if bad or not meshes or meshes[0].ndim != 1 or any(m != meshes[0] for m in meshes):
            raise ValueError(f"FSDP: every trainable parameter must be sharded on dim 0 over one 1-D mesh ({bad[:3]})")
        mesh = meshes[0]  # each fully_shard call builds its own mesh object, equal over the same ranks
        self.group, self.bucket_elements = mesh.get_group(), bucket_elements
        self.world, self.rank = dist.get_world_size(self.group), dist.get_rank(self.group)
        self.names = list(params)
        self.shards = [RowShard(p.shape, rows_of(p.shape[0], self.world, self.rank)[0]) for p in params.values()]
        self._local = {n: (rows_of(p.shape[0], self.world, self.rank)[1], *p.shape[1:]) for n, p in params.items()}
        self._shapes = {n: p.shape for n, p in params.items()}
        self._device = next(iter(params.values())).to_local().device
        self._buckets = self._cut(_completion_order(model, params), bucket_elements)
        self._bucket_of = {n: b for b, bucket in enumerate(self._buckets) for n in bucket}
        self._next = 0  # the first bucket of this micro-batch not yet reduce-scattered
        self._pending: dict[str, Tensor] = {}  # full-shape sums waiting for their bucket
        self._rows: dict[str, Tensor] = {}  # this rank's rows of the step's sums so far
        self.calls = 0  # reduce-scatter calls made
        self.held, self.peak_held = 0, 0  # full-shape elements pending now, and at most so far
        self._check_tiling(params)

    def _cut(self, order: list[str], limit: int) -> list[list[str]]:
        """Consecutive parameters of `order`, as many per bucket as fit in `limit` (at least one)."""
        buckets: list[list[str]] = []
        size = 0
        for name in order:
            padded = _padded(self._shapes[name], self.world)
            if buckets and size + padded <= limit:
                buckets[-1].append(name)
                size += padded
            else:
                buckets.append([name])
                size = padded
        return buckets

    def _check_tiling(self, params: Mapping[str, nn.Parameter]) -> None:
        """Each parameter's rows, over the ranks, are 0..n-1 once each: one noise draw per coordinate."""
        mine = [(s.start, p.to_local().shape[0]) for s, p in zip(self.shards, params.values(), strict=True)]
        every: list = [None] * self.world
        dist.all_gather_object(every, mine, group=self.group)
        for i, name in enumerate(params):
            spans = sorted((start, rows) for start, rows in (r[i] for r in every) if rows)
            covered = 0
            for start, rows in spans:
                if start != covered:
                    raise RuntimeError(f"FSDP shards of '{name}' overlap or leave a gap at row {covered}")
                covered += rows
            if covered != params[name].shape[0]:
                raise RuntimeError(f"FSDP shards of '{name}' cover {covered} of {params[name].shape[0]} rows")

    def add(self, name: str, clipped: Tensor) -> None:
        """One parameter's clipped sum over this micro-batch (full shape, fp32, complete): kept until
        its bucket and every bucket before it are complete, then reduce-scattered and freed."""
        if clipped.dtype != torch.float32:
            raise ValueError("the clipped sums are reduced in fp32")
        if name in self._pending or self._bucket_of[name] < self._next:
            raise RuntimeError(f"the clipped sum of '{name}' was handed over twice in one micro-batch")
        self._pending[name] = clipped
        self.held += clipped.numel()
        self.peak_held = max(self.peak_held, self.held)
        while self._next < len(self._buckets) and all(n in self._pending for n in self._buckets[self._next]):
            self._scatter_bucket()

    def end_micro_batch(self) -> None:
        """Reduce-scatter every bucket not sent yet (zeros where the micro-batch added nothing)."""
        while self._next < len(self._buckets):
            self._scatter_bucket()
        self._next = 0

    def take(self) -> dict[str, Tensor]:
        """This rank's rows of the step's sums, over every micro-batch and rank (fp32, in the
        engine's order; zeros after a step with no pass); starts the next step."""
        if self._pending or self._next:
            raise RuntimeError("a micro-batch's clipped sums were not all reduce-scattered")
        rows = {n: self._rows.pop(n, None) for n in self.names}
        return {
            n: torch.zeros(self._local[n], dtype=torch.float32, device=self._device) if r is None else r
            for n, r in rows.items()
        }

    def _scatter_bucket(self) -> None:
        """One reduce_scatter_tensor: rank j's segment of the input is its padded rows of each sum."""
        names = self._buckets[self._next]
        chunks = [math.ceil(self._shapes[n][0] / self.world) for n in names]
        widths = [c * self._shapes[n][1:].numel() for c, n in zip(chunks, names, strict=True)]
        send = torch.zeros(self.world, sum(widths), dtype=torch.float32, device=self._device)
        offset = 0
        for name, width in zip(names, widths, strict=True):
            full = self._pending.pop(name, None)
            if full is not None:  # else: this micro-batch added nothing to it, zeros
                row = full[0].numel()
                for j in range(self.world):
                    start, rows = rows_of(full.shape[0], self.world, j)
                    send[j, offset : offset + rows * row] = full[start : start + rows].reshape(-1)
                self.held -= full.numel()
            offset += width
        received = send.new_empty(sum(widths))
        dist.reduce_scatter_tensor(received, send.reshape(-1), op=dist.ReduceOp.SUM, group=self.group)
        self.calls += 1
        self._next += 1
        offset = 0
        for name, width in zip(names, widths, strict=True):
            local = self._local[name]
            part = received[offset : offset + math.prod(local)].view(local)
            if name in self._rows:
                self._rows[name].add_(part)
            else:
                self._rows[name] = part.clone()
            offset += width

    @staticmethod
    def as_grad(param: DTensor, rows: Tensor) -> DTensor:
        """This rank's rows as the gradient of the sharded parameter (no collective)."""
        return DTensor.from_local(
            rows, param.device_mesh, param.placements, run_check=False, shape=param.shape, stride=param.stride()
        )


def _padded(shape: torch.Size, world: int) -> int:
    return math.ceil(shape[0] / world) * world * shape[1:].numel()


def _completion_order(model: nn.Module, params: Mapping[str, nn.Parameter]) -> list[str]:
    """The parameters in about the order the engine completes their sums: by the last module that
    holds them, in `model.modules()` order (the forward's, in which the engine sums its captures), so
    a tied embedding comes with the LM head, last. Only memory depends on it: every rank uses this
    one order, and a parameter that completes early waits for its bucket."""
    last: dict[int, int] = {}
    for i, module in enumerate(model.modules()):
        for p in module.parameters(recurse=False):
            last[id(p)] = i
    return sorted(params, key=lambda n: last[id(params[n])])
