"""Atomic, checksummed checkpoints: trainable weights, optimizer, and the loop's state.

A checkpoint is a folder `private/checkpoints/step-000123/` holding `weights.safetensors`, `optimizer.pt`,
`state.json` and `manifest.json` (sha256 of each file). It is written into a temporary folder,
fsynced, then renamed into place, and `checkpoints/latest` is replaced atomically last: a crash at
any point leaves the previous checkpoint intact. Loading verifies every checksum and that the
checkpoint belongs to this run's configuration. It holds no random-generator state: a DP run's
sampling and noise randomness is never written anywhere (privacy/randomness.py).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from dpft.atomic_write import fsync_file, write_text_atomic
from dpft.errors import CheckpointError
from dpft.hashing import sha256_file

FILES = ("weights.safetensors", "optimizer.pt", "state.json")


def save_checkpoint(
    root: Path, step: int, weights: dict[str, torch.Tensor], optimizer: dict, state: dict[str, Any]
) -> Path:
    """Write checkpoint `step` under `root` atomically and point `root/latest` at it."""
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:06d}"
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=root))
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in weights.items()}, tmp / FILES[0])
        torch.save(optimizer, tmp / FILES[1])
        (tmp / FILES[2]).write_text(json.dumps(state))
        manifest = {name: sha256_file(tmp / name) for name in FILES}
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1))
        for name in (*FILES, "manifest.json"):
            fsync_file(tmp / name)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    write_text_atomic(root / "latest", final.name)
    _prune(root, keep=final.name)
    return final


def load_checkpoint(root: Path, config_hash: str) -> tuple[dict[str, torch.Tensor], dict, dict[str, Any]]:
    """Load and verify the latest checkpoint under `root`.

    Raises:
        CheckpointError: none found, a checksum mismatch (truncated or tampered file), or a
            checkpoint written under a different configuration.
    """
    latest = root / "latest"
    if not latest.is_file():
        raise CheckpointError(f"{root}: no checkpoint to resume from")
    path = root / latest.read_text().strip()
    manifest_path = path / "manifest.json"
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, ValueError):
        raise CheckpointError(f"{manifest_path}: missing or unreadable checkpoint manifest") from None
    for name in FILES:
        if manifest.get(name) != _sha256_or_none(path / name):
            raise CheckpointError(f"{path / name}: checksum mismatch (truncated or modified); refusing to resume")
    state = json.loads((path / FILES[2]).read_text())
    if state.get("config_hash") != config_hash:
        raise CheckpointError(f"{path}: checkpoint was written with a different configuration; refusing to resume")
    weights = load_file(path / FILES[0])
    optimizer = torch.load(path / FILES[1], weights_only=True)
    return weights, optimizer, state


def save_training(root: Path, step: int, model: torch.nn.Module, optimizer: dict, state: dict[str, Any]) -> Path:
    """Checkpoint `step` of a training loop: the model's trainable weights, the optimizer's state
    (the Trainer adds its scheduler's: anything `torch.load(weights_only=True)` reads back) and the
    loop's state (which must hold `config_hash`)."""
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    return save_checkpoint(root, step, trainable, optimizer, state)


def restore_training(root: Path, config_hash: str, model: torch.nn.Module) -> tuple[dict, dict[str, Any]]:
    """Copy the latest checkpoint's weights into the model's trainable parameters.

    Returns:
        The optimizer state and the loop state that `save_training` wrote.

    Raises:
        CheckpointError: As `load_checkpoint`, or weights that do not match the model's trainable ones.
    """
    weights, optimizer, state = load_checkpoint(root, config_hash)
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if set(weights) != set(params):
        raise CheckpointError(f"{root}: checkpoint weights do not match the model; refusing to resume")
    with torch.no_grad():
        for name, tensor in weights.items():
            params[name].copy_(tensor)
    return optimizer, state


def _prune(root: Path, keep: str) -> None:
    """Keep only the newest checkpoint (they are large); leftovers of crashed writes go too."""
    for entry in root.iterdir():
        if entry.is_dir() and entry.name != keep:
            shutil.rmtree(entry, ignore_errors=True)


def _sha256_or_none(path: Path) -> str | None:
    return sha256_file(path) if path.is_file() else None
