"""Output folders whose finished runs a re-run reuses: they must hold runs of the same settings."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from dpft.errors import DpftError


def claim_output(out: Path, settings: dict[str, Any], marker: str) -> None:
    """Record `settings` in `out/marker`, or refuse if the folder holds runs made with other ones.

    Raises:
        DpftError: `out/marker` records other settings.
    """
    settings = json.loads(json.dumps(settings))  # as read back: tuples become lists
    path = out / marker
    if path.is_file() and json.loads(path.read_text()) != settings:
        raise DpftError(f"--output {out}: holds runs with other settings ({path.name}); choose another --output")
    out.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(settings, indent=1))


def read_jsonl(path: Path) -> list[dict]:
    """The rows of a JSON-lines file the project wrote itself (user data goes through dpft.data)."""
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
