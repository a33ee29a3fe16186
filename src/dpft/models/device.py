"""Where a run computes: `--device auto|cpu|cuda|cuda:N`, resolved once, checked up front.

The model, the batches, the per-unit clipping buffers and the noise all live on this device
(the engine allocates its sums on each parameter's device; noise.py draws on the sums' device).
"""

from __future__ import annotations

import re

import torch

from dpft.errors import ConfigError

DEVICE_HELP = "Compute device: auto (CUDA when present, else CPU), cpu, cuda or cuda:N."
_PATTERN = re.compile(r"^(auto|cpu|cuda)(:(\d+))?$")


def resolve_device(requested: str = "auto", local_rank: int | None = None) -> torch.device:
    """The torch device for `--device`.

    Args:
        requested: auto (CUDA when available, else CPU), cpu, cuda or cuda:N.
        local_rank: Data-parallel runs: this process's rank on its node; `auto` and `cuda` then
            mean cuda:local_rank (one GPU per process).

    Raises:
        ConfigError: An unknown device, CUDA asked for where there is none, an index beyond the
            GPUs present, or cuda:N with several processes per node (each takes its own GPU).
    """
    match = _PATTERN.match(str(requested).strip())
    if match is None or (match.group(1) != "cuda" and match.group(2)):
        raise ConfigError([f"--device must be auto, cpu, cuda or cuda:N (got {requested!r})"])
    kind, index = match.group(1), match.group(3)
    if kind == "cpu" or (kind == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ConfigError([f"--device {requested}: CUDA is not available here (use --device cpu or auto)"])
    count = torch.cuda.device_count()
    if index is not None and local_rank is not None:
        raise ConfigError(
            [f"--device {requested}: with several processes each takes the GPU of its local rank; use --device cuda"]
        )
    chosen = int(index) if index is not None else (local_rank or 0)
    if chosen >= count:
        raise ConfigError([f"--device: GPU {chosen} asked for, {count} present"])
    return torch.device("cuda", chosen)
