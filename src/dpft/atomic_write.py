"""Durable, all-or-nothing file writes: a crash leaves the old file or the new one, never half of one."""

from __future__ import annotations

import os
from pathlib import Path


def fsync_file(path: Path) -> None:
    """Flush a written file to disk (before it is renamed into place)."""
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def write_text_atomic(path: Path, text: str) -> None:
    """Write `text` to a temporary sibling, fsync it, and rename it over `path`.

    The sibling's name is the writing process's own, so processes that write the same file at once
    (the ranks of a data-parallel test) never rename each other's half-written text into place.
    """
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    fsync_file(tmp)
    os.replace(tmp, path)
