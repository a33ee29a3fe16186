"""Data-parallel DP-SGD: one logical step spread over W processes, with the privacy of one.

The mechanism must stay exactly the single-process one: one Poisson draw, each unit clipped as a
whole, N(0, σ²C²) added ONCE per coordinate to the sum of the clipped gradients, ÷ the expected
batch. Spread over W ranks that means:

- one draw per step, the same on every rank: rank 0 draws it (fresh OS entropy, or the seeded
  stream) and broadcasts it (`BroadcastSampler`); it is never written anywhere;
- the sampled units are split across ranks, never a unit across two (`split_units`); a rank with
  no unit still joins every collective, contributing zeros;
- each rank clips its own units (its own `PerUnitClipper`, through `PrivacyStep.backward`);
- `PrivacyStep.finish` adds the noise on the rank whose reducer says `adds_noise` (rank 0 alone,
  checked once at construction: exactly one rank of the group answers yes), then
  `AllReduceSums.reduce` sums every rank's fp32 sums in ONE all-reduce over a flat buffer: the
  result is Σ_ranks Σ_units clip(g_u) + one N(0, σ²C²) draw, on every rank. (Noise on every
  rank would give std √W·σC: not the mechanism the accountant models, and utility wasted.)
  Rank 0 noises its own partial sum before the reduce, not the result after it, so the
  reduced buffer is final on every rank with no second collective;
- the journal line is written and fsynced by rank 0 and every rank waits for it before the
  step's batch is drawn (`BroadcastJournal.record` ends with a barrier), so no rank touches the
  data of a step that is not accounted.

Trust boundary: the ranks and the links between them see un-noised partial sums (as in Opacus's
DPDDP); only the noised, reduced sum leaves the processes.
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor

from dpft.privacy.accounting import Segment

BUCKET_ELEMENTS = 1 << 26  # fp32 elements per all-reduce bucket (256 MiB): one call for LoRA, a few for --full


def _rank(group: dist.ProcessGroup | None) -> int:
    return dist.get_rank(group)


class AllReduceSums:
    """The reduce hook of `PrivacyStep.finish`: sum every rank's fp32 clipped sums, in place.

    Args:
        group: The process group (None: the default group, which must be initialised).
        bucket_elements: Largest flat buffer per all-reduce; the step's tensors are packed in
            order into as few buffers as fit (one for LoRA).

    Raises:
        RuntimeError: The group does not have exactly one rank that adds the noise.
    """

    scatters = False  # PrivacyStep: noise before the reduce, on the one rank that `adds_noise`

    def __init__(self, group: dist.ProcessGroup | None = None, bucket_elements: int = BUCKET_ELEMENTS):
        self.group, self.bucket_elements = group, bucket_elements
        self.adds_noise = _rank(group) == 0
        self.calls = 0  # all-reduce calls made (tests check one per step for LoRA)
        noisers = torch.tensor([int(self.adds_noise)], dtype=torch.int64, device=self._device())
        dist.all_reduce(noisers, group=group)
        if int(noisers.item()) != 1:
            raise RuntimeError(f"exactly one rank must add the DP noise, {int(noisers.item())} would")

    def _device(self) -> torch.device:
        if dist.get_backend(self.group) == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    def reduce(self, tensors: Sequence[Tensor]) -> None:
        """Replace every tensor by its sum over the ranks (same order and shapes on every rank)."""
        if any(t.dtype != torch.float32 for t in tensors):
            raise ValueError("the clipped sums are reduced in fp32")
        for bucket in _buckets(tensors, self.bucket_elements):
            flat = torch.cat([t.reshape(-1) for t in bucket]) if len(bucket) > 1 else bucket[0].reshape(-1).clone()
            dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=self.group)
            self.calls += 1
            offset = 0
            with torch.no_grad():
                for t in bucket:
                    t.copy_(flat[offset : offset + t.numel()].view_as(t))
                    offset += t.numel()


def _buckets(tensors: Sequence[Tensor], limit: int) -> list[list[Tensor]]:
    buckets: list[list[Tensor]] = []
    size = 0
    for t in tensors:
        if buckets and size + t.numel() <= limit and t.device == buckets[-1][0].device:
            buckets[-1].append(t)
            size += t.numel()
        else:
            buckets.append([t])
            size = t.numel()
    return buckets


class BroadcastSampler:
    """The sampler of a data-parallel run: rank 0 draws, every rank receives the same batch.

    Args:
        sampler: The run's `PoissonSampler` (only rank 0's is used).
        group: The process group.
        device: Where the broadcast buffers live (cpu for gloo, the rank's GPU for nccl).
    """

    def __init__(self, sampler, group: dist.ProcessGroup | None = None, device: torch.device | None = None):
        self.sampler, self.group = sampler, group
        self.device = device or torch.device("cpu")
        self.num_units, self.sample_rate = sampler.num_units, sampler.sample_rate

    def sample(self, step: int) -> np.ndarray:
        """The sorted unit indices of step `step`, identical on every rank."""
        root = _rank(self.group) == 0
        batch = self.sampler.sample(step) if root else None
        size = torch.tensor([len(batch) if root else 0], dtype=torch.int64, device=self.device)
        dist.broadcast(size, group_src=0, group=self.group)
        units = torch.empty(int(size.item()), dtype=torch.int64, device=self.device)
        if root:
            units.copy_(torch.from_numpy(batch))
        if units.numel():
            dist.broadcast(units, group_src=0, group=self.group)
        return units.cpu().numpy()


class BroadcastJournal:
    """Rank 0's journal, mirrored in memory on the other ranks; `record` returns on every rank only
    once rank 0's line is durable (fsynced), so no rank reads a step's data before it is accounted.

    Args:
        journal: Rank 0's journal (a `PrivacyJournal`); ignored on the other ranks.
        group: The process group.
    """

    def __init__(self, journal, group: dist.ProcessGroup | None = None):
        self.group, self._root = group, _rank(group) == 0
        self._inner = journal
        held = [journal.segments() if self._root else None]
        dist.broadcast_object_list(held, group_src=0, group=group)  # a resumed run's past steps
        self._mirror: list[Segment] = [Segment(*s) for s in held[0]]

    def segments(self) -> list[Segment]:
        return list(self._mirror)

    def record(self, segment: Segment) -> None:
        if self._root:
            self._inner.record(segment)
        dist.barrier(group=self.group)  # rank 0's line is on disk before any rank goes on
        last = self._mirror[-1] if self._mirror else None
        if last is not None and (last.sample_rate, last.noise_multiplier) == (
            segment.sample_rate,
            segment.noise_multiplier,
        ):
            self._mirror[-1] = last._replace(steps=last.steps + segment.steps)
        else:
            self._mirror.append(segment)

    def count(self) -> int:
        return sum(s.steps for s in self._mirror)

    @property
    def path(self):
        return getattr(self._inner, "path", None)


def split_units(units: Sequence[int], weights: Sequence[float], world_size: int) -> list[list[int]]:
    """Split the sampled units across `world_size` ranks, balancing total weight (tokens), never
    splitting a unit. Deterministic (every rank computes the same split); each share is sorted.

    Greedy longest-processing-time: heaviest unit first, onto the lightest rank (ties: lowest rank).

    Args:
        units: The sampled unit indices.
        weights: The weight of each of `units` (e.g. its token count), same order.
        world_size: W ≥ 1.

    Returns:
        W lists of unit indices (some possibly empty), whose union is `units`.
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    if len(units) != len(weights):
        raise ValueError("one weight per unit")
    shares: list[list[int]] = [[] for _ in range(world_size)]
    heap = [(0.0, r) for r in range(world_size)]
    order = sorted(range(len(units)), key=lambda i: (-weights[i], units[i]))
    for i in order:
        load, r = heapq.heappop(heap)
        shares[r].append(int(units[i]))
        heapq.heappush(heap, (load + float(weights[i]), r))
    return [sorted(s) for s in shares]
