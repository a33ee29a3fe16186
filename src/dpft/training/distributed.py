"""The recipe's view of data parallelism: which rank this process is, and what it may do.

`Parallel.from_env` reads torchrun's environment (WORLD_SIZE, RANK, LOCAL_RANK, MASTER_ADDR/PORT).
Without it (or with WORLD_SIZE=1) every method is the identity and the recipe runs exactly as a
single process: no process group, no collective, byte-identical results.

With W > 1 processes (`torchrun --nproc-per-node W -m dpft.cli.main train …`, or
`dpft train --nproc-per-node W …`, which launches that):

- the process group is gloo on CPU, nccl on CUDA (one GPU per process: cuda:LOCAL_RANK);
- rank 0 alone writes: the run directory, config, journal (fsynced, then a barrier), metrics,
  private logs, checkpoints, ledger, model and privacy.json;
- every step's Poisson draw comes from rank 0 (`BroadcastSampler`); the sampled units are split
  by token count (`split_units`); each rank clips its share; `PrivacyStep.finish` noises on rank 0
  only and all-reduces once (`AllReduceSums`) — see privacy/distributed.py for why that is the
  single-process mechanism exactly;
- with --fsdp the model is sharded after every rank took rank 0's weights (`prepare`), each
  micro-batch's clipped sums are reduce-scattered into the ranks' rows as the engine forms them, and
  each rank noises its own rows at the step's end (`ReduceScatterSums`, privacy/sharded.py);
  checkpoints and the saved model are gathered into the one-process format.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from dpft.errors import ConfigError
from dpft.models.device import resolve_device
from dpft.privacy.distributed import AllReduceSums, BroadcastJournal, BroadcastSampler, split_units
from dpft.privacy.sampling import PrivacyUnits
from dpft.privacy.sharded import ReduceScatterSums
from dpft.training import fsdp as sharding


@dataclass
class Parallel:
    """This process's place in a run: the single process, or one rank of W."""

    rank: int = 0
    world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    owns_group: bool = False  # we initialised the process group, so `close` tears it down
    fsdp: bool = False  # --fsdp: the model is sharded (FSDP2), the clipped sums reduce-scattered

    @classmethod
    def from_env(cls, requested_device: str = "auto", fsdp: bool = False) -> Parallel:
        """Single process unless torchrun's WORLD_SIZE > 1; then join (or create) the process group.

        Raises:
            ConfigError: A bad --device, an environment that names a rank without a world, or
                --fsdp in a single process.
        """
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1 and fsdp:
            raise ConfigError(["--fsdp shards the model across processes: give --nproc-per-node N >= 2 (or torchrun)"])
        if world <= 1:
            return cls(device=resolve_device(requested_device))
        if "RANK" not in os.environ:
            raise ConfigError(
                ["WORLD_SIZE is set but RANK is not: launch with torchrun or dpft train --nproc-per-node"]
            )
        local_rank = int(os.environ.get("LOCAL_RANK", os.environ["RANK"]))
        device = resolve_device(requested_device, local_rank)
        owns = False
        if not dist.is_initialized():
            if device.type == "cuda":
                torch.cuda.set_device(device)
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
            owns = True
        return cls(dist.get_rank(), dist.get_world_size(), device, owns, fsdp)

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that writes anything."""
        return self.rank == 0

    def _comm_device(self) -> torch.device:
        return self.device if self.device.type == "cuda" else torch.device("cpu")

    def sampler(self, sampler):
        return BroadcastSampler(sampler, device=self._comm_device()) if self.distributed else sampler

    def journal(self, journal):
        return BroadcastJournal(journal) if self.distributed else journal

    def prepare(self, model: torch.nn.Module) -> torch.nn.Module:
        """Every rank starts from rank 0's trainable weights; with --fsdp the model is then sharded."""
        self.sync_parameters(model)
        return sharding.shard_model(model) if self.fsdp else model

    def reducer(self, model: torch.nn.Module) -> AllReduceSums | ReduceScatterSums | None:
        """How `PrivacyStep` sums the ranks' clipped sums (after `prepare`; --fsdp: the engine's sink)."""
        if self.fsdp:
            return ReduceScatterSums(model)
        return AllReduceSums() if self.distributed else None

    def full_state(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
        """Trainable weights and optimizer state as one process holds them (--fsdp: gathered, collective)."""
        weights = {n: sharding.full(p) for n, p in model.named_parameters() if p.requires_grad}
        return weights, sharding.full_optimizer_state(optimizer) if self.fsdp else optimizer.state_dict()

    def load_state(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, weights: dict, state: dict) -> None:
        """Load a checkpoint written by `full_state` (any number of processes, sharded or not)."""
        params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        for name, value in weights.items():
            sharding.load_full_weight(params[name], value)
        optimizer.load_state_dict(sharding.shard_optimizer_state(optimizer, state) if self.fsdp else state)

    def model_state(self, model: torch.nn.Module) -> dict | None:
        """--fsdp: the full state dict for rank 0 to save (collective); else None (the model saves itself)."""
        return sharding.full_model_state(model) if self.fsdp else None

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def agreed_units(self, units: PrivacyUnits) -> PrivacyUnits:
        """Rank 0's choice of each user's capped records, on every rank (before training; once).

        Each rank draws the cap from its own randomness: with fresh OS entropy the ranks would keep
        different records of a user, so `local_units` would weigh (and split) the units differently
        on each rank, and a unit could be clipped on two ranks (2C: twice the sensitivity) or on none.
        """
        if not self.distributed:
            return units
        units.adopt(self.from_main(units.unit_examples))
        return units

    def from_main(self, value: Any) -> Any:
        """Rank 0's `value` on every rank (a setup-time reading every rank must act on alike)."""
        if not self.distributed:
            return value
        held = [value if self.is_main else None]
        dist.broadcast_object_list(held, group_src=0)
        return held[0]

    def local_units(self, units: np.ndarray, unit_examples: Sequence[Sequence[int]], examples: Sequence) -> np.ndarray:
        """This rank's share of the sampled units (all of them in a single process), balanced by tokens."""
        return self.shares(units, unit_examples, examples)[self.rank]

    def shares(self, units: np.ndarray, unit_examples: Sequence[Sequence[int]], examples: Sequence) -> list[np.ndarray]:
        """Every rank's share of the sampled units, as every rank computes it (no communication)."""
        if not self.distributed:
            return [units]
        weights = [sum(len(examples[i].input_ids) for i in unit_examples[u]) for u in units]
        return [np.asarray(s, dtype=np.int64) for s in split_units(list(units), weights, self.world_size)]

    def idle_passes(self, passes: Sequence[int]) -> int:
        """--fsdp: extra forward/backward passes this rank runs so that every rank runs as many as the
        busiest (FSDP2 all-gathers the weights in every pass: a rank that skipped one would leave the
        others waiting, or pair their collectives wrongly). `passes`: each rank's micro-batch count."""
        return max(passes) - passes[self.rank] if self.fsdp else 0

    def step_mean(self, values: list[torch.Tensor]) -> float:
        """Mean of per-example or per-unit values over the whole logical step, every rank (private bookkeeping)."""
        if not self.distributed:
            return torch.cat(values).mean().item() if values else float("nan")
        total = torch.cat(values).double().sum().item() if values else 0.0
        count = sum(x.numel() for x in values)
        both = torch.tensor([total, float(count)], dtype=torch.float64, device=self._comm_device())
        dist.all_reduce(both)
        total, count = both[0].item(), int(both[1].item())
        return total / count if count else float("nan")

    def sync_parameters(self, model: torch.nn.Module) -> None:
        """Start every rank from rank 0's trainable weights (before sharding)."""
        if not self.distributed:
            return
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    dist.broadcast(p.data, group_src=0)

    def close(self) -> None:
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()
            self.owns_group = False


def launch(nproc_per_node: int, train_args: Sequence[str]) -> int:
    """`dpft train --nproc-per-node N …`: run `torchrun --nproc-per-node N -m dpft.cli.main train …`.

    Args:
        nproc_per_node: N ≥ 2 processes on this node.
        train_args: The `dpft train` arguments, without --nproc-per-node.

    Returns:
        0 when every rank succeeded.

    Raises:
        ConfigError: N < 1, or more CUDA processes than GPUs.
    """
    if nproc_per_node < 1:
        raise ConfigError([f"--nproc-per-node must be >= 1 (got {nproc_per_node})"])
    from torch.distributed.run import get_args_parser, run

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    argv = ["--standalone", "--nproc-per-node", str(nproc_per_node), "-m", "dpft.cli.main", "train", *train_args]
    args = get_args_parser().parse_args(argv)
    try:
        run(args)
    except Exception as err:  # torchrun's ChildFailedError: the ranks' own errors are already on stderr
        print(f"error: a training process failed ({type(err).__name__})", file=sys.stderr)
        return 1
    return 0
