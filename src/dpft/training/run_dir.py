"""The run directory contract (DESIGN.md): model, config.yaml, privacy.json, metrics.jsonl, README.md.

`privacy.json` and the model card are written last, once training has finished: a run directory
without them is a run in progress (or a crashed one, resumable with `dpft train --resume`).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from dpft.atomic_write import write_text_atomic
from dpft.errors import DpftError

MODEL_META = "dpft-model.json"


@dataclass
class RunPaths:
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
    def journal(self) -> Path:
        return self.root / "privacy-journal.jsonl"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def model(self) -> Path:
        return self.root / "model"

    @property
    def card(self) -> Path:
        return self.root / "README.md"


def create_run_dir(output: str) -> RunPaths:
    """Create a fresh run directory; refuse to overwrite another run (work must never be lost)."""
    root = Path(output)
    if root.exists() and any(root.iterdir()):
        raise DpftError(f"--output {root}: directory exists and is not empty (use --resume {root} to continue it)")
    root.mkdir(parents=True, exist_ok=True)
    return RunPaths(root)


def append_metrics(paths: RunPaths, row: dict[str, Any]) -> None:
    """One JSON line per step: numbers only, never text."""
    with open(paths.metrics, "a") as f:
        f.write(json.dumps(row) + "\n")


def truncate_metrics(paths: RunPaths, last_step: int) -> None:
    """On resume, drop metric rows of steps after the checkpoint (they are redone)."""
    if not paths.metrics.is_file():
        return
    rows = [r for r in paths.metrics.read_text().splitlines() if _row_step(r) <= last_step]
    write_text_atomic(paths.metrics, "".join(r + "\n" for r in rows))


def save_model(paths: RunPaths, model: torch.nn.Module, tokenizer, kind: str, base_model: str) -> None:
    """Save the adapter (LoRA) or the full weights, the tokenizer, and what they are."""
    model.save_pretrained(paths.model, safe_serialization=True)
    tokenizer.save_pretrained(paths.model)
    meta = {"kind": kind, "base_model": base_model}
    (paths.model / MODEL_META).write_text(json.dumps(meta, indent=1))


def write_privacy(paths: RunPaths, report: dict[str, Any]) -> None:
    write_text_atomic(paths.privacy, json.dumps(report, indent=2) + "\n")


def write_model_card(paths: RunPaths, report: dict[str, Any], base_model: str) -> None:
    write_text_atomic(paths.card, model_card(report, base_model))


def model_card(p: dict[str, Any], base_model: str) -> str:
    """The guarantee in plain words: unit, ε, δ, what it protects and what it does not."""
    unit = "person (all records sharing a user_id)" if p["privacy_unit"] == "user" else "record"
    head = f"# dpft fine-tune of `{base_model}`\n\n"
    if not p["dp"]:
        return head + (
            "**No privacy guarantee.** This model was trained without differential privacy "
            "(`--no-dp`): it may have memorised its training records and can reveal them when "
            "prompted. Treat it as containing the training data.\n"
        )
    if p.get("epsilon") is None:
        return head + f"**No guarantee reported**: {p.get('guarantee_refused', 'see privacy.json')}\n"
    eps, delta = p["epsilon"], p["delta"]
    return head + (
        f"## Privacy guarantee\n\nTrained with DP-SGD: ({eps:.3g}, {delta:.3g})-differential privacy "
        f"at the level of one **{unit}**, over {p['num_units']} units.\n\n"
        f"In words: whether any single {unit.split(' ')[0]} was in the training data or not changes "
        f"the probability of any outcome of training by at most a factor e^{eps:.3g} ≈ {math.exp(min(eps, 50)):.3g}, "
        f"except with probability {delta:.3g}. An attacker who sees the model learns almost nothing "
        "specific to that unit beyond what they would learn without it.\n\n"
        "## How\n\n"
        f"- {p['steps']} steps, Poisson sampling of units with rate q = {p['sample_rate']:.4g} "
        f"(expected batch {p['expected_batch_size']}).\n"
        f"- Each unit's gradient clipped to L2 norm {p['max_grad_norm']}; Gaussian noise with "
        f"σ = {p['noise_multiplier']:.4g} × the clip bound, added once per step.\n"
        f"- Accountant: {p['accountant'].upper()} (dp_accounting); every step that touched the data "
        "is counted, including steps redone after a crash.\n\n"
        "## What it does not protect\n\n"
        "- Facts shared by many units (population statistics) are learned: that is the point.\n"
        "- A person whose records carry different user_ids is protected per record, not as a whole.\n"
        "- The base model's own pre-training data and any prompt given at inference are not covered.\n"
        f"- The guarantee holds for the training procedure as run; noise mode: {p['noise_mode']}.\n"
    )


def _row_step(raw: str) -> int:
    try:
        return int(json.loads(raw)["step"])
    except (ValueError, KeyError, TypeError):
        return 1 << 62  # a torn line: drop it
