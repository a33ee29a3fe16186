"""The run directory's layout, named once: what ships with the model and what stays with the data.

    run/
      model/            PUBLIC  weights or adapter, tokenizer, README.md (model card), dpft-model.json
      privacy.json      PUBLIC  the guarantee: ε, δ, q, σ, C, steps, journal segments, N
      config.yaml       PUBLIC  the resolved settings (never a seed of the DP randomness)
      metrics.jsonl     PUBLIC  per step: ε spent and the learning rate (data-independent or DP)
      private/          KEEP WITH THE DATA: computed from the private records outside the DP mechanism
        train-log.jsonl   per-step loss, realised batch size, example count, time
        data.json         record counts (truncated, dropped, duplicates), the sampler self-check
        journal.jsonl     every step that touched the data, written before it did
        state.json        fingerprints of the data and settings (and an unsafe seed, if one was given)
        checkpoints/

N, the number of privacy units, is public (privacy.json): it is the accepted public parameter of
DP-SGD's accounting (q = B / N).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

MODEL_META = "dpft-model.json"


@dataclass(frozen=True)
class RunPaths:
    """Every path of a run directory rooted at `root`."""

    root: Path

    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    @property
    def privacy(self) -> Path:
        return self.root / "privacy.json"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def model(self) -> Path:
        return self.root / "model"

    @property
    def model_meta(self) -> Path:
        return self.model / MODEL_META

    @property
    def card(self) -> Path:
        return self.model / "README.md"

    @property
    def private(self) -> Path:
        return self.root / "private"

    @property
    def train_log(self) -> Path:
        return self.private / "train-log.jsonl"

    @property
    def data_stats(self) -> Path:
        return self.private / "data.json"

    @property
    def journal(self) -> Path:
        return self.private / "journal.jsonl"

    @property
    def state(self) -> Path:
        return self.private / "state.json"

    @property
    def checkpoints(self) -> Path:
        return self.private / "checkpoints"

    @property
    def public(self) -> tuple[Path, ...]:
        """What may ship with the model."""
        return (self.model, self.privacy, self.config, self.metrics)
