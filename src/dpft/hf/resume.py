"""What a resumed Trainer run must match: the data, the settings and the randomness it was created with.

`dpft train --resume` reloads its saved settings; a Trainer user builds the trainer again instead,
so every setting is given a second time and each must equal the saved one. The run's private
state (`private/state.json`, written when the run was created) holds the data fingerprint, the
settings hash and the unsafe seed; `dpft-trainer.json` holds the settings themselves, so a
refusal can name what changed.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from dpft.errors import ConfigError
from dpft.run_layout import RunPaths

TRAINER_CONFIG = "dpft-trainer.json"  # PUBLIC: config.yaml's counterpart (settings, never the unsafe seed)


def settings_hash(settings: dict[str, Any]) -> str:
    """Identity of a Trainer run's public settings (state.json and every checkpoint hold it)."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()


def holds_run(paths: RunPaths) -> bool:
    """Whether the directory already holds a dpft run (finished or not)."""
    run_files = (paths.journal, paths.privacy, paths.state, paths.root / TRAINER_CONFIG, paths.root / "run-id")
    return any(f.exists() for f in run_files)


def check_resumable(paths: RunPaths, fingerprint: str, settings: dict[str, Any], unsafe_seed: int | None) -> None:
    """Refuse to resume anything but the same unfinished run on the same data with the same settings.

    Raises:
        ConfigError: No run, a finished run, other data, other settings, or another randomness.
    """
    where = f"resume_from_checkpoint: output_dir {paths.root}"
    config = paths.root / TRAINER_CONFIG
    if not paths.state.is_file() or not config.is_file():
        raise ConfigError([f"{where} holds no DPTrainer run to resume (no {TRAINER_CONFIG} or private/state.json)"])
    if paths.privacy.is_file():
        raise ConfigError([f"{where}: this run already finished (privacy.json exists); give a new output_dir"])
    state = json.loads(paths.state.read_text())
    problems = []
    if state.get("data") != fingerprint:
        problems.append("train_dataset differs from the run's (its rows' fingerprint changed); refusing other data")
    if state.get("settings") != settings_hash(settings):
        saved = json.loads(config.read_text())
        changed = _changed(saved, settings)
        if changed:
            problems.append(f"{', '.join(changed)} differ from the run's saved settings ({TRAINER_CONFIG})")
        else:
            problems.append(f"{config} changed since the run was created; refusing to resume")
    if state.get("unsafe_seed") != unsafe_seed:  # the values stay unsaid: a seed is private
        problems.append("PrivacyArguments.unsafe_seed differs from the run's (the randomness must stay the same)")
    if problems:
        raise ConfigError(problems)


def _changed(saved: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """The settings that differ, by their argument names (PrivacyArguments.x, TrainingArguments.y)."""
    out = [] if saved.get("trainer") == now.get("trainer") else ["the trainer class"]
    for group, owner in (("privacy", "PrivacyArguments"), ("training", "TrainingArguments")):
        old, new = saved.get(group, {}), now.get(group, {})
        out += [f"{owner}.{k}" for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
    return out
