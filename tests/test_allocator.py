"""The CLI keeps freed memory for the next step: fewer page faults, the user's own tunables respected."""

from __future__ import annotations

import subprocess
import sys

import pytest

from dpft.cli import allocator, main

# Allocate, touch and free 64 MiB twice through malloc itself (numpy would ask for huge pages, as
# torch does not); print the page faults of the second round.
SECOND_ROUND_FAULTS = """
import ctypes, resource, sys
from dpft.cli.allocator import keep_freed_memory
applied = keep_freed_memory() if sys.argv[1] == "tuned" else None
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
def round_():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    buffer = libc.malloc(64 * 2**20)
    ctypes.memset(buffer, 1, 64 * 2**20)
    libc.free(buffer)
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
round_()
print(applied, round_())
"""


def _second_round_faults(mode: str, env: dict[str, str] | None = None) -> tuple[str, int]:
    out = subprocess.run(
        [sys.executable, "-c", SECOND_ROUND_FAULTS, mode], capture_output=True, text=True, check=True, env=env
    )
    applied, faults = out.stdout.split()
    return applied, int(faults)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_a_freed_buffer_is_reused_without_page_faults():
    applied, tuned = _second_round_faults("tuned")
    _, default = _second_round_faults("default")
    assert applied == "True"
    assert default > 10_000  # 64 MiB is 16k pages: glibc unmapped it and the kernel zero-fills them again
    assert tuned < 1_000  # the heap kept it


@pytest.mark.parametrize(
    "environ, expected",
    [
        ({}, False),
        ({"PATH": "/usr/bin", "GLIBC_TUNABLES": "glibc.rtld.nns=2"}, False),
        ({"MALLOC_ARENA_MAX": "2"}, True),
        ({"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=0"}, True),
    ],
)
def test_the_users_own_malloc_settings_are_left_alone(environ, expected):
    assert allocator.user_tuned_malloc(environ) is expected


def test_nothing_changes_when_the_user_tuned_malloc(monkeypatch):
    calls = []
    monkeypatch.setenv("MALLOC_ARENA_MAX", "2")
    monkeypatch.setattr(allocator.ctypes, "CDLL", lambda name: calls.append(name))
    assert allocator.keep_freed_memory() is False
    assert calls == []


def test_the_settings_applied(monkeypatch):
    class Libc:
        def __init__(self):
            self.calls = []

        def mallopt(self, param, value):
            self.calls.append((param, value))
            return 1

    libc = Libc()
    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    for key in [k for k in allocator.os.environ if k.startswith("MALLOC_")]:
        monkeypatch.delenv(key)
    monkeypatch.setattr(allocator.sys, "platform", "linux")
    monkeypatch.setattr(allocator.ctypes, "CDLL", lambda name: libc)
    assert allocator.keep_freed_memory() is True
    assert libc.calls == [(allocator.M_MMAP_MAX, 0), (allocator.M_TRIM_THRESHOLD, 2**31 - 1)]


def test_the_command_line_applies_them_before_running(monkeypatch):
    order = []
    monkeypatch.setattr(main, "keep_freed_memory", lambda: order.append("malloc"))
    monkeypatch.setattr(main, "app", lambda: order.append("app"))
    main.main()
    assert order == ["malloc", "app"]
