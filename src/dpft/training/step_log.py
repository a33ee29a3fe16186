"""One logical step's two log rows, kept the same way by the recipe and the Trainer drop-in.

- `metrics.jsonl` (public): step, ε spent and the learning rate: data-independent or DP.
- `private/train-log.jsonl` (stays with the data): the step's mean loss, the fraction of units
  whose gradient C clipped, the realised batch size, the examples read and the wall time.
"""

from __future__ import annotations

import time
from typing import Protocol

import torch

from dpft.run_layout import RunPaths
from dpft.training.run_dir import append_row


class _Ranks(Protocol):
    is_main: bool

    def step_mean(self, values: list[torch.Tensor]) -> float: ...


class StepLog:
    """Collects one logical step's per-example losses and per-unit clip indicators, then writes its rows.

    Args:
        clip_bound: C, to count the units it clipped; None for the --no-dp baseline (nothing is clipped).
    """

    def __init__(self, clip_bound: float | None) -> None:
        self.clip_bound = clip_bound
        self.started = time.perf_counter()
        self._losses: list[torch.Tensor] = []
        self._clipped: list[torch.Tensor] = []

    def add(self, example_losses: torch.Tensor, unit_norms: torch.Tensor) -> None:
        """One micro-batch: its per-example losses and its units' gradient norms before clipping."""
        self._losses.append(example_losses.detach())
        if self.clip_bound is not None:
            self._clipped.append((unit_norms > self.clip_bound).float())

    def write(
        self, ranks: _Ranks, paths: RunPaths, step: int, epsilon: float | None, lr: float, batch: int, examples: int
    ) -> float:
        """Every rank calls this (the means are collectives); rank 0 writes. Returns the mean loss (private)."""
        loss = ranks.step_mean(self._losses)
        clipped = None if self.clip_bound is None else ranks.step_mean(self._clipped)
        if ranks.is_main:
            append_row(paths.metrics, {"step": step, "epsilon": epsilon, "lr": lr})
            private = {
                "step": step,
                "loss": loss,
                "clipped_fraction": clipped,
                "batch_size": batch,
                "examples": examples,
                "seconds": round(time.perf_counter() - self.started, 4),
            }
            append_row(paths.train_log, private)
        return loss
