"""Durable, all-or-nothing file writes: a crash leaves the old file or the new one, never half of one."""

from __future__ import annotations

import os
from pathlib import Path


def fsync_file(path: Path) -> None:
    """Flush a written file to disk (before it is renamed into place)."""
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def write_text_atomic(path: Path, text: str) -> None:
    """Write `text` to a temporary sibling, fsync it, and rename it over `path`."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    fsync_file(tmp)
    os.replace(tmp, path)
