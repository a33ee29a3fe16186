"""Which dtype the matmuls run in, chosen from the hardware rather than hard-coded.

bf16 halves CPU time where the CPU does bf16 natively (AVX512-BF16, AMX), but a CPU with AVX2 only
emulates it: a bf16 matmul there is ~70x slower than fp32. `--dtype auto` (the default) therefore
asks the hardware. Whatever the dtype, norms, clipping and noise stay fp32 (privacy/rules).
"""

from __future__ import annotations

import functools
import logging
import platform
import sys
import time
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch

from dpft.errors import ConfigError

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}  # --weights-dtype, and what --dtype resolves to
DTYPE_CHOICES = ("auto", *DTYPES)
_NAMES = {dtype: name for name, dtype in DTYPES.items()}
DTYPE_HELP = (
    "Compute dtype: auto (bf16 where the hardware does it natively, else fp32), fp32 or bf16 "
    "(autocast matmuls; scores stay fp32)."
)
_log = logging.getLogger(__name__)


def native_bf16(device: torch.device | str = "cpu") -> bool:
    """Whether bf16 matmuls on `device` are fast (hardware bf16), not emulated.

    CPU: oneDNN's bf16 query, then a measured bf16 matmul must beat fp32 (the query also says yes on
    AVX-512 CPUs without BF16, where oneDNN converts and gains nothing). CUDA: the driver's answer.
    """
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device.type != "cpu":
        return False
    return torch.ops.mkldnn._is_mkldnn_bf16_supported() and bf16_slowdown() < 1.0


@functools.cache
def bf16_slowdown() -> float:
    """CPU time of a bf16 matmul over an fp32 one (measured once per process; ~0.3 s when emulated)."""
    a, b = torch.randn(128, 512), torch.randn(512, 512)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # per core: on a busy machine a second thread's wake-up would dominate
    try:
        return _matmul_seconds(a.bfloat16(), b.bfloat16()) / _matmul_seconds(a, b)
    finally:
        torch.set_num_threads(threads)


def _matmul_seconds(a: torch.Tensor, b: torch.Tensor, runs: int = 20, budget_s: float = 0.2) -> float:
    """The fastest of up to `runs` matmuls: on a shared CPU a run can lose a whole time slice (~30 ms)."""
    a @ b  # warm-up: oneDNN builds its kernel on the first call
    best, spent = float("inf"), 0.0
    for _ in range(runs):
        start = time.perf_counter()
        a @ b
        took = time.perf_counter() - start
        best, spent = min(best, took), spent + took
        if spent > budget_s:
            break
    return best


def resolve_dtype(requested: str, device: torch.device | str = "cpu") -> torch.dtype:
    """The compute dtype for `--dtype auto|fp32|bf16`: auto is bf16 where it is native, else fp32.

    An explicit bf16 is honoured even where it is emulated, with one warning per process.

    Raises:
        ConfigError: `requested` is not one of DTYPE_CHOICES.
    """
    if requested not in DTYPE_CHOICES:
        raise ConfigError([f"--dtype must be one of {', '.join(DTYPE_CHOICES)} (got {requested!r})"])
    if requested == "auto":
        return torch.bfloat16 if native_bf16(device) else torch.float32
    if requested == "bf16" and not native_bf16(device):
        _warn_emulated(torch.device(device).type)
    return DTYPES[requested]


@functools.cache  # once per process and device type
def _warn_emulated(device_type: str) -> None:
    if device_type == "cpu":
        cost = f"a bf16 matmul measured {bf16_slowdown():.0f}x slower than fp32 here"
        where = f"this CPU ({_cpu_name()}, {torch.backends.cpu.get_cpu_capability()})"
    else:
        cost, where = "it is emulated", f"this {device_type} device"
    _log.warning(f"--dtype bf16: {where} has no native bf16 ({cost}); --dtype auto would use fp32")


def autocast(dtype: torch.dtype, device: torch.device | str = "cpu") -> AbstractContextManager:
    """Autocast the matmuls to `dtype`; fp32 needs none (autocast to fp32 would be a no-op at a cost)."""
    if dtype == torch.float32:
        return nullcontext()
    return torch.autocast(torch.device(device).type, dtype=dtype)


def dtype_name(dtype: torch.dtype) -> str:
    """'fp32' or 'bf16': the names of --dtype, for config.yaml, privacy.json and reports."""
    return _NAMES[dtype]


def describe_hardware(device: torch.device | str = "cpu") -> dict[str, Any]:
    """What a timing or a run depended on: CPU model, ATen's vector ISA, native bf16, threads, device."""
    device = torch.device(device)
    facts = {
        "device": str(device),
        "cpu": _cpu_name(),
        "capability": torch.backends.cpu.get_cpu_capability(),
        "native_bf16": native_bf16(device),
        "threads": torch.get_num_threads(),
    }
    if device.type == "cuda":
        facts["gpu"] = torch.cuda.get_device_name(device)
    return facts


@functools.cache  # once per process: the demo's runs and audits share one choice
def announce(dtype: torch.dtype, device: torch.device | str = "cpu") -> None:
    """One line on stderr, e.g. `dtype: fp32 (CPU AMD EPYC, AVX2, no native bf16)`."""
    hw = describe_hardware(device)
    where = hw.get("gpu") or f"CPU {hw['cpu']}, {hw['capability']}"
    native = "native bf16" if hw["native_bf16"] else "no native bf16"
    print(f"dtype: {dtype_name(dtype)} ({where}, {native})", file=sys.stderr)


@functools.cache
def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):  # not Linux
        return platform.processor() or platform.machine() or "unknown"
