"""glibc malloc settings for the dpft process: keep freed memory for the next step.

A training step allocates and frees the same large buffers every step (activations, the LM head's
logits, the DP engine's captured inputs and output gradients). By default glibc serves large
buffers with mmap and unmaps them on free, and trims the heap top once enough of it is free, so
the next step writes to fresh pages: one page fault per 4 KiB, each zero-filled by the kernel.
Measured on a 2-core AVX2 EPYC (KVM guest), the demo's 32-record step took 60k-250k faults
(0.25-1 GB) and its elementwise ops ran 5-8x slower in the DP step, which holds its captures
until the backward ends. With mmap off and the trim threshold at its maximum the heap is reused:
no faults after the first steps, and both steps ran 9-18% faster (docs/performance.md).

Only the command line calls this: the process is then ours. Importing dpft as a library leaves
the user's allocator as it is, and so does a user who set glibc's malloc tunables.
"""

from __future__ import annotations

import ctypes
import os
import sys

M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # glibc <malloc.h>
INT_MAX = 2**31 - 1  # mallopt takes an int: 2 GiB of free heap top before it is returned


def user_tuned_malloc(environ: dict[str, str]) -> bool:
    """Whether the environment already sets glibc's malloc behaviour (then it is left alone)."""
    return any(k.startswith("MALLOC_") for k in environ) or "glibc.malloc." in environ.get("GLIBC_TUNABLES", "")


def keep_freed_memory() -> bool:
    """Serve every allocation from the heap and never trim it (glibc on Linux only).

    Returns:
        True if both settings were applied; False elsewhere (another libc or OS, or the user's own
        malloc tunables), where nothing is changed.
    """
    if not sys.platform.startswith("linux") or user_tuned_malloc(dict(os.environ)):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # musl and other libcs have no mallopt
        return False
    return bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, INT_MAX))
