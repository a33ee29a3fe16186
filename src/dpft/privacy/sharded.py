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
- `PrivacyStep.finish` reduce-scatters the ranks' full fp32 clipped sums (`ReduceScatterSums`):
  rank r receives rows [start_r, start_r + rows_r) of the total, FSDP2's own Shard(0) layout;
- each rank adds N(0, σ²C²) to its rows alone. The rows of the ranks tile every parameter exactly
  (checked at construction across the group), so every coordinate gets one draw, never W;
- ÷ the expected batch, and the rows become the sharded parameter's gradient (a DTensor), which
  the optimizer steps without any further collective.

Trust boundary: as with DDP, the links carry un-noised partial sums; the noise is added after the
reduce-scatter, so the rows a rank sends are un-noised too (Opacus's FSDP optimizer does the same).
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
    """The reduce hook of `PrivacyStep.finish` for a model sharded by `fully_shard`.

    Args:
        params: The trainable parameters, by name, in the engine's order: DTensors sharded on dim 0
            over one 1-D mesh (FSDP2's default layout).
        bucket_elements: Largest reduce-scatter input (elements, padding included).

    Raises:
        ValueError: A trainable parameter is not sharded that way.
        RuntimeError: The ranks' rows do not tile some parameter exactly once.
    """

    scatters = True  # PrivacyStep: noise after the reduce, on this rank's rows

    def __init__(self, params: Mapping[str, nn.Parameter], bucket_elements: int = BUCKET_ELEMENTS):
        bad = [n for n, p in params.items() if not isinstance(p, DTensor) or tuple(p.placements) != (Shard(0),)]
        meshes = [p.device_mesh for p in params.values() if isinstance(p, DTensor)]
        if bad or not meshes or meshes[0].ndim != 1 or any(m != meshes[0] for m in meshes):
            raise ValueError(f"FSDP: every trainable parameter must be sharded on dim 0 over one 1-D mesh ({bad[:3]})")
        mesh = meshes[0]  # each fully_shard call builds its own mesh object, equal over the same ranks
        self.group, self.bucket_elements = mesh.get_group(), bucket_elements
        self.world, self.rank = dist.get_world_size(self.group), dist.get_rank(self.group)
        self.shards = [RowShard(p.shape, rows_of(p.shape[0], self.world, self.rank)[0]) for p in params.values()]
        self.calls = 0  # reduce-scatter calls made
        self._check_tiling(params)

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

    def scatter(self, tensors: list[Tensor]) -> list[Tensor]:
        """This rank's rows of every tensor summed over the ranks (full-shape fp32 in, rows out)."""
        if any(t.dtype != torch.float32 for t in tensors):
            raise ValueError("the clipped sums are reduced in fp32")
        out: list[Tensor] = []
        start = 0
        while start < len(tensors):
            stop, size = start + 1, _padded(tensors[start], self.world)
            while stop < len(tensors) and size + _padded(tensors[stop], self.world) <= self.bucket_elements:
                size += _padded(tensors[stop], self.world)
                stop += 1
            out += self._scatter_bucket(tensors[start:stop])
            start = stop
        return out

    def _scatter_bucket(self, tensors: list[Tensor]) -> list[Tensor]:
        """One reduce_scatter_tensor: rank j's segment of the input is its padded rows of each tensor."""
        chunks = [math.ceil(t.shape[0] / self.world) for t in tensors]
        widths = [c * t[0].numel() for c, t in zip(chunks, tensors, strict=True)]
        send = tensors[0].new_zeros(self.world, sum(widths))
        offset = 0
        for t, c, w in zip(tensors, chunks, widths, strict=True):
            padded = t.new_zeros(c * self.world, *t.shape[1:])
            padded[: t.shape[0]] = t
            send[:, offset : offset + w] = padded.reshape(self.world, w)
            offset += w
        received = send.new_empty(sum(widths))
        dist.reduce_scatter_tensor(received, send.reshape(-1), op=dist.ReduceOp.SUM, group=self.group)
        self.calls += 1
        out, offset = [], 0
        for t, c, w in zip(tensors, chunks, widths, strict=True):
            _, rows = rows_of(t.shape[0], self.world, self.rank)
            out.append(received[offset : offset + w].view(c, *t.shape[1:])[:rows].clone())
            offset += w
        return out

    @staticmethod
    def as_grad(param: DTensor, rows: Tensor) -> DTensor:
        """This rank's rows as the gradient of the sharded parameter (no collective)."""
        return DTensor.from_local(
            rows, param.device_mesh, param.placements, run_check=False, shape=param.shape, stride=param.stride()
        )


def _padded(t: Tensor, world: int) -> int:
    return math.ceil(t.shape[0] / world) * world * t[0].numel()
