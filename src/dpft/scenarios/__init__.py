"""Scenarios: worlds of example data with audits of their own (today: `medical`).

The generic audit never imports a scenario. A scenario is loaded only when a data manifest
names it (`"scenario"`, or the generator that wrote it), and then adds its own audit sections
(`audit(...) -> dict`, stored under the scenario's name) and report sections (`REPORT_SECTIONS`).
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from types import ModuleType

from dpft.errors import DataError

SCENARIOS = {"medical": "dpft.scenarios.medical"}
GENERATORS = {"dpft data synth-medical": "medical"}


def read_manifest(path: str) -> dict:
    """A data manifest (JSON object), or a one-line DataError."""
    try:
        manifest = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise DataError(path, None, None, f"not a readable JSON manifest ({type(err).__name__})") from None
    if not isinstance(manifest, dict):
        raise DataError(path, None, None, "a manifest is a JSON object")
    return manifest


def scenario_of(manifest: dict | None) -> ModuleType | None:
    """The scenario module a manifest names, imported now; None for any other data."""
    if not manifest:
        return None
    name = manifest.get("scenario") or GENERATORS.get(manifest.get("generator"))
    return importlib.import_module(SCENARIOS[name]) if name in SCENARIOS else None
