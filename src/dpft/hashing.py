"""Content fingerprints of files, shared by the ledger (datasets) and checkpoints."""

from __future__ import annotations

import hashlib
import os

_CHUNK = 1 << 20  # read 1 MiB at a time: a dataset or checkpoint need not fit in memory


def sha256_file(path: str | os.PathLike) -> str:
    """sha256 of a file's bytes, read in chunks.

    Args:
        path: The file.

    Returns:
        The digest as 64 lowercase hex characters.

    Raises:
        OSError: If the file cannot be read.
    """
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for chunk in iter(lambda: file.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()
