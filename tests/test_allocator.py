"""Tests of dsm_stt.allocator: the glibc thresholds are set, once, and only where they exist."""

from __future__ import annotations

import subprocess
import sys

import pytest

from dsm_stt import allocator

PROBE = """
import ctypes, ctypes.util, sys
from dsm_stt.allocator import reuse_freed_memory
libc = ctypes.CDLL(ctypes.util.find_library("c"))
class Info(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in
                ("arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost"
                 .split())]
libc.mallinfo2.restype = Info
def mapped_blocks_after_big_allocations():
    before = libc.mallinfo2().hblks
    import numpy as np
    arrays = [np.ones(4 << 20) for _ in range(4)]  # 32 MB each
    return libc.mallinfo2().hblks - before
print(mapped_blocks_after_big_allocations(), reuse_freed_memory(), reuse_freed_memory(),
      mapped_blocks_after_big_allocations())
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc only")
def test_big_blocks_come_from_the_heap_once_applied() -> None:
    out = subprocess.run(
        [sys.executable, "-c", PROBE], capture_output=True, text=True, check=True
    ).stdout.split()
    assert out == ["4", "True", "True", "0"]


def test_other_platforms_are_left_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(allocator, "_done", False)
    monkeypatch.setattr(allocator.sys, "platform", "darwin")
    assert allocator.reuse_freed_memory() is False
